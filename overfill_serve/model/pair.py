"""`ModelPair`: the prefill (teacher) and decode (student) models, their tokenizer and the KV layout they share.

`check_pair` compares everything a student needs to decode on a teacher's KV and reports every mismatch at
once; the same `KVLayout` is checked again at each KV-channel handshake.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from overfill_serve.errors import ModelConfigError, PairMismatchError
from overfill_serve.model.llama import CausalLM
from overfill_serve.model.loader import load_model
from overfill_serve.model.spec import SHARED_FIELDS, KeptLayers, KVLayout, ModelSpec, resolve_kept_layers
from overfill_serve.tokenizer import load_tokenizer


@dataclass(frozen=True)
class FieldComparison:
    name: str
    teacher: Any
    student: Any
    ok: bool


def compare_pair(
    teacher: ModelSpec, student: ModelSpec, kept_layers: KeptLayers = None
) -> list[FieldComparison]:
    """Field-by-field comparison of what the student's attention needs from the teacher's KV (both run in one
    dtype, so it is not a model's to differ). The last row's `student` is the resolved kept-layer map when ok."""
    rows = []
    for name in SHARED_FIELDS:
        ours, theirs = getattr(teacher, name), getattr(student, name)
        rows.append(FieldComparison(name, ours, theirs, ours == theirs))
    try:
        kept_layers = kept_layers if kept_layers is not None else student.kept_layers
        kept: Any = resolve_kept_layers(kept_layers, teacher.num_layers, student.num_layers)
        ok = True
    except ModelConfigError as e:
        kept, ok = str(e), False
    rows.append(FieldComparison("layers (teacher -> kept map)", teacher.num_layers, kept, ok))
    return rows


def check_pair(
    teacher: ModelSpec, student: ModelSpec, kept_layers: KeptLayers, dtype: str, block_size: int
) -> KVLayout:
    """The pair's KV layout, or a `PairMismatchError` listing every mismatching field."""
    rows = compare_pair(teacher, student, kept_layers)
    bad = [f"{r.name}: teacher {r.teacher!r} vs student {r.student!r}" for r in rows if not r.ok]
    if bad:
        raise PairMismatchError(bad)
    return replace(KVLayout.of_teacher(teacher, dtype, block_size), kept_layers=rows[-1].student)


@dataclass(frozen=True)
class ModelPair:
    teacher: CausalLM
    student: CausalLM
    tokenizer: Any
    layout: KVLayout

    @classmethod
    def load(
        cls,
        teacher_dir: str | Path,
        student_dir: str | Path,
        kept_layers: KeptLayers,
        dtype: str,
        device: str | torch.device,
        block_size: int,
        pad_to_multiple: int | None = 0,
    ) -> ModelPair:
        """`pad_to_multiple` > 0 zero-pads both models' hidden and intermediate sizes at load time (exact; the
        KV layout is unchanged, so the pair is checked on the checkpoints' own specs)."""
        teacher_spec, student_spec = ModelSpec.from_dir(teacher_dir), ModelSpec.from_dir(student_dir)
        # Check before loading any weights: a mismatched pair fails in milliseconds.
        layout = check_pair(teacher_spec, student_spec, kept_layers, dtype, block_size)
        teacher = load_model(teacher_dir, dtype, device, teacher_spec, pad_to_multiple=pad_to_multiple)
        student = teacher
        if Path(teacher_dir).resolve() != Path(student_dir).resolve():
            student = load_model(student_dir, dtype, device, student_spec, pad_to_multiple=pad_to_multiple)
        return cls(teacher, student, load_tokenizer(teacher_dir), layout)
