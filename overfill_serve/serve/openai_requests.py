"""OpenAI-compatible requests: pydantic models, validation and sampling parameters.

Pure protocol code (no Ray, no HTTP framework): the ingress parses a body with `parse_request`, then
`prepare_choices` gives every choice its prompt's token ids and its `SamplingParams` (a completions request
may carry a batch of prompts: prompt i's choice j is choice i * n + j). Every invalid request raises a 400
`ApiError` naming the parameter; so does a known OpenAI / vLLM parameter this server does not implement
(`UNSUPPORTED`), rather than being silently ignored. Model names resolve through
`model_names.resolve_model`, errors map to OpenAI error bodies in `openai_errors`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, TypeVar

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
MAX_BATCH_CHOICES = 256  # prompts x n in one completions request
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
    continuous_usage_stats: StrictBool | None = False  # vLLM: usage on every chunk


# Known parameters this server does not implement, each with the values that ask for nothing (a client may
# send the default): any other value is a 400 naming the parameter.
_UNSET: tuple[Any, ...] = (None, False, [], {}, "")
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    name: _UNSET
    for name in (
        "tools",
        "functions",
        "function_call",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "structured_outputs",
        "logits_processors",
        "allowed_token_ids",
        "bad_words",
        "truncate_prompt_tokens",
        "use_beam_search",
        "prompt_embeds",
        "return_tokens_as_token_ids",
        "audio",
        "prediction",
    )
} | {"tool_choice": (*_UNSET, "none"), "modalities": (*_UNSET, ["text"])}
CHAT_UNSUPPORTED = (
    UNSUPPORTED
    | {
        name: _UNSET
        for name in (
            "echo",
            "prompt_logprobs",  # scoring is a /v1/completions feature here
            "continuation_start",
            "continue_final_message",
            "chat_template",
            "chat_template_kwargs",
        )
    }
    | {"add_generation_prompt": (None, True)}
)


def _is_unset(value: Any, allowed: tuple[Any, ...]) -> bool:
    return any(type(value) is type(a) and value == a for a in allowed)  # 0 is not False here


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
    include_stop_str_in_output: StrictBool | None = False
    skip_special_tokens: StrictBool | None = True
    min_tokens: StrictInt | None = None
    seed: StrictInt | None = None
    n: StrictInt | None = 1
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool | None = False
    user: Any = None  # accepted and ignored
    logit_bias: dict[StrictStr, StrictInt | StrictFloat] | None = None  # token id (a string in JSON) -> bias
    unsupported: ClassVar[dict[str, tuple[Any, ...]]] = UNSUPPORTED

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for name, allowed in cls.unsupported.items():
                if name in data and not _is_unset(data[name], allowed):
                    raise ApiError.invalid(f"{name} is not supported by this server", name)
        return data

    @property
    def num_choices(self) -> int:
        return 1 if self.n is None else self.n

    @property
    def num_outputs(self) -> int:
        """Choices in the response: n per prompt."""
        return self.num_choices

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.continuous_usage_stats)

    def token_bias(self) -> dict[int, float]:
        """logit_bias with its keys as token ids; a key that is not one is a 400."""
        out = {}
        for key, value in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ApiError.invalid(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
            out[int(key)] = float(value)
        return out

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _check_common(self) -> None:
        if not 1 <= self.num_choices <= MAX_N:
            raise ApiError.invalid(f"n must be in [1, {MAX_N}], got {self.n}", "n")
        if self.stream_options is not None and not self.stream:
            raise ApiError.invalid("stream_options is only allowed when stream is true", "stream_options")
        self.token_bias()


class CompletionRequest(_Request):
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    max_tokens: StrictInt | None = DEFAULT_COMPLETION_MAX_TOKENS
    logprobs: StrictInt | None = None
    echo: StrictBool | None = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None
    prompt_logprobs: StrictInt | None = None  # vLLM: score the prompt, k alternatives per token
    # The OverFill split for scoring (this server's extension): the index of each prompt's first continuation
    # token; one for all prompts, or a list with one per prompt.
    continuation_start: StrictInt | list[StrictInt] | None = None

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        self._check_common()
        if self.prompt == []:
            raise ApiError.invalid("prompt is empty", "prompt")
        if self.num_outputs > MAX_BATCH_CHOICES:
            raise ApiError.invalid(
                f"{len(self.prompts)} prompts x n={self.num_choices} choices is over the "
                f"{MAX_BATCH_CHOICES} one request may ask for",
                "prompt",
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise ApiError.invalid(
                f"logprobs must be in [0, {MAX_COMPLETION_LOGPROBS}], got {self.logprobs}", "logprobs"
            )
        starts = self.continuation_start
        if isinstance(starts, list) and len(starts) != len(self.prompts):
            raise ApiError.invalid(
                f"continuation_start has {len(starts)} entries for {len(self.prompts)} prompts",
                "continuation_start",
            )
        if self.best_of is not None and self.best_of != self.num_choices:
            raise ApiError.invalid("best_of is not supported (it must equal n)", "best_of")
        if self.suffix:
            raise ApiError.invalid("suffix is not supported", "suffix")
        return self

    @property
    def is_batch(self) -> bool:
        """A list of prompts (of strings or of token-id lists), even a list of one."""
        return isinstance(self.prompt, list) and bool(self.prompt) and not isinstance(self.prompt[0], int)

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts, in order: one unless the request is a batch."""
        if self.is_batch:
            return list(self.prompt)  # type: ignore[arg-type]
        return [self.prompt]  # type: ignore[list-item]

    @property
    def num_outputs(self) -> int:
        return len(self.prompts) * self.num_choices

    @property
    def echo_logprobs(self) -> bool:
        """Echo with logprobs: the prompt's tokens are scored too, as vLLM does."""
        return bool(self.echo) and self.logprobs is not None

    def continuation_starts(self) -> list[int | None]:
        """Each prompt's continuation start."""
        starts = self.continuation_start
        return list(starts) if isinstance(starts, list) else [starts] * len(self.prompts)


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
    # Structured output is not implemented: only the default, text, is accepted.
    response_format: dict[str, Any] | None = None
    unsupported: ClassVar[dict[str, tuple[Any, ...]]] = CHAT_UNSUPPORTED

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        self._check_common()
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ApiError.invalid(
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}", "top_logprobs"
            )
        if self.top_logprobs and not self.logprobs:
            raise ApiError.invalid("top_logprobs requires logprobs to be true", "top_logprobs")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ApiError.invalid("only response_format {'type': 'text'} is supported", "response_format")
        return self

    def template_messages(self) -> list[dict[str, str]]:
        """Messages with plain-string content, for `PromptEncoder.chat`."""
        return [m.as_template_dict() for m in self.messages]


