"""Mutual authentication of KV-channel peers by a shared cluster secret (HMAC-SHA256 over fresh nonces).

The secret never crosses the wire. The client proves it over the server's nonce, the server proves it over the
client's nonce and the session it issues, so neither side can be impersonated by a replayed transcript. Each
MAC also covers what its side announces (its KV layout and its NIXL envelope), so neither can be swapped in
transit.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

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


def verify(expected: bytes, given: bytes) -> bool:
    return hmac.compare_digest(expected, given)


def _mac(secret: bytes, *parts: bytes) -> bytes:
    h = hmac.new(secret, digestmod=hashlib.sha256)
    for part in parts:
        # Length-prefix each part so ("ab", "c") and ("a", "bc") sign differently.
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()
