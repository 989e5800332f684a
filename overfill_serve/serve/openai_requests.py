"""OpenAI-compatible requests: pydantic models, validation and sampling parameters.

Pure protocol code (no Ray, no HTTP framework): the ingress parses a body with `parse_request`, builds one
`SamplingParams` per choice with `to_sampling_params` and the prompt's token ids with `encode_prompt`. Every
invalid request raises a 400 `ApiError` naming the parameter. Model names resolve through
`model_names.resolve_model`, errors map to OpenAI error bodies in `openai_errors`.
"""

from __future__ import annotations

from collections.abc import Mapping
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

from overfill_serve.errors import InvalidRequestError
from overfill_serve.prompt import PromptEncoder
from overfill_serve.sampling_params import FLOAT_FIELDS, SamplingParams
from overfill_serve.serve.openai_errors import ApiError, from_validation_errors

MAX_N = 8
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API allows 0..5 alternatives
MAX_TOP_LOGPROBS = 20
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Chat has no default limit in OpenAI: generation runs to the context limit, where the engine stops anyway.
UNBOUNDED_MAX_TOKENS = 2**31 - 1
_OPTIONAL_SAMPLING = (*FLOAT_FIELDS, "top_k")


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
    role: StrictStr  # checked (and "developer" mapped) by the PromptEncoder, as for gRPC
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None  # accepted and ignored

    def as_template_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


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
        """Messages with plain-string content, for `PromptEncoder.chat`."""
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
    `default_max_tokens` (the ingress may pass the room left in the context), else runs to the context limit."""
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


def encode_prompt(request: AnyRequest, prompts: PromptEncoder) -> list[int]:
    """Prompt token ids (a chat rendered through the model's chat template), checked as every API checks
    them: a bad prompt raises `InvalidRequestError`, a 400 naming the field."""
    if isinstance(request, ChatCompletionRequest):
        return prompts.chat(request.template_messages())
    return prompts.encode(request.single_prompt)
