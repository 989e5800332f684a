"""vLLM's `POST /tokenize` and `POST /detokenize`: the served tokenizer, through the one `PromptEncoder`.

Pure protocol code (no Ray, no HTTP framework). `/tokenize` takes `{model?, prompt, add_special_tokens?}` or
`{model?, messages, add_generation_prompt?, add_special_tokens?}` and answers `{count, max_model_len,
tokens}`; a text longer than the context is still counted (this is how clients measure one). `/detokenize`
takes `{model?, tokens}` and answers `{prompt}`. A `model`, when given, must be one this app serves (404).
`GET /tokenizer_info` describes the tokenizer (its class, special tokens, chat template, context limit) as
vLLM does: with these three, clients such as lm-eval (`tokenizer_backend=remote`) tokenize through the
server and need no local copy of it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from overfill_serve.prompt import PromptEncoder
from overfill_serve.serve.model_names import resolve_model
from overfill_serve.serve.openai_errors import ApiError
from overfill_serve.serve.openai_requests import ChatMessage, parse_request


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_generation_prompt: StrictBool = True
    add_special_tokens: StrictBool | None = None  # default: True for a prompt, False for messages (vLLM's)

    @model_validator(mode="after")
    def _check(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ApiError.invalid("give either prompt or messages", "prompt")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    tokens: list[StrictInt]


def tokenize(body: bytes, prompts: PromptEncoder, pair_name: str) -> dict[str, Any]:
    """The body of a `/tokenize` answer; a bad request raises a 400 (404 for a model not served)."""
    request = parse_request(TokenizeRequest, body)
    if request.model is not None:
        resolve_model(request.model, pair_name)
    if request.messages is not None:
        messages = [m.as_template_dict() for m in request.messages]
        ids = prompts.render_chat(messages, request.add_generation_prompt, bool(request.add_special_tokens))
    else:
        assert request.prompt is not None
        ids = prompts.tokenize(request.prompt, request.add_special_tokens is not False)
    return {"count": len(ids), "max_model_len": prompts.max_model_len, "tokens": ids}


def detokenize(body: bytes, prompts: PromptEncoder, pair_name: str) -> dict[str, Any]:
    """The body of a `/detokenize` answer: the text of token ids of this vocabulary."""
    request = parse_request(DetokenizeRequest, body)
    if request.model is not None:
        resolve_model(request.model, pair_name)
    bad = [t for t in request.tokens if not 0 <= t < prompts.vocab_size]
    if bad:
        raise ApiError.invalid(
            f"token id {bad[0]} is outside the vocabulary [0, {prompts.vocab_size})", "tokens"
        )
    return {"prompt": prompts.tokenizer.decode(request.tokens)}


def tokenizer_info(prompts: PromptEncoder) -> dict[str, Any]:
    """The body of a `/tokenizer_info` answer."""
    tok = prompts.tokenizer
    special = ("bos_token", "eos_token", "pad_token", "unk_token")
    return {
        "tokenizer_class": type(tok).__name__,
        **{name: getattr(tok, name, None) for name in special},
        "chat_template": getattr(tok, "chat_template", None),
        "model_max_length": prompts.max_model_len,
    }
