"""`ModelSpec` and `KVLayout`, read from a model directory's config.json directly.

transformers' own config classes refuse shapes that OverFill decoders have (hidden 1689 with 24 heads), so the
project reads config.json itself. Llama and Qwen2 families are supported.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from overfill_serve.errors import ModelConfigError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
# Key in the student's config.json naming the teacher layers whose KV its layers attend to.
KEPT_LAYERS_KEY = "overfill_kept_layers"
KEPT_LAYER_STRATEGIES = ("firstlast", "first", "last")
# What a student's attention shares with its teacher's (ModelSpec fields, in KVLayout too).
SHARED_FIELDS = ("num_kv_heads", "head_dim", "rope", "vocab_size", "eos_token_ids")
# A kept-layer map as users give it: a strategy name, explicit teacher layer ids, or None (all layers).
KeptLayers = str | Sequence[int] | None


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters; scaling_type None (plain RoPE) or "llama3"."""

    theta: float
    scaling_type: str | None = None
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelSpec:
    """Everything the forward pass needs to know about a decoder-only model."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeSpec
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str
    kept_layers: tuple[int, ...] | None = None  # teacher layers this (depth-pruned) model attends to

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelSpec:
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise ModelConfigError(f"{path} is not a model directory: no config.json")
        try:
            config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelConfigError(f"cannot read {config_path}: {e}") from e
        # generation_config.json may name more end tokens (e.g. a chat model's end-of-turn token).
        gen_path = Path(path) / "generation_config.json"
        if gen_path.is_file():
            gen_eos = json.loads(gen_path.read_text()).get("eos_token_id")
            if gen_eos is not None:
                ids = config.get("eos_token_id")
                ids = ids if isinstance(ids, list) else ([] if ids is None else [ids])
                extra = gen_eos if isinstance(gen_eos, list) else [gen_eos]
                config = {**config, "eos_token_id": list(dict.fromkeys([*ids, *extra]))}  # keep order
        return cls.from_config(config, source=str(config_path))

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "config") -> ModelSpec:
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(
                f"{source}: model_type {model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})"
            )
        try:
            hidden = int(config["hidden_size"])
            num_heads = int(config["num_attention_heads"])
            head_dim = config.get("head_dim") or hidden // num_heads
            if hidden % num_heads and not config.get("head_dim"):
                raise ModelConfigError(
                    f"{source}: hidden_size {hidden} is not a multiple of num_attention_heads {num_heads} "
                    "and no head_dim is given"
                )
            eos = config.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            kept = config.get(KEPT_LAYERS_KEY)
            is_qwen2 = model_type == "qwen2"
            attention_bias = bool(config.get("attention_bias", False))
            return cls(
                model_type=model_type,
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope=_rope_spec(config, source),
                max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                # Qwen2 always has q/k/v bias and no o bias; Llama's attention_bias covers all four.
                qkv_bias=True if is_qwen2 else attention_bias,
                o_bias=False if is_qwen2 else attention_bias,
                mlp_bias=bool(config.get("mlp_bias", False)),
                bos_token_id=config.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
                torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
                kept_layers=tuple(int(i) for i in kept) if kept is not None else None,
            )
        except KeyError as e:
            raise ModelConfigError(f"{source}: missing required field {e.args[0]!r}") from e

    def num_parameters(self) -> int:
        """Parameter count (for capacity planning and logs)."""
        h, i, v, d = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        per_layer = attn + 3 * h * i + 2 * h
        return self.num_layers * per_layer + v * h * (1 if self.tie_word_embeddings else 2) + h


def _rope_spec(config: dict[str, Any], source: str) -> RopeSpec:
    # transformers 5 moved rope settings into `rope_parameters`; older configs use rope_theta + rope_scaling.
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or params
    theta = float(params.get("rope_theta") or config.get("rope_theta") or 10000.0)
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in (None, "default"):
        return RopeSpec(theta=theta)
    if kind != "llama3":
        raise ModelConfigError(f"{source}: rope scaling type {kind!r} is not supported (supported: llama3)")
    return RopeSpec(
        theta=theta,
        scaling_type="llama3",
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
    )


def resolve_kept_layers(
    kept_layers: KeptLayers, num_teacher_layers: int, num_student_layers: int
) -> tuple[int, ...]:
    """The teacher layer each student layer attends to.

    None with equal depths is the identity map; "firstlast" keeps the first half and the last half of the
    student's budget; "first" / "last" keep a prefix / suffix; an explicit list is checked and returned.
    """
    t, s = num_teacher_layers, num_student_layers
    if kept_layers is None:
        if s != t:
            raise ModelConfigError(
                f"student has {s} layers and teacher {t}: a kept-layer map is needed "
                f"(one of {KEPT_LAYER_STRATEGIES} or an explicit list)"
            )
        return tuple(range(t))
    if isinstance(kept_layers, str):
        if kept_layers == "first":
            kept = list(range(s))
        elif kept_layers == "last":
            kept = list(range(t - s, t))
        elif kept_layers == "firstlast":
            head = math.ceil(s / 2)
            kept = list(range(head)) + list(range(t - (s - head), t))
        else:
            raise ModelConfigError(
                f"unknown kept-layer strategy {kept_layers!r}; use {KEPT_LAYER_STRATEGIES}"
            )
    else:
        kept = [int(i) for i in kept_layers]
    if len(kept) != s:
        raise ModelConfigError(f"kept-layer map {kept} has {len(kept)} entries for a {s}-layer student")
    if s > t or len(set(kept)) != len(kept) or any(not 0 <= i < t for i in kept) or kept != sorted(kept):
        raise ModelConfigError(
            f"kept-layer map {kept} must be strictly increasing teacher layer ids in [0, {t})"
        )
    return tuple(kept)


@dataclass(frozen=True)
class KVLayout:
    """What a KV cache must look like for a student to decode on a teacher's prompt KV.

    `kept_layers[j]` is the teacher layer whose KV the student's layer j attends to (every teacher layer, in
    order, for a teacher's own layout). Checked when a pair is loaded and again at every KV-channel handshake.
    """

    num_teacher_layers: int
    kept_layers: tuple[int, ...]
    num_kv_heads: int
    head_dim: int
    rope: RopeSpec
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    dtype: str
    block_size: int

    @classmethod
    def of_teacher(cls, teacher: ModelSpec, dtype: str, block_size: int) -> KVLayout:
        """The layout a teacher's prefill produces: every one of its layers."""
        shared = {name: getattr(teacher, name) for name in SHARED_FIELDS}
        layers = tuple(range(teacher.num_layers))
        return cls(teacher.num_layers, layers, dtype=dtype, block_size=block_size, **shared)

    @classmethod
    def of_student(
        cls,
        student: ModelSpec,
        kept_layers: KeptLayers,
        num_teacher_layers: int | None,
        dtype: str,
        block_size: int,
    ) -> KVLayout:
        """The layout a student expects from its teacher, from the student alone: its kept-layer map (argument,
        or its config) and, when known, the teacher's depth. A depth-pruned student's map names teacher
        layers, so without the teacher's depth the highest kept layer bounds it."""
        kept_layers = kept_layers if kept_layers is not None else student.kept_layers
        if num_teacher_layers is None:
            explicit = kept_layers is not None and not isinstance(kept_layers, str)
            num_teacher_layers = max(int(i) for i in kept_layers) + 1 if explicit else student.num_layers  # type: ignore[union-attr]
        kept = resolve_kept_layers(kept_layers, num_teacher_layers, student.num_layers)
        own = cls.of_teacher(student, dtype, block_size)
        return replace(own, num_teacher_layers=num_teacher_layers, kept_layers=kept)

    @cached_property
    def _local(self) -> dict[int, int]:
        return {teacher_layer: j for j, teacher_layer in enumerate(self.kept_layers)}

    def local_layer(self, teacher_layer: int) -> int | None:
        """Where the student keeps a teacher layer's KV (its own layer index); None if it does not keep it."""
        return self._local.get(teacher_layer)

    def mismatches(self, student: KVLayout) -> list[str]:
        """Why a student expecting `student` cannot decode on the KV this teacher layout produces: every
        differing field, and a kept-layer map that does not fit this teacher's layers."""
        problems = [
            f"{f.name}: {getattr(self, f.name)!r} != {getattr(student, f.name)!r}"
            for f in fields(self)
            if f.name not in ("kept_layers", "num_teacher_layers")
            and getattr(self, f.name) != getattr(student, f.name)
        ]
        try:
            resolve_kept_layers(student.kept_layers, self.num_teacher_layers, len(student.kept_layers))
        except ModelConfigError as e:
            problems.append(f"kept_layers: {e}")
        if not student.kept_layers:
            problems.append("kept_layers: empty")
        return problems

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVLayout:
        data = dict(data)
        data["rope"] = RopeSpec(**data["rope"])
        data["kept_layers"] = tuple(data["kept_layers"])
        data["eos_token_ids"] = tuple(data["eos_token_ids"])
        return cls(**data)
