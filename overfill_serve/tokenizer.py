"""Tokenizer loading, from local directories only (prompts are encoded by `prompt.PromptEncoder`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from overfill_serve.errors import ModelConfigError


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
