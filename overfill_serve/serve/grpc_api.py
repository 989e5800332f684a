"""The public gRPC API (protos/overfill/v1/generate.proto) on the engine's types: pure conversions, no Ray.

Requests and status codes live here, responses in `grpc_responses`. The Router's `Generate` /
`GenerateStream` / `ListModels` methods call these:

    check_api_key(grpc_context.invocation_metadata(), config.api_key)
    mode = mode_from_request(request, pair_name)           # NOT_FOUND / INVALID_ARGUMENT on a bad model
    kind, prompt = prompt_from_request(request)            # ("text", str) | ("token_ids", ids) | ("chat", msgs)
    params = params_from_proto(request.sampling)           # absent fields: SamplingParams' defaults
    acc = GenerationAccumulator(request_id_of(request), len(prompt_ids), ServedBy.of(mode, full, pruned))
    for out in step_outputs: yield acc.add(out)            # GenerateStream; or acc.response() for Generate
    ...
    except Exception as e: apply_status(grpc_context, e); raise

Model ids resolve through `model_names.resolve_model` (an empty id is the pair's OverFill mode here). Unknown
models raise `errors.ModelNotFoundError`, an `InvalidRequestError` (field "model") that maps to NOT_FOUND here
(and to 404 `model_not_found` in the OpenAI layer), so code that only knows `InvalidRequestError` still sees a
client error.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import uuid
from collections.abc import Iterable
from typing import Literal

import grpc

from overfill_serve._proto.overfill.v1 import generate_pb2 as pb
from overfill_serve.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    OutOfBlocksError,
    OverloadedError,
    PoolUnavailableError,
    PreemptedError,
    ServiceUnavailableError,
    TransferError,
    UnauthenticatedError,
)
from overfill_serve.request import Mode
from overfill_serve.sampling_params import SamplingParams
from overfill_serve.serve.model_names import resolve_model

Prompt = (
    tuple[Literal["text"], str] | tuple[Literal["token_ids"], list[int]] | tuple[Literal["chat"], list[dict]]
)

MODE_TO_PROTO = {Mode.OVERFILL: pb.MODE_OVERFILL, Mode.FULL: pb.MODE_FULL, Mode.PRUNED: pb.MODE_PRUNED}
MODE_FROM_PROTO = {v: k for k, v in MODE_TO_PROTO.items()}

# SamplingOptions fields with proto3 presence: absent means SamplingParams' default.
_OPTIONAL_INTS = ("max_tokens", "top_k", "seed", "logprobs")
_OPTIONAL_FLOATS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)
MAX_REQUEST_ID_LEN = 256


# -- requests ---------------------------------------------------------------------------------------------


def mode_from_request(request: pb.GenerateRequest, pair_name: str) -> Mode:
    """`request.mode` when set, else the model id's suffix. The model id must name this pair either way."""
    mode = resolve_model(request.model, pair_name, allow_empty=True)
    if request.mode == pb.MODE_UNSPECIFIED:
        return mode
    try:
        return MODE_FROM_PROTO[request.mode]
    except KeyError:
        raise InvalidRequestError(f"unknown mode {request.mode}", field="mode") from None


def prompt_from_request(request: pb.GenerateRequest) -> Prompt:
    kind = request.WhichOneof("prompt")
    if kind == "text":
        if not request.text:
            raise InvalidRequestError("the prompt is empty", field="prompt")
        return ("text", request.text)
    if kind == "token_ids":
        ids = list(request.token_ids.ids)
        if not ids:
            raise InvalidRequestError("the prompt is empty", field="prompt")
        if any(t < 0 for t in ids):
            raise InvalidRequestError("prompt token ids must be >= 0", field="prompt")
        return ("token_ids", ids)
    if kind == "chat":
        messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        if not messages:
            raise InvalidRequestError("chat needs at least one message", field="messages")
        if any(not m["role"] for m in messages):
            raise InvalidRequestError("every chat message needs a role", field="messages")
        return ("chat", messages)
    raise InvalidRequestError("the request has no prompt: set text, token_ids or chat", field="prompt")


