"""Tiny random-weight pairs of the real architectures, built with the project's own tools once per session."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from overfill_serve.model.prune import prune_model
from overfill_serve.model.random_model import make_random_model

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
CALIBRATION_TOKENS = 256
# The released 3B -> 1B OverFill decoder's config.json (hidden 1689 with 24 heads: transformers refuses it).
RELEASED_DECODER = {
    "model_type": "llama",
    "hidden_size": 1689,
    "intermediate_size": 4505,
    "num_hidden_layers": 28,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "rope_theta": 500000.0,
    "eos_token_id": [128001, 128008, 128009],
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}


def edited_checkpoint(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of the model directory `src` whose weights `edit` changes in place."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


@dataclass(frozen=True)
class Pair:
    teacher: Path
    student: Path
    kept_layers: list[int] | None  # teacher layers the student's layers attend to (None: all)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    return make_random_model(
        tmp_path_factory.mktemp("teacher"), num_layers=4, hidden_size=64, intermediate_size=128
    )


def _make_pair(tmp_path_factory, kind: str) -> Pair:
    root = tmp_path_factory.mktemp(kind)
    if kind == "identity":
        t = make_random_model(root / "t", num_layers=4)
        return Pair(t, t, None)
    if kind == "width":  # hidden 42 is not a multiple of the 4 heads, as in the released 1689 / 24 decoder
        t = make_random_model(root / "t", num_layers=4)
        s = prune_model(
            t, root / "s", hidden_size=42, intermediate_size=80, max_calibration_tokens=CALIBRATION_TOKENS
        ).out_dir
        return Pair(t, s, None)
    if kind == "depth":
        t = make_random_model(root / "t", num_layers=4)
        report = prune_model(
            t, root / "s", num_layers=2, kept_layers="firstlast", max_calibration_tokens=CALIBRATION_TOKENS
        )
        return Pair(t, report.out_dir, list(report.kept_layers))
    if kind == "qwen2":  # q/k/v bias, untied head
        t = make_random_model(root / "t", model_type="qwen2", num_layers=3, tie_word_embeddings=False)
        s = prune_model(
            t, root / "s", hidden_size=48, intermediate_size=96, max_calibration_tokens=CALIBRATION_TOKENS
        ).out_dir
        return Pair(t, s, None)
    if kind == "llama3_rope":  # positions run past original_max_position_embeddings=32 in the tests
        t = make_random_model(
            root / "t", num_layers=3, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0, attention_bias=True
        )
        s = prune_model(
            t, root / "s", hidden_size=40, intermediate_size=64, max_calibration_tokens=CALIBRATION_TOKENS
        ).out_dir
        return Pair(t, s, None)
    raise ValueError(kind)


PAIR_KINDS = ("identity", "width", "depth", "qwen2", "llama3_rope")
# The portable CPU path, and the GPU path's defaults run on CPU (Triton kernels interpreted, the CUDA-graph
# decode buffers without capture, padded weights) with a prefill budget that chunks prompts.
ENGINES = {
    "torch": {},
    "gpu_path": dict(
        attention_backend="triton", cuda_graphs=True, pad_to_multiple=64, max_num_batched_tokens=16
    ),
}


@pytest.fixture(scope="session")
def pairs(tmp_path_factory) -> dict[str, Pair]:
    return {kind: _make_pair(tmp_path_factory, kind) for kind in PAIR_KINDS}


@pytest.fixture(scope="session")
def width_pair(pairs) -> Pair:
    return pairs["width"]
