"""Typed errors raised at the edges of overfill-serve.

Every error a user can provoke is an `OverfillError`; the serving layers map the subclasses to HTTP / gRPC
status codes. Asserts are kept for internal invariants only.
"""

from __future__ import annotations

from collections.abc import Sequence


class OverfillError(Exception):
    """Base class of every error overfill-serve raises on purpose."""

    def __reduce__(self) -> tuple:
        # Errors cross process boundaries (Ray, pipes): rebuild with every field, whatever the constructor.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type[OverfillError], args: tuple, state: dict) -> OverfillError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class InvalidRequestError(OverfillError, ValueError):
    """A request or its sampling parameters are invalid. `field` names the offending parameter."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ModelNotFoundError(InvalidRequestError):
    """The model id names no served model: HTTP 404 `model_not_found`, gRPC NOT_FOUND. `field` is "model",
    so code that only knows `InvalidRequestError` still sees a client error."""

    def __init__(self, model: str, available: Sequence[str]) -> None:
        super().__init__(f"model {model!r} not found; available: {', '.join(available)}", field="model")
        self.model, self.available = model, list(available)


class RequestTooLargeError(InvalidRequestError):
    """The request is over the configured size limit (`max_request_bytes`): HTTP 413, gRPC RESOURCE_EXHAUSTED."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"the request has {size} bytes; the limit is {limit} (max_request_bytes)")
        self.size, self.limit = size, limit


class ApplicationNotFoundError(InvalidRequestError):
    """A gRPC call's `application` metadata names another Serve application than the one it reached: gRPC
    NOT_FOUND (Ray Serve routes every call to the only application there is, whatever it names)."""


class ServiceNotFoundError(InvalidRequestError):
    """A gRPC health check names a service this server does not have: gRPC NOT_FOUND."""

    def __init__(self, service: str) -> None:
        super().__init__(f"unknown service {service!r}", field="service")


class UnauthenticatedError(OverfillError):
    """Missing or wrong API key: HTTP 401, gRPC UNAUTHENTICATED."""


class OverloadedError(OverfillError):
    """The ingress is at capacity (e.g. max_inflight_requests): HTTP 503 `overloaded` with Retry-After, gRPC
    RESOURCE_EXHAUSTED with a retry hint. `retry_after_s`: when to retry, if known."""

    def __init__(self, message: str = "the server is overloaded", retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ServiceUnavailableError(OverfillError):
    """No replica could finish the request (all died, or the retry budget ran out): HTTP 503
    `service_unavailable`, gRPC UNAVAILABLE."""


class PoolUnavailableError(ServiceUnavailableError):
    """A pool the request needs has no replica and none can be placed (e.g. no node has its GPU type). The
    message says which pool and what is missing, and reaches the client: HTTP 503 `pool_unavailable`, gRPC
    UNAVAILABLE."""

    code = "pool_unavailable"
    retry_after_s = 30.0  # an operator has to act: retry much later


class PoolStartingError(PoolUnavailableError):
    """A pool the request needs has no running replica yet (the app is starting, or its replicas are being
    replaced): HTTP 503 `pool_starting` with Retry-After, gRPC UNAVAILABLE, at once rather than after the
    request waited in Serve's router."""

    code = "pool_starting"
    retry_after_s = 1.0


class ModelConfigError(OverfillError, ValueError):
    """A model directory's config.json is missing, unreadable or describes an unsupported model."""


class WeightLoadError(OverfillError):
    """Weights are missing, unexpected or of the wrong shape; the message lists every offending tensor."""


class PairMismatchError(OverfillError, ValueError):
    """The prefill and decode models do not share a KV layout; `mismatches` lists every differing field."""

    def __init__(self, mismatches: list[str]) -> None:
        super().__init__("model pair mismatch:\n  " + "\n  ".join(mismatches))
        self.mismatches = mismatches


class OutOfBlocksError(OverfillError):
    """The KV cache cannot hold a request even when it runs alone."""


class TransferError(OverfillError):
    """A KV transfer failed; the transfer's blocks have been freed on this side."""


class AuthenticationError(TransferError):
    """The peer could not prove it holds the cluster secret (or we could not)."""


class LayoutMismatchError(TransferError):
    """The two sides of a KV channel disagree on the KV layout; `mismatches` lists every differing field."""

    def __init__(self, mismatches: list[str]) -> None:
        super().__init__("KV layout mismatch:\n  " + "\n  ".join(mismatches))
        self.mismatches = mismatches


class ChunkError(TransferError):
    """A received chunk is malformed: unknown transfer, layer or block range outside it, wrong size, bad
    checksum. Nothing was written."""


class TransferNotFoundError(TransferError):
    """The transfer is unknown: never offered, already released, aborted, or its lease expired."""


class TransferAbortedError(TransferError):
    """The other side aborted the transfer."""


class TransferTimeoutError(TransferError):
    """The peer stalled past the configured bound."""


class PeerUnavailableError(TransferError):
    """The peer is unreachable or died mid-transfer."""


class PreemptedError(OverfillError):
    """A disaggregated decode worker ran out of KV blocks and gave the request back. `output_token_ids` holds
    what it generated; re-prefilling the prompt with them (see `PrefillWorker.submit`) continues it exactly."""

    def __init__(self, request_id: str, output_token_ids: list[int]) -> None:
        super().__init__(f"request {request_id} was preempted after {len(output_token_ids)} tokens")
        self.request_id = request_id
        self.output_token_ids = output_token_ids
