"""`TransferConfig`: how the KV channel runs (backend, address, secret, lease, chunking, time bounds)."""

from __future__ import annotations

from dataclasses import dataclass

from overfill_serve.errors import ModelConfigError

BACKENDS = ("grpc", "nixl")
SESSION_KEY = "x-overfill-session"  # gRPC metadata key carrying the handshake's session token


@dataclass(frozen=True)
class TransferConfig:
    backend: str = "grpc"  # how the decode side receives: "grpc" (byte stream) or "nixl" (RDMA READ)
    host: str = "127.0.0.1"  # where the prefill side's KV server listens
    port: int = 0  # 0: any free port
    secret: str | None = None  # None: $OVERFILL_CLUSTER_SECRET
    lease_seconds: float = 30.0  # an unpulled transfer's blocks are freed after this long
    chunk_bytes: int = 1 << 20  # gRPC data plane: target payload per chunk (1 MiB measured best here)
    timeout_seconds: float = 30.0  # bound on any stall: prefill readiness, a pull, a control RPC
    max_workers: int = 32  # server threads (a pull waiting on a prefill holds one)
    layerwise: bool = True  # publish each layer's KV as soon as it is computed (overlaps the prefill)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ModelConfigError(f"transfer backend {self.backend!r} is not one of {BACKENDS}")
        if self.chunk_bytes <= 0 or self.lease_seconds <= 0 or self.timeout_seconds <= 0:
            raise ModelConfigError("chunk_bytes, lease_seconds and timeout_seconds must be positive")

    @property
    def max_message_bytes(self) -> int:
        """gRPC message limit: above the largest chunk (one block may exceed chunk_bytes) plus headers."""
        return max(64 << 20, 4 * self.chunk_bytes)
