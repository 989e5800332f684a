"""`ModelPair`: the prefill (teacher) and decode (student) models, their tokenizer and the KV layout they share.

`check_pair` compares everything a student needs to decode on a teacher's KV and reports every mismatch at
once; the same `KVLayout` is checked again at each KV-channel handshake.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from overfill_serve.errors import ModelConfigError, PairMismatchError
from overfill_serve.model.llama import CausalLM
from overfill_serve.model.loader import load_model, parse_dtype
from overfill_serve.model.spec import KVLayout, ModelSpec, resolve_kept_layers
from overfill_serve.tokenizer import load_tokenizer


@dataclass(frozen=True)
class FieldComparison:
    name: str
    teacher: Any
    student: Any
    ok: bool


def compare_pair(
    teacher: ModelSpec,
    student: ModelSpec,
    kept_layers: str | list[int] | tuple[int, ...] | None = None,
    teacher_dtype: str = "float32",
    student_dtype: str = "float32",
) -> list[FieldComparison]:
    """Field-by-field comparison of what the student's attention needs from the teacher's KV."""
    rows = [
        FieldComparison(
            name,
            getattr(teacher, attr),
            getattr(student, attr),
            getattr(teacher, attr) == getattr(student, attr),
        )
        for name, attr in (
            ("num_kv_heads", "num_kv_heads"),
            ("head_dim", "head_dim"),
            ("rope", "rope"),
            ("vocab_size", "vocab_size"),
            ("eos_token_ids", "eos_token_ids"),
        )
    ]
    rows.append(FieldComparison("dtype", teacher_dtype, student_dtype, teacher_dtype == student_dtype))
    strategy = kept_layers if kept_layers is not None else student.kept_layers
    try:
        kept: Any = resolve_kept_layers(strategy, teacher.num_layers, student.num_layers)
        ok = True
    except ModelConfigError as e:
        kept, ok = str(e), False
    rows.append(FieldComparison("layers (teacher -> kept map)", teacher.num_layers, kept, ok))
    return rows


def check_pair(
    teacher: ModelSpec,
    student: ModelSpec,
    kept_layers: str | list[int] | tuple[int, ...] | None = None,
    teacher_dtype: str = "float32",
    student_dtype: str = "float32",
    block_size: int = 16,
) -> KVLayout:
    """The pair's KV layout, or a `PairMismatchError` listing every mismatching field."""
    rows = compare_pair(teacher, student, kept_layers, teacher_dtype, student_dtype)
    bad = [f"{r.name}: teacher {r.teacher!r} vs student {r.student!r}" for r in rows if not r.ok]
    if bad:
        raise PairMismatchError(bad)
    kept = resolve_kept_layers(
        kept_layers if kept_layers is not None else student.kept_layers,
        teacher.num_layers,
        student.num_layers,
    )
    return KVLayout(
        num_teacher_layers=teacher.num_layers,
        kept_layers=kept,
        num_kv_heads=teacher.num_kv_heads,
        head_dim=teacher.head_dim,
        rope=teacher.rope,
        vocab_size=teacher.vocab_size,
        eos_token_ids=teacher.eos_token_ids,
        dtype=teacher_dtype,
        block_size=block_size,
    )


def student_layout(
    student: ModelSpec,
    kept_layers: str | list[int] | tuple[int, ...] | None,
    num_teacher_layers: int | None,
    dtype: str,
    block_size: int,
) -> KVLayout:
    """The KV layout a decode worker expects from the teacher, from the student alone: its kept-layer map
    (argument, or its config) and, when known, the teacher's depth. A depth-pruned student's map names
    teacher layers, so without the teacher's depth the highest kept layer bounds it."""
    strategy = kept_layers if kept_layers is not None else student.kept_layers
    if num_teacher_layers is None:
        explicit = isinstance(strategy, (tuple, list))
        num_teacher_layers = max(int(i) for i in strategy) + 1 if explicit else student.num_layers  # type: ignore[union-attr]
    kept = resolve_kept_layers(strategy, num_teacher_layers, student.num_layers)
    return KVLayout(
        num_teacher_layers,
        kept,
        student.num_kv_heads,
        student.head_dim,
        student.rope,
        student.vocab_size,
        student.eos_token_ids,
        dtype,
        block_size,
    )


@dataclass(frozen=True)
class ModelPair:
    teacher: CausalLM
    student: CausalLM
    tokenizer: Any
    layout: KVLayout

    @classmethod
    def load(
        cls,
        prefill_model: str | Path,
        decode_model: str | Path,
        dtype: str = "float32",
        device: str | torch.device = "cpu",
        kept_layers: str | list[int] | None = None,
        block_size: int = 16,
    ) -> ModelPair:
        parse_dtype(dtype)
        teacher_spec, student_spec = ModelSpec.from_dir(prefill_model), ModelSpec.from_dir(decode_model)
        # Check before loading any weights: a mismatched pair fails in milliseconds.
        layout = check_pair(teacher_spec, student_spec, kept_layers, dtype, dtype, block_size)
        teacher = load_model(prefill_model, dtype, device, teacher_spec)
        same = Path(prefill_model).resolve() == Path(decode_model).resolve()
        student = teacher if same else load_model(decode_model, dtype, device, student_spec)
        return cls(teacher, student, load_tokenizer(prefill_model), layout)
