"""`TransferConfig`: how the KV channel runs (backend, addresses, secret, TLS, lease, chunking, time bounds)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from overfill_serve.errors import ModelConfigError

BACKENDS = ("grpc", "nixl")
SESSION_KEY = "x-overfill-session"  # gRPC metadata key carrying the handshake's session token
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")
# A NIXL reader may still be reading (or cancelling its reads) this long after its wait for them ends: the
# prefill side keeps the blocks pinned at least as long.
READ_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class TransferConfig:
    backend: str = "grpc"  # how the decode side receives: "grpc" (byte stream) or "nixl" (RDMA READ)
    host: str = "127.0.0.1"  # the interface the prefill side's KV server binds
    advertise_host: str | None = None  # the host peers dial (None: `host`; needed when `host` is a wildcard)
    port: int = 0  # 0: any free port
    secret: str | None = None  # None: $OVERFILL_CLUSTER_SECRET
    lease_seconds: float = 30.0  # an unpulled transfer's blocks are freed after this long
    chunk_bytes: int = 1 << 20  # gRPC data plane: target payload per chunk (1 MiB measured best here)
    timeout_seconds: float = 30.0  # bound on any stall: prefill readiness, a pull, a control RPC
    max_workers: int = 4  # server threads for the few blocking steps (a GPU event wait, NIXL setup)
    layerwise: bool = True  # publish each layer's KV as soon as it is computed (overlaps the prefill)
    # Every request to the KV server is small (the largest, a NIXL handshake, is ~0.5 KB on loopback): the
    # server refuses bigger ones before reading them, so an unauthenticated peer costs at most this much.
    max_request_bytes: int = 16 << 10
    session_seconds: float = 3600.0  # a handshake's session ends after this long (peers re-handshake)
    max_challenges: int = 1024  # outstanding handshake challenges kept (the oldest are dropped beyond)
    # TLS (PEM file paths): with cert and key the server listens on TLS and a client presents them as its
    # certificate; with ca, each side verifies the other against it. None: plaintext (integrity by HMAC).
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ModelConfigError(f"transfer backend {self.backend!r} is not one of {BACKENDS}")
        positive = (self.chunk_bytes, self.lease_seconds, self.timeout_seconds, self.session_seconds)
        if min(positive) <= 0 or self.max_request_bytes < 1024 or self.max_challenges < 1:
            raise ModelConfigError(
                "chunk_bytes, lease_seconds, timeout_seconds and session_seconds must be positive, "
                "max_request_bytes at least 1024 and max_challenges at least 1"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ModelConfigError("TLS needs both tls_cert and tls_key")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ModelConfigError("tls_ca needs tls_cert and tls_key (each side verifies the other)")
        if self.host in WILDCARD_HOSTS and self.advertise_host is None:
            raise ModelConfigError(
                f"KV server bound to {self.host!r}: set advertise_host (the host peers dial)"
            )

    @property
    def address_host(self) -> str:
        """The host in the address this server hands peers."""
        return self.advertise_host or self.host

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def tls_files(self) -> tuple[bytes, bytes, bytes | None]:
        """(certificate chain, private key, CA certificates or None), read from the configured files."""
        assert self.tls_cert is not None and self.tls_key is not None, "tls_files() with TLS configured"
        try:
            ca = Path(self.tls_ca).read_bytes() if self.tls_ca is not None else None
            return Path(self.tls_cert).read_bytes(), Path(self.tls_key).read_bytes(), ca
        except OSError as e:
            raise ModelConfigError(f"cannot read a KV-channel TLS file: {e}") from None

    @property
    def max_message_bytes(self) -> int:
        """Pull responses' limit: above the largest chunk (one block may exceed chunk_bytes) plus headers."""
        return max(64 << 20, 4 * self.chunk_bytes)
