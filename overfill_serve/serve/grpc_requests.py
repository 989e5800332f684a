"""The public gRPC API's requests (protos/overfill/v1/generate.proto) on the engine's types: pure conversions,
no Ray. Responses are in `grpc_responses`, status codes in `grpc_errors`; the ingress's `Generate` /
`GenerateStream` / `ListModels` handlers use all three.

Model ids resolve through `model_names.resolve_model` (an empty id is the pair's OverFill mode here).
"""

from __future__ import annotations

import uuid
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from overfill_serve._proto.overfill.v1 import generate_pb2 as pb
from overfill_serve.errors import InvalidRequestError
from overfill_serve.prompt import PromptEncoder
from overfill_serve.request import Mode
from overfill_serve.sampling_params import FLOAT_FIELDS, SamplingParams
from overfill_serve.serve.model_names import resolve_model

MODE_TO_PROTO = {Mode.OVERFILL: pb.MODE_OVERFILL, Mode.FULL: pb.MODE_FULL, Mode.PRUNED: pb.MODE_PRUNED}
MODE_FROM_PROTO = {v: k for k, v in MODE_TO_PROTO.items()}

# SamplingOptions fields with proto3 presence: absent means SamplingParams' default.
_OPTIONAL_INTS = (
    "max_tokens",
    "top_k",
    "seed",
    "logprobs",
    "min_tokens",
    "prompt_logprobs",
    "continuation_start",
)
MAX_REQUEST_ID_LEN = 256
M = TypeVar("M", bound=Message)


# -- requests ---------------------------------------------------------------------------------------------


def parse_request(message: type[M], request: M | bytes) -> M:
    """A request as the ingress gets it: bytes (`grpc_service` leaves parsing to us) or, in-process, a
    message."""
    if not isinstance(request, bytes):
        return request
    try:
        return message.FromString(request)
    except DecodeError:
        raise InvalidRequestError(f"malformed {message.DESCRIPTOR.name} message") from None


def mode_from_request(request: pb.GenerateRequest, pair_name: str) -> Mode:
    """`request.mode` when set, else the model id's suffix. The model id must name this pair either way."""
    mode = resolve_model(request.model, pair_name, allow_empty=True)
    if request.mode == pb.MODE_UNSPECIFIED:
        return mode
    try:
        return MODE_FROM_PROTO[request.mode]
    except KeyError:
        raise InvalidRequestError(f"unknown mode {request.mode}", field="mode") from None


def prompt_from_request(request: pb.GenerateRequest, prompts: PromptEncoder) -> list[int]:
    """The prompt's token ids (text, token ids or a chat), checked by the encoder every API shares."""
    kind = request.WhichOneof("prompt")
    if kind == "text":
        return prompts.encode(request.text)
    if kind == "token_ids":
        return prompts.check(list(request.token_ids.ids))
    if kind == "chat":
        return prompts.chat([{"role": m.role, "content": m.content} for m in request.chat.messages])
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
    for name in FLOAT_FIELDS:
        if options.HasField(name):
            kwargs[name] = float(getattr(options, name))
    if options.HasField("skip_special_tokens"):
        kwargs["skip_special_tokens"] = options.skip_special_tokens
    return SamplingParams(
        stop=tuple(options.stop),
        stop_token_ids=tuple(options.stop_token_ids),
        ignore_eos=options.ignore_eos,
        include_stop_str_in_output=options.include_stop_str_in_output,
        logit_bias=tuple(options.logit_bias.items()),
        **kwargs,
    )
