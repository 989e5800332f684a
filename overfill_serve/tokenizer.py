"""Tokenizer loading (local directories only) and chat-template encoding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from overfill_serve.errors import InvalidRequestError, ModelConfigError


def load_tokenizer(model_dir: str | Path) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:
        # AutoTokenizer validates the model's config.json too, and transformers refuses OverFill students
        # whose hidden size is not a multiple of the head count (1689 / 24); tokenizer.json alone suffices.
        if (Path(model_dir) / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(str(model_dir), local_files_only=True)
        raise ModelConfigError(f"{model_dir}: cannot load a tokenizer: {e}") from e


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation rendered by the model's chat template, ready for the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model's tokenizer has no chat template", field="messages")
    if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise InvalidRequestError(
            "messages must be a non-empty list of {role, content} objects", field="messages"
        )
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
