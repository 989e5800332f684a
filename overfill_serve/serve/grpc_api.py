"""The public gRPC API (protos/overfill/v1/generate.proto) on the engine's types: pure conversions, no Ray.

The Router's `Generate` / `GenerateStream` / `ListModels` methods call these:

    check_api_key(grpc_context.invocation_metadata(), config.api_key)
    mode = mode_from_request(request, pair_name)           # NOT_FOUND / INVALID_ARGUMENT on a bad model
    kind, prompt = prompt_from_request(request)            # ("text", str) | ("token_ids", ids) | ("chat", msgs)
    params = params_from_proto(request.sampling)           # absent fields: SamplingParams' defaults
    acc = GenerationAccumulator(request_id_of(request), len(prompt_ids), ServedBy.of(mode, prefill, decode))
    for out in step_outputs: yield acc.add(out)            # GenerateStream; or acc.response() for Generate
    ...
    except Exception as e: apply_status(grpc_context, e); raise

Unknown models raise `ModelNotFoundError`, an `InvalidRequestError` (field "model") that maps to NOT_FOUND here
(and to 404 `model_not_found` in an OpenAI layer), so code that only knows `InvalidRequestError` still sees a
client error.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import grpc

from overfill_serve._proto.overfill.v1 import generate_pb2 as pb
from overfill_serve.errors import (
    InvalidRequestError,
    OutOfBlocksError,
    OverfillError,
    PreemptedError,
    TransferError,
)
from overfill_serve.request import FinishReason, Mode, TokenLogprob
from overfill_serve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from overfill_serve.engine.output_processor import StepOutput

Prompt = (
    tuple[Literal["text"], str] | tuple[Literal["token_ids"], list[int]] | tuple[Literal["chat"], list[dict]]
)

MODE_TO_PROTO = {Mode.OVERFILL: pb.MODE_OVERFILL, Mode.FULL: pb.MODE_FULL, Mode.PRUNED: pb.MODE_PRUNED}
MODE_FROM_PROTO = {v: k for k, v in MODE_TO_PROTO.items()}
FINISH_TO_PROTO = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}
FINISH_FROM_PROTO = {v: k for k, v in FINISH_TO_PROTO.items()}

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


class ModelNotFoundError(InvalidRequestError):
    """The model id names no served model: gRPC NOT_FOUND (HTTP 404). `field` is "model"."""

    def __init__(self, model: str, available: Sequence[str]) -> None:
        super().__init__(f"model {model!r} not found; available: {', '.join(available)}", field="model")
        self.model, self.available = model, list(available)

    def __reduce__(self) -> tuple:  # crosses Ray process boundaries with its fields
        return (type(self), (self.model, self.available))


class OverloadedError(OverfillError):
    """The router is at capacity (e.g. max_inflight_requests): RESOURCE_EXHAUSTED (HTTP 429/503)."""

    def __init__(self, message: str = "the server is overloaded", retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple:
        return (type(self), (str(self), self.retry_after_s))


class UnauthenticatedError(OverfillError):
    """Missing or wrong API key: UNAUTHENTICATED (HTTP 401)."""


# -- requests ---------------------------------------------------------------------------------------------


def model_ids(pair_name: str) -> list[tuple[str, Mode]]:
    """The model ids one pair is served under (as GET /v1/models lists them): `<pair>`, then `<pair>:<mode>`."""
    return [(pair_name, Mode.OVERFILL)] + [(f"{pair_name}:{m.value}", m) for m in Mode]


def resolve_model(model: str, pair_name: str) -> Mode:
    """The mode a model id selects: "" or "<pair>" → OverFill, "<pair>:<mode>" → that mode."""
    if not model or model == pair_name:
        return Mode.OVERFILL
    prefix = pair_name + ":"
    if model.startswith(prefix):
        try:
            return Mode(model[len(prefix) :])
        except ValueError:
            pass
    raise ModelNotFoundError(model, [m for m, _ in model_ids(pair_name)])


def mode_from_request(request: pb.GenerateRequest, pair_name: str) -> Mode:
    """`request.mode` when set, else the model id's suffix. The model id must name this pair either way."""
    mode = resolve_model(request.model, pair_name)
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


# -- responses --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServedBy:
    mode: Mode
    prefill_model: str
    decode_model: str

    @classmethod
    def of(cls, mode: Mode, prefill_model: str, decode_model: str) -> ServedBy:
        """Which of the pair's models (teacher `prefill_model`, student `decode_model`) ran each stage."""
        if mode is Mode.FULL:
            return cls(mode, prefill_model, prefill_model)
        if mode is Mode.PRUNED:
            return cls(mode, decode_model, decode_model)
        return cls(mode, prefill_model, decode_model)

    def to_proto(self) -> pb.ServedBy:
        return pb.ServedBy(
            mode=MODE_TO_PROTO[self.mode], prefill_model=self.prefill_model, decode_model=self.decode_model
        )