def request_id_of(request: pb.GenerateRequest) -> str:
    """The client's request id, checked, or a fresh one."""
    if not request.HasField("request_id"):
        return f"gen-{uuid.uuid4().hex}"
    rid = request.request_id
    if not rid or len(rid) > MAX_REQUEST_ID_LEN or not rid.isprintable():
        raise InvalidRequestError(
            f"request_id must be 1 to {MAX_REQUEST_ID_LEN} printable characters", field="request_id"
        )
    return rid


def params_from_proto(options: pb.SamplingOptions | None) -> SamplingParams:
    """SamplingParams from SamplingOptions; absent fields keep SamplingParams' defaults. Raises
    `InvalidRequestError` naming the field."""
    if options is None:
        return SamplingParams()
    kwargs: dict = {}
    for name in _OPTIONAL_INTS:
        if options.HasField(name):
            kwargs[name] = int(getattr(options, name))
    for name in _OPTIONAL_FLOATS:
        if options.HasField(name):
            value = float(getattr(options, name))
            if not math.isfinite(value):
                raise InvalidRequestError(f"{name} must be a finite number, got {value}", field=name)
            kwargs[name] = value
    if options.HasField("skip_special_tokens"):
        kwargs["skip_special_tokens"] = options.skip_special_tokens
    if any(t < 0 for t in options.stop_token_ids):
        raise InvalidRequestError("stop_token_ids must be >= 0", field="stop_token_ids")
    return SamplingParams(
        stop=tuple(options.stop),
        stop_token_ids=tuple(options.stop_token_ids),
        ignore_eos=options.ignore_eos,
        include_stop_str_in_output=options.include_stop_str_in_output,
        **kwargs,
    )


def params_to_proto(params: SamplingParams) -> pb.SamplingOptions:
    """The exact inverse of `params_from_proto` (every field set; seed / logprobs only when not None)."""
    options = pb.SamplingOptions(
        stop=list(params.stop),
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        include_stop_str_in_output=params.include_stop_str_in_output,
        skip_special_tokens=params.skip_special_tokens,
    )
    for name in (*_OPTIONAL_INTS, *_OPTIONAL_FLOATS):
        value = getattr(params, name)
        if value is not None:
            setattr(options, name, value)
    return options


# -- auth and errors --------------------------------------------------------------------------------------


def check_api_key(metadata: Iterable[tuple[str, str | bytes]] | None, api_key: str | None) -> None:
    """Raise `UnauthenticatedError` unless `api_key` is None or the metadata has `authorization: Bearer <key>`."""
    if not api_key:
        return
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode()):
                return
    raise UnauthenticatedError("missing or invalid API key (metadata authorization: Bearer <key>)")


def _ray_error(exc: BaseException, *names: str) -> bool:
    return any(c.__module__.startswith("ray.") and c.__name__ in names for c in type(exc).__mro__)


def status_for(exc: BaseException, *, request_id: str | None = None) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and client-facing details for an exception. Unexpected errors give INTERNAL with no
    internals in the details (log the exception yourself)."""
    cause = getattr(exc, "cause", None)
    if _ray_error(exc, "RayTaskError") and isinstance(cause, BaseException):
        exc = cause  # a downstream deployment's exception: its str() is a whole traceback
    if isinstance(exc, ModelNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"{exc} (field: {exc.field})" if exc.field else str(exc)
    if isinstance(exc, UnauthenticatedError):
        return grpc.StatusCode.UNAUTHENTICATED, str(exc)
    if isinstance(exc, OverloadedError) or _ray_error(exc, "BackPressureError"):
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
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, ServiceUnavailableError):
        return grpc.StatusCode.UNAVAILABLE, "no replica could finish the request; retry"
    if _ray_error(exc, "DeploymentUnavailableError", "RayActorError", "ActorUnavailableError"):
        return grpc.StatusCode.UNAVAILABLE, "no replica is available; retry"
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the request timed out"
    if isinstance(exc, asyncio.CancelledError) or _ray_error(exc, "RequestCancelledError"):
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