AnyRequest = CompletionRequest | ChatCompletionRequest
_R = TypeVar("_R", bound=BaseModel)


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
    scoring: dict[str, Any] = {}
    if isinstance(request, CompletionRequest):
        max_tokens, logprobs = request.max_tokens, request.logprobs
        if max_tokens is None:
            max_tokens = DEFAULT_COMPLETION_MAX_TOKENS
        wanted = [request.prompt_logprobs, request.logprobs if request.echo_logprobs else None]
        if any(k is not None for k in wanted):
            scoring["prompt_logprobs"] = max(k for k in wanted if k is not None)
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
            include_stop_str_in_output=bool(request.include_stop_str_in_output),
            skip_special_tokens=request.skip_special_tokens is not False,
            min_tokens=request.min_tokens or 0,
            logit_bias=tuple(request.token_bias().items()),
            logprobs=logprobs,
            **scoring,
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


def encode_prompts(request: AnyRequest, prompts: PromptEncoder) -> list[list[int]]:
    """Each prompt's token ids (a chat rendered through the model's chat template), checked as every API
    checks them: a bad prompt raises `InvalidRequestError`, a 400 naming the field (`prompt[i]` in a batch)."""
    if isinstance(request, ChatCompletionRequest):
        return [prompts.chat(request.template_messages())]
    if not request.is_batch:
        return [prompts.encode(request.prompts[0])]
    return [prompts.encode(p, f"prompt[{i}]") for i, p in enumerate(request.prompts)]


def prepare_choices(
    request: AnyRequest, prompts: PromptEncoder
) -> tuple[list[list[int]], list[SamplingParams]]:
    """Every choice's prompt token ids and sampling parameters, checked (token ids against the vocabulary
    too). Prompt i's choice j is choice i * n + j, and uses the seed + j a request of that prompt alone
    would, so a batch answers what its prompts sent one by one would."""
    ids = encode_prompts(request, prompts)
    room = prompts.max_model_len - len(ids[0])  # the chat default; completions default to 16 tokens
    params = [prompts.check_params(p) for p in choice_sampling_params(request, default_max_tokens=room)]
    if not isinstance(request, CompletionRequest) or request.continuation_start is None:
        return [p for p in ids for _ in params], params * len(ids)
    split = []  # each prompt's choices with its continuation start, checked against its length
    for prompt, start in zip(ids, request.continuation_starts()):
        for p in params:
            split.append(dataclasses.replace(p, continuation_start=start))
            split[-1].check_prompt(len(prompt))
    return [p for p in ids for _ in params], split