def logprobs_to_proto(logprobs: Iterable[TokenLogprob]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
        )
        for lp in logprobs
    ]


def chunk_to_proto(
    out: StepOutput,
    *,
    request_id: str | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    served_by: ServedBy | None = None,
    ttft_s: float | None = None,
    e2e_s: float | None = None,
) -> pb.GenerateChunk:
    """One StepOutput as a chunk. Pass usage, served_by and metrics on the last chunk only."""
    chunk = pb.GenerateChunk(
        request_id=request_id if request_id is not None else out.request_id,
        text=out.text,
        token_ids=list(out.token_ids),
        logprobs=logprobs_to_proto(out.logprobs),
        finish_reason=FINISH_TO_PROTO[out.finish_reason],
    )
    if prompt_tokens is not None:
        chunk.usage.CopyFrom(pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens or 0))
    if served_by is not None:
        chunk.served_by.CopyFrom(served_by.to_proto())
    if e2e_s is not None:
        chunk.metrics.CopyFrom(pb.Metrics(ttft_s=ttft_s or 0.0, e2e_s=e2e_s))
    return chunk


def response_to_proto(
    request_id: str,
    text: str,
    token_ids: Sequence[int],
    finish_reason: FinishReason | None,
    *,
    prompt_tokens: int,
    served_by: ServedBy,
    ttft_s: float,
    e2e_s: float,
    logprobs: Iterable[TokenLogprob] = (),
    stop_reason: str | int | None = None,
) -> pb.GenerateResponse:
    response = pb.GenerateResponse(
        request_id=request_id,
        text=text,
        token_ids=list(token_ids),
        finish_reason=FINISH_TO_PROTO[finish_reason],
        usage=pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=len(token_ids)),
        served_by=served_by.to_proto(),
        metrics=pb.Metrics(ttft_s=ttft_s, e2e_s=e2e_s),
        logprobs=logprobs_to_proto(logprobs),
    )
    if isinstance(stop_reason, str):
        response.stop_string = stop_reason
    elif isinstance(stop_reason, int):
        response.stop_token_id = stop_reason
    return response


class GenerationAccumulator:
    """One request's StepOutputs → GenerateChunks (`add`, for GenerateStream) and/or one GenerateResponse
    (`response`, for Generate). Counts tokens and times the first and last token from `arrival`."""

    def __init__(
        self,
        request_id: str,
        prompt_tokens: int,
        served_by: ServedBy,
        *,
        arrival: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.request_id, self.prompt_tokens, self.served_by = request_id, prompt_tokens, served_by
        self._clock = clock
        self.arrival = clock() if arrival is None else arrival
        self.text_parts: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: FinishReason | None = None
        self.ttft_s: float | None = None
        self.e2e_s: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, out: StepOutput) -> pb.GenerateChunk:
        now = self._clock() - self.arrival
        if out.token_ids and self.ttft_s is None:
            self.ttft_s = now
        self.text_parts.append(out.text)
        self.token_ids.extend(out.token_ids)
        self.logprobs.extend(out.logprobs)
        if not out.finished:
            return chunk_to_proto(out, request_id=self.request_id)
        self.finish_reason = out.finish_reason
        self.e2e_s = now
        return chunk_to_proto(
            out,
            request_id=self.request_id,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.token_ids),
            served_by=self.served_by,
            ttft_s=self.ttft_s,
            e2e_s=self.e2e_s,
        )

    def response(self, stop_reason: str | int | None = None) -> pb.GenerateResponse:
        e2e = self.e2e_s if self.e2e_s is not None else self._clock() - self.arrival
        return response_to_proto(
            self.request_id,
            "".join(self.text_parts),
            self.token_ids,
            self.finish_reason,
            prompt_tokens=self.prompt_tokens,
            served_by=self.served_by,
            ttft_s=self.ttft_s if self.ttft_s is not None else e2e,
            e2e_s=e2e,
            logprobs=self.logprobs,
            stop_reason=stop_reason,
        )


def models_to_proto(pair_name: str, prefill_model: str, decode_model: str) -> pb.ListModelsResponse:
    models = []
    for model_id, mode in model_ids(pair_name):
        sb = ServedBy.of(mode, prefill_model, decode_model)
        models.append(
            pb.Model(
                id=model_id,
                mode=MODE_TO_PROTO[mode],
                prefill_model=sb.prefill_model,
                decode_model=sb.decode_model,
            )
        )
    return pb.ListModelsResponse(models=models)


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
