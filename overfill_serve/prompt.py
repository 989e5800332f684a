"""`PromptEncoder`: a prompt (text, token ids or a chat) to checked token ids.

The one place prompts are encoded and validated: `LLM`, the workers, the HTTP and the gRPC APIs all use it,
so a bad prompt gets the same `InvalidRequestError` (and text) whichever way it came in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from overfill_serve.errors import InvalidRequestError
from overfill_serve.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from overfill_serve.engine.config import EngineConfig
    from overfill_serve.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, str]
# The chat roles every API accepts, as the chat template gets them: "developer" is what newer OpenAI clients
# send in place of "system".
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class PromptEncoder:
    tokenizer: Any
    vocab_size: int
    max_model_len: int  # prompt plus output; a prompt needs room for at least one generated token

    @classmethod
    def for_pair(
        cls, teacher_dir: Path, student_dir: Path, prefill: EngineConfig, decode: EngineConfig
    ) -> PromptEncoder:
        """The encoder of a disaggregated pair, from its config files alone (no weights): the context limit
        is the tighter of the two pools' (each pool's worker checks its own again)."""
        from overfill_serve.model.spec import ModelSpec

        teacher, student = ModelSpec.from_dir(teacher_dir), ModelSpec.from_dir(student_dir)
        limit = min(
            prefill.context_limit(teacher.max_position_embeddings),
            decode.context_limit(student.max_position_embeddings),
        )
        return cls(load_tokenizer(teacher_dir), teacher.vocab_size, limit)

    def encode(self, prompt: Prompt, field: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            return self.check(self.tokenize(prompt), field)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return self.check(prompt, field)
        raise InvalidRequestError("a prompt is a string or a list of token ids", field=field)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The text's token ids, unchecked (`encode` checks them as a prompt)."""
        if not text:
            return []  # "" may still give a BOS
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def chat(self, messages: Sequence[Message]) -> list[int]:
        """A conversation rendered by the model's chat template, ready for the assistant's turn."""
        return self.check(self.render_chat(messages), "messages")

    def render_chat(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
    ) -> list[int]:
        """The chat template's token ids for `messages` (roles checked), not yet checked as a prompt. The
        template spells the special tokens it wants: the tokenizer adds none unless asked."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("this model's tokenizer has no chat template", field="messages")
        if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise InvalidRequestError(
                "messages must be a non-empty list of {role, content} objects", field="messages"
            )
        for i, m in enumerate(messages):
            if m["role"] not in CHAT_ROLES:
                field = f"messages[{i}].role"
                raise InvalidRequestError(
                    f"{field} must be one of {', '.join(CHAT_ROLES)}, got {m['role']!r}", field=field
                )
        rendered = [{"role": CHAT_ROLES[m["role"]], "content": m["content"]} for m in messages]
        text = self.tokenizer.apply_chat_template(
            rendered, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        return self.tokenize(text, add_special_tokens=add_special_tokens)

    def check_params(self, params: SamplingParams) -> SamplingParams:
        """`params` if every token id it names (stop_token_ids, logit_bias) is in the vocabulary."""
        named = {"stop_token_ids": params.stop_token_ids, "logit_bias": [t for t, _ in params.logit_bias]}
        for field, ids in named.items():
            bad = [t for t in ids if t >= self.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"{field} names token id {bad[0]}, outside the vocabulary [0, {self.vocab_size})",
                    field=field,
                )
        return params

    def check(self, token_ids: Sequence[int], field: str = "prompt") -> list[int]:
        """The ids, as a list, if they make a prompt this engine can serve; else `InvalidRequestError`."""
        if not token_ids:
            raise InvalidRequestError(f"{field} is empty", field=field)
        if any(not 0 <= t < self.vocab_size for t in token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})", field=field)
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(token_ids)} tokens; the context limit is {self.max_model_len} "
                "(prompt plus at least one generated token)",
                field=field,
            )
        return list(token_ids)
