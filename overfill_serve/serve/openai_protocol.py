"""OpenAI-compatible requests: pydantic models, validation, model names and the error mapping.

Pure protocol code (no Ray, no HTTP framework): the Router parses a body with `parse_request`, maps the model
name to a `Mode` with `parse_model`, builds one `SamplingParams` per choice with `to_sampling_params`, and
turns any exception into an OpenAI error body with `from_exception(e).to_json()`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from overfill_serve.errors import (
    InvalidRequestError,
    ModelConfigError,
    OutOfBlocksError,
    PairMismatchError,
    PreemptedError,
    TransferError,
    WeightLoadError,
)
from overfill_serve.request import Mode
from overfill_serve.sampling_params import SamplingParams
from overfill_serve.tokenizer import encode_chat

MAX_N = 8
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API allows 0..5 alternatives
MAX_TOP_LOGPROBS = 20
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Chat has no default limit in OpenAI: generation runs to the context limit, where the engine stops anyway.
UNBOUNDED_MAX_TOKENS = 2**31 - 1
_OPTIONAL_SAMPLING = [
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
]


# ---------------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error the HTTP layer returns as `{"error": {...}}` with `status` (and `headers`, e.g. Retry-After)."""

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.message = status, type, message
        self.param, self.code, self.retry_after = param, code, retry_after

    @classmethod
    def invalid(cls, message: str, param: str | None = None) -> ApiError:
        return cls(400, "invalid_request_error", message, param)

    @classmethod
    def unauthorized(cls, message: str = "Invalid or missing API key") -> ApiError:
        return cls(401, "authentication_error", message, code="invalid_api_key")

    @classmethod
    def unavailable(cls, message: str, code: str = "overloaded", retry_after: float = 1.0) -> ApiError:
        return cls(503, "service_unavailable", message, code=code, retry_after=retry_after)

    @classmethod
    def internal(cls, message: str = "The server had an error while processing the request") -> ApiError:
        return cls(500, "server_error", message)

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(math.ceil(self.retry_after))}

    def to_json(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Ray is not imported here; its errors are recognised by class name (any class in the MRO).
_RAY_OVERLOADED = {"BackPressureError"}
# ServiceUnavailableError: the Dispatcher's "no replica could finish the request" (it imports Ray).
_RAY_UNAVAILABLE = {
    "ServiceUnavailableError",
    "RayActorError",
    "ActorUnavailableError",
    "DeploymentUnavailableError",
    "ReplicaUnavailableError",
}


def from_exception(e: BaseException) -> ApiError:
    """The API error for any exception; unknown ones become a 500 that does not leak internals."""
    if isinstance(e, ApiError):
        return e
    cause = getattr(e, "cause", None)  # ray.exceptions.RayTaskError wraps the deployment's own exception
    if isinstance(cause, BaseException) and cause is not e:
        return from_exception(cause)
    names = {c.__name__ for c in type(e).__mro__}
    if isinstance(e, InvalidRequestError):
        return ApiError.invalid(str(e), e.field)
    if isinstance(e, ValidationError) or "RequestValidationError" in names:  # pydantic / FastAPI body errors
        return from_validation_errors(e.errors())  # type: ignore[attr-defined]
    if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):
        return ApiError.invalid("The request body is not valid JSON")
    if isinstance(e, (OutOfBlocksError, PreemptedError)) or names & _RAY_OVERLOADED:
        return ApiError.unavailable("The server is overloaded; retry shortly", code="overloaded")
    if isinstance(e, TransferError) or names & _RAY_UNAVAILABLE:
        # Includes errors.AuthenticationError: a KV peer failed the cluster handshake, not the client.
        return ApiError.unavailable(
            "A serving worker is unavailable; retry shortly", code="service_unavailable"
        )
    if isinstance(e, (ModelConfigError, WeightLoadError, PairMismatchError)):
        return ApiError(500, "server_error", "The model pair is misconfigured", code="model_config_error")
    return ApiError.internal()


def _param(loc: Sequence[int | str]) -> str | None:
    # pydantic adds union-branch tags ("str", "list[int]", "function-after[...]") to loc: not field names.
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:  # FastAPI prefixes "body"
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" not in part and part not in {"str", "int", "float", "bool", "list", "dict", "none"}:
            out += f".{part}" if out else part
    return out or None


