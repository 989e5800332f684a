"""Typed transfer errors <-> gRPC status codes, so each side sees the other's failure by its name."""

from __future__ import annotations

import grpc

from overfill_serve.errors import (
    AuthenticationError,
    ChunkError,
    LayoutMismatchError,
    PeerUnavailableError,
    TransferAbortedError,
    TransferError,
    TransferNotFoundError,
    TransferTimeoutError,
)

_CODES: list[tuple[type[TransferError], grpc.StatusCode]] = [
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (LayoutMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (TransferNotFoundError, grpc.StatusCode.NOT_FOUND),
    (TransferAbortedError, grpc.StatusCode.ABORTED),
    (TransferTimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ChunkError, grpc.StatusCode.DATA_LOSS),
    (PeerUnavailableError, grpc.StatusCode.UNAVAILABLE),
]


def status_of(error: TransferError) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def error_from_rpc(e: grpc.RpcError, what: str) -> TransferError:
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return LayoutMismatchError([line.strip() for line in details.splitlines()[1:]] or [details])
    for cls, c in _CODES:
        if code == c and cls is not LayoutMismatchError:
            return cls(f"{what}: {details}")
    if code == grpc.StatusCode.CANCELLED:
        return PeerUnavailableError(f"{what}: cancelled: {details}")
    return TransferError(f"{what}: {code.name}: {details}")
