"""lm-eval's `custom_dataset` for the tasks in this directory: their JSONL, found next to the YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _here(files: Any) -> Any:
    if isinstance(files, str):
        return str(HERE / files)
    if isinstance(files, dict):
        return {split: _here(f) for split, f in files.items()}
    return [_here(f) for f in files]


def load(data_files: Any, **metadata: Any) -> Any:
    """The `json` dataset of `data_files` (a name, list or {split: name}, relative to this directory).
    `metadata` is what lm-eval passes every custom dataset (the task's metadata and model args): unused."""
    import datasets

    return datasets.load_dataset("json", data_files=_here(data_files))