def from_validation_errors(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    """A 400 naming the field of the first error (its deepest variant when a union produced several)."""
    if not errors:
        return ApiError.invalid("Invalid request body")
    if errors[0].get("type") == "json_invalid":
        why = errors[0].get("ctx", {}).get("error", "")
        return ApiError.invalid(f"The request body is not valid JSON: {why}")
    params = [_param(e.get("loc", ())) or "" for e in errors]

    def top(p: str) -> str:
        return p.split(".")[0].split("[")[0]

    same = [i for i, p in enumerate(params) if top(p) == top(params[0])]
    i = max(same, key=lambda i: len(params[i]))
    param, msg = params[i] or None, str(errors[i].get("msg", "invalid value"))
    if param is None:
        is_object = errors[i].get("type") not in ("model_type", "model_attributes_type")
        return ApiError.invalid(msg if is_object else "The request body must be a JSON object")
    if params.count(params[i]) > 1:  # every branch of a union failed here: name the type actually sent
        msg = f"invalid type ({_json_type(errors[i].get('input'))})"
    return ApiError.invalid(f"{param}: {msg}", param)


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# -------------------------------------------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool | None = False


class _Request(BaseModel):
    """Parameters shared by both endpoints. None means the default, as the OpenAI spec allows `null`."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    top_k: StrictInt | None = None  # vLLM extension: -1 / 0 disable
    min_p: StrictFloat | None = None
    repetition_penalty: StrictFloat | None = None
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    seed: StrictInt | None = None
    n: StrictInt | None = 1
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool | None = False
    user: Any = None  # accepted and ignored
    logit_bias: dict[str, Any] | None = None  # unsupported: rejected when non-empty

    @property
    def num_choices(self) -> int:
        return 1 if self.n is None else self.n

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _check_common(self) -> None:
        if not 1 <= self.num_choices <= MAX_N:
            raise ApiError.invalid(f"n must be in [1, {MAX_N}], got {self.n}", "n")
        if self.stream_options is not None and not self.stream:
            raise ApiError.invalid("stream_options is only allowed when stream is true", "stream_options")
        if self.logit_bias:
            raise ApiError.invalid("logit_bias is not supported", "logit_bias")


class CompletionRequest(_Request):
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    max_tokens: StrictInt | None = DEFAULT_COMPLETION_MAX_TOKENS
    logprobs: StrictInt | None = None
    echo: StrictBool | None = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        self._check_common()
        p = self.prompt
        if isinstance(p, list) and p and not isinstance(p[0], int):
            # A list of prompts is a batch; a batch of one is common from clients and means that one prompt.
            if len(p) != 1:
                raise ApiError.invalid(
                    f"batched prompts are not supported ({len(p)} prompts); send one prompt per request",
                    "prompt",
                )
            self.prompt = p[0]
        if self.prompt == []:
            raise ApiError.invalid("prompt is empty", "prompt")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise ApiError.invalid(
                f"logprobs must be in [0, {MAX_COMPLETION_LOGPROBS}], got {self.logprobs}", "logprobs"
            )
        if self.echo and self.logprobs is not None:
            raise ApiError.invalid("echo together with logprobs is not supported", "echo")
        if self.best_of is not None and self.best_of != self.num_choices:
            raise ApiError.invalid("best_of is not supported (it must equal n)", "best_of")
        if self.suffix:
            raise ApiError.invalid("suffix is not supported", "suffix")
        return self

    @property
    def single_prompt(self) -> str | list[int]:
        assert isinstance(self.prompt, str) or all(isinstance(t, int) for t in self.prompt)
        return self.prompt  # type: ignore[return-value]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    # "developer" is what newer clients send in place of "system".
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None  # accepted and ignored

    def as_template_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = None
    # Tools and structured output are not implemented; rejecting beats silently ignoring them.
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        self._check_common()
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ApiError.invalid(
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}", "top_logprobs"
            )
        if self.top_logprobs and not self.logprobs:
            raise ApiError.invalid("top_logprobs requires logprobs to be true", "top_logprobs")
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise ApiError.invalid(f"{name} are not supported", name)
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ApiError.invalid("only response_format {'type': 'text'} is supported", "response_format")
        return self

    def template_messages(self) -> list[dict[str, str]]:
        """Messages as the chat template expects them: plain-string content, `developer` as `system`."""
        return [m.as_template_dict() for m in self.messages]


AnyRequest = CompletionRequest | ChatCompletionRequest
_R = TypeVar("_R", CompletionRequest, ChatCompletionRequest)


def parse_request(cls: type[_R], body: bytes | str | Mapping[str, Any]) -> _R:
    """Validate a raw body (bytes / str JSON) or an already decoded mapping; every failure is a 400 ApiError."""
    try:
        if isinstance(body, (bytes, str)):
            return cls.model_validate_json(body)
        return cls.model_validate(body)
    except ValidationError as e:
        raise from_validation_errors(e.errors()) from None


def to_sampling_params(
    request: AnyRequest, choice: int = 0, *, default_max_tokens: int | None = None
) -> SamplingParams:
    """Sampling parameters of one choice. With a seed, choice i uses seed + i: choices differ, yet each is
    reproducible. Completions default to max_tokens=16 as in OpenAI; a chat without a limit gets
    `default_max_tokens` (the Router may pass the room left in the context), else runs to the context limit."""
    fields = {"logprobs": "logprobs"}  # SamplingParams field -> the request parameter it came from
    if isinstance(request, CompletionRequest):
        max_tokens, logprobs = request.max_tokens, request.logprobs
        if max_tokens is None:
            max_tokens = DEFAULT_COMPLETION_MAX_TOKENS
    else:
        if request.max_completion_tokens is not None:
            max_tokens, fields["max_tokens"] = request.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens = request.max_tokens
        if max_tokens is None:
            max_tokens = default_max_tokens if default_max_tokens is not None else UNBOUNDED_MAX_TOKENS
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        fields["logprobs"] = "top_logprobs"
    optional = {k: getattr(request, k) for k in _OPTIONAL_SAMPLING}  # None: SamplingParams default
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            seed=None if request.seed is None else request.seed + choice,
            stop=(request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ()),
            stop_token_ids=tuple(request.stop_token_ids or ()),
            ignore_eos=bool(request.ignore_eos),
            logprobs=logprobs,
            **{k: v for k, v in optional.items() if v is not None},
        )
    except InvalidRequestError as e:
        field, message = fields.get(e.field or "", e.field), str(e)
        if e.field and field != e.field and message.startswith(e.field):
            message = f"{field}{message[len(e.field) :]}"  # name the parameter the client actually sent
        raise ApiError.invalid(message, field) from None


def choice_sampling_params(
    request: AnyRequest, *, default_max_tokens: int | None = None
) -> list[SamplingParams]:
    """`to_sampling_params` for every one of the request's n choices."""
    return [
        to_sampling_params(request, i, default_max_tokens=default_max_tokens)
        for i in range(request.num_choices)
    ]


def encode_prompt(
    request: AnyRequest, tokenizer: Any, *, vocab_size: int | None = None, max_model_len: int | None = None
) -> list[int]:
    """Prompt token ids (chat rendered through the tokenizer's chat template), checked like `LLM` does."""
    field = "prompt"
    try:
        if isinstance(request, ChatCompletionRequest):
            field = "messages"
            ids = encode_chat(tokenizer, request.template_messages())
        elif isinstance(request.single_prompt, str):
            ids = list(tokenizer(request.single_prompt)["input_ids"])
        else:
            ids = list(request.single_prompt)
            if any(t < 0 or (vocab_size is not None and t >= vocab_size) for t in ids):
                raise ApiError.invalid(
                    f"prompt token ids must be in [0, {vocab_size or 'vocab size'})", "prompt"
                )
    except InvalidRequestError as e:
        raise ApiError.invalid(str(e), e.field or field) from None
    if not ids:
        raise ApiError.invalid(f"{field} is empty", field)
    if max_model_len is not None and len(ids) >= max_model_len:
        raise ApiError.invalid(
            f"the prompt has {len(ids)} tokens; the context limit is {max_model_len} "
            "(prompt plus at least one generated token)",
            field,
        )
    return ids


# ------------------------------------------------------------------------------------------------ model names


def parse_model(name: str, pair_name: str) -> Mode:
    """`<pair>` and `<pair>:overfill` run OverFill; `<pair>:full` / `<pair>:pruned` run one model for both."""
    if name == pair_name:
        return Mode.OVERFILL
    for mode in Mode:
        if name == f"{pair_name}:{mode.value}":
            return mode
    raise ApiError(404, "not_found_error", f"The model '{name}' does not exist", "model", "model_not_found")


def model_names(pair_name: str) -> list[tuple[str, Mode]]:
    return [(pair_name, Mode.OVERFILL)] + [(f"{pair_name}:{m.value}", m) for m in Mode]
