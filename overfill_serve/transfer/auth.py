"""Mutual authentication of KV-channel peers by a shared cluster secret (HMAC-SHA256 over fresh nonces).

The secret never crosses the wire. The client proves it over the server's nonce, the server proves it over the
client's nonce and the session it issues, so neither side can be impersonated by a replayed transcript. Each
MAC also covers what its side announces (its KV layout and its NIXL envelope), so neither can be swapped in
transit.

After the handshake both sides derive a per-session key (`chunk_key`) that signs each gRPC chunk's header and
the completion (`chunk_mac`) and each NIXL layer description (`sign_message`), so a man in the middle cannot
rewrite block ids or addresses, layers or the first token.
Challenges expire and are capped (`Nonces`): an unauthenticated peer cannot grow the server's memory.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from collections import OrderedDict
from typing import Any

from overfill_serve.errors import ModelConfigError

SECRET_ENV = "OVERFILL_CLUSTER_SECRET"
MIN_SECRET_BYTES = 16
NONCE_BYTES = 32


def load_secret(secret: str | bytes | None = None) -> bytes:
    """The cluster secret from the argument or $OVERFILL_CLUSTER_SECRET; refuse a missing or short one."""
    value = secret if secret is not None else os.environ.get(SECRET_ENV)
    if value is None:
        raise ModelConfigError(f"no KV-channel secret: set {SECRET_ENV} or the transfer config's `secret`")
    raw = value.encode() if isinstance(value, str) else bytes(value)
    if len(raw) < MIN_SECRET_BYTES:
        raise ModelConfigError(f"the KV-channel secret must be at least {MIN_SECRET_BYTES} bytes")
    return raw


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def new_session() -> str:
    return secrets.token_hex(16)


class Nonces:
    """Outstanding challenges: each answers once, within `ttl` seconds; beyond `cap`, the oldest are dropped
    (a flood costs its sender a retry, never the server memory)."""

    def __init__(self, ttl: float, cap: int) -> None:
        self.ttl, self.cap = ttl, cap
        self._issued: OrderedDict[bytes, float] = OrderedDict()  # nonce -> expiry, oldest first
        self._lock = threading.Lock()

    def issue(self) -> bytes:
        nonce, now = new_nonce(), time.monotonic()
        with self._lock:
            while self._issued and (
                len(self._issued) >= self.cap or next(iter(self._issued.values())) <= now
            ):
                self._issued.popitem(last=False)
            self._issued[nonce] = now + self.ttl
        return nonce

    def redeem(self, nonce: bytes) -> bool:
        """True once for a nonce issued here and not yet expired."""
        with self._lock:
            expiry = self._issued.pop(nonce, None)
        return expiry is not None and expiry > time.monotonic()

    def __len__(self) -> int:
        return len(self._issued)


def client_mac(
    secret: bytes, server_nonce: bytes, client_nonce: bytes, layout: bytes, nixl_agent_metadata: bytes
) -> bytes:
    return _mac(secret, b"client", server_nonce, client_nonce, layout, nixl_agent_metadata)


def server_mac(
    secret: bytes,
    client_nonce: bytes,
    server_nonce: bytes,
    session: str,
    layout: bytes,
    nixl_agent_metadata: bytes,
) -> bytes:
    return _mac(secret, b"server", client_nonce, server_nonce, session.encode(), layout, nixl_agent_metadata)


def chunk_key(secret: bytes, client_nonce: bytes, server_nonce: bytes, session: str) -> bytes:
    return _mac(secret, b"chunk", client_nonce, server_nonce, session.encode())


def chunk_mac(key: bytes, data: bytes | memoryview) -> bytes:
    """The MAC of one chunk header (or of a serialized completion), under the session's chunk key."""
    return hmac.new(key, data, hashlib.sha256).digest()


def sign_message(key: bytes, message: Any) -> Any:
    """`message` (a protobuf message with a `mac` field, unset) with its MAC set, under the chunk key."""
    message.mac = chunk_mac(key, message.SerializeToString(deterministic=True))
    return message


def verify_message(key: bytes, message: Any) -> bool:
    unsigned = type(message)()
    unsigned.CopyFrom(message)
    unsigned.ClearField("mac")
    return verify(chunk_mac(key, unsigned.SerializeToString(deterministic=True)), message.mac)


def verify(expected: bytes, given: bytes) -> bool:
    return hmac.compare_digest(expected, given)


def _mac(secret: bytes, *parts: bytes) -> bytes:
    h = hmac.new(secret, digestmod=hashlib.sha256)
    for part in parts:
        # Length-prefix each part so ("ab", "c") and ("a", "bc") sign differently.
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()
