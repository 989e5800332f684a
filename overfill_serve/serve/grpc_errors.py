"""gRPC status codes of the public API's errors: every exception a handler can raise, mapped once (Ray's own
through `ray_errors`). `errors.ModelNotFoundError` is an
`InvalidRequestError` (field "model") that maps to NOT_FOUND here, as to 404 `model_not_found` over HTTP."""

from __future__ import annotations

import asyncio

import grpc

from overfill_serve.errors import (
    ApplicationNotFoundError,
    InvalidRequestError,
    ModelNotFoundError,
    OutOfBlocksError,
    OverloadedError,
    PoolUnavailableError,
    PreemptedError,
    RequestTooLargeError,
    ServiceNotFoundError,
    ServiceUnavailableError,
    TransferError,
    UnauthenticatedError,
)
from overfill_serve.serve.ray_errors import ray_kind, unwrap


def status_for(exc: BaseException, *, request_id: str | None = None) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and client-facing details for an exception. Unexpected errors give INTERNAL with no
    internals in the details (log the exception yourself)."""
    exc = unwrap(exc)
    kind = ray_kind(exc)
    if isinstance(exc, (ModelNotFoundError, ApplicationNotFoundError, ServiceNotFoundError)):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, RequestTooLargeError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"{exc} (field: {exc.field})" if exc.field else str(exc)
    if isinstance(exc, UnauthenticatedError):
        return grpc.StatusCode.UNAUTHENTICATED, str(exc)
    if isinstance(exc, OverloadedError) or kind == "overloaded":
        retry = getattr(exc, "retry_after_s", None)
        hint = f"retry in {retry:g} s" if retry else "retry with backoff"
        what = str(exc) if isinstance(exc, OverloadedError) else "the server is overloaded"
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"{what}; {hint}"
    if isinstance(exc, OutOfBlocksError):
        return (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "not enough KV cache for this request now; retry later, or with a shorter prompt or max_tokens",
        )
    if isinstance(exc, TransferError):
        return grpc.StatusCode.UNAVAILABLE, "no replica could finish the request (KV transfer failed); retry"
    if isinstance(exc, PreemptedError):
        return grpc.StatusCode.UNAVAILABLE, "no replica could finish the request (preempted); retry"
    if isinstance(exc, PoolUnavailableError):
        return grpc.StatusCode.UNAVAILABLE, f"{exc}; retry in {exc.retry_after_s:g} s"
    if isinstance(exc, ServiceUnavailableError):
        return grpc.StatusCode.UNAVAILABLE, "no replica could finish the request; retry"
    if kind == "unavailable":
        return grpc.StatusCode.UNAVAILABLE, "no replica is available; retry"
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the request timed out"
    if isinstance(exc, asyncio.CancelledError) or kind == "cancelled":
        return grpc.StatusCode.CANCELLED, "the request was cancelled"
    suffix = f" (request {request_id})" if request_id else ""
    return grpc.StatusCode.INTERNAL, f"internal error{suffix}"


def apply_status(
    context, exc: BaseException, *, request_id: str | None = None
) -> tuple[grpc.StatusCode, str]:
    """Set `status_for(exc)` on a grpc.ServicerContext or Ray Serve's RayServegRPCContext; returns it."""
    code, details = status_for(exc, request_id=request_id)
    context.set_code(code)
    context.set_details(details)
    return code, details
