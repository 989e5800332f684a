"""Minitron-style structured pruning: derive an OverFill student from a teacher directory.

Pruning is not training. A pruned student must be distilled from its teacher (as the OverFill paper does)
before it decodes well; an undistilled student produces poor text. This module only produces the student's
architecture and its starting weights, so that serving and KV-layout code can be exercised end to end.

Width pruning removes hidden (embedding) channels and MLP neurons, ranked by their mean activation
magnitude on calibration text; depth pruning keeps a subset of the teacher's layers. Attention heads, KV
heads and head_dim are never touched: that is what lets the student decode on the teacher's KV cache.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from overfill_serve.errors import ModelConfigError, WeightLoadError
from overfill_serve.model.random_model import reference_text
from overfill_serve.model.spec import KEPT_LAYERS_KEY, KeptLayers, ModelSpec, resolve_kept_layers

# Files a serving engine needs next to the weights; copied verbatim when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
CALIBRATION_CHUNK = 512
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Progress callback: (stage, done, total), e.g. ("calibrating", 1024, 2048) in tokens; the CLI draws bars.
ProgressFn = Callable[[str, int, int], None]


def _no_progress(_stage: str, _done: int, _total: int) -> None:
    pass


@dataclass(frozen=True)
class PruneReport:
    """What `prune_model` did. `kept_layers` is the map written to the student's config (teacher layer
    ids; composed with the source's own map when the source is itself a depth-pruned student)."""

    src_dir: Path
    out_dir: Path
    teacher_hidden_size: int
    student_hidden_size: int
    teacher_intermediate_size: int
    student_intermediate_size: int
    teacher_num_layers: int
    student_num_layers: int
    kept_layers: tuple[int, ...]
    teacher_parameters: int
    student_parameters: int
    calibration_tokens: int


def prune_model(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_layers: int | None = None,
    kept_layers: KeptLayers = None,
    calibration_texts: list[str] | None = None,
    max_calibration_tokens: int = 2048,
    dtype: str | None = None,
    progress: ProgressFn | None = None,
) -> PruneReport:
    """Write a pruned student of the teacher in src_dir to out_dir.

    None for a size keeps the teacher's. Depth pruning (num_layers below the teacher's) needs kept_layers:
    "firstlast", "first", "last" or an explicit list of teacher layer ids; student layer j gets teacher
    layer kept_layers[j]'s weights. Channel and neuron importance is measured with transformers' model on
    `calibration_texts` (default: the pydoc topic pages that ship with Python), at most
    max_calibration_tokens tokens. The result is NOT a usable model until it is distilled: pruning is not
    training, and an undistilled student produces poor text. `progress(stage, done, total)`, when given, is
    called as calibration tokens, weight files and the student's write complete.
    """
    src, out = Path(src_dir), Path(out_dir)
    if out.resolve() == src.resolve():
        raise ModelConfigError(f"out_dir {out} is the teacher's directory; pick another")
    spec, config = ModelSpec.from_dir(src), json.loads((src / "config.json").read_text())
    h_new, i_new, kept = _student_shape(spec, hidden_size, intermediate_size, num_layers, kept_layers, dtype)
    step = progress or _no_progress

    hidden_idx: torch.Tensor | None = None
    neuron_idx: dict[int, torch.Tensor] = {}
    n_tokens = 0
    if h_new < spec.hidden_size or i_new < spec.intermediate_size:
        hidden_idx, neuron_idx, n_tokens = _kept_channels(
            src, kept, (h_new, i_new), calibration_texts, max_calibration_tokens, step
        )
    teacher = _read_tensors(src, step)
    student = _slice_tensors(teacher, kept, hidden_idx, neuron_idx, _DTYPES.get(dtype or ""))

    # A source that is itself a depth-pruned student maps onto its own teacher's layers: compose the maps.
    src_map = spec.kept_layers
    written = tuple(src_map[k] for k in kept) if src_map is not None else kept
    step("writing student", 0, 1)
    _write_student(src, out, student, _student_config(config, spec, h_new, i_new, kept, written, dtype))
    step("writing student", 1, 1)
    return PruneReport(
        src_dir=src,
        out_dir=out,
        teacher_hidden_size=spec.hidden_size,
        student_hidden_size=h_new,
        teacher_intermediate_size=spec.intermediate_size,
        student_intermediate_size=i_new,
        teacher_num_layers=spec.num_layers,
        student_num_layers=len(kept),
        kept_layers=written,
        teacher_parameters=sum(t.numel() for t in teacher.values()),
        student_parameters=sum(t.numel() for t in student.values()),
        calibration_tokens=n_tokens,
    )


def _student_shape(
    spec: ModelSpec,
    hidden_size: int | None,
    intermediate_size: int | None,
    num_layers: int | None,
    kept_layers: KeptLayers,
    dtype: str | None,
) -> tuple[int, int, tuple[int, ...]]:
    """(hidden size, intermediate size, kept teacher layers) of the student asked for, checked."""
    if dtype is not None and dtype not in _DTYPES:
        raise ModelConfigError(f"dtype={dtype!r} is not supported (use one of {sorted(_DTYPES)})")
    return (
        _check_size("hidden_size", hidden_size, spec.hidden_size),
        _check_size("intermediate_size", intermediate_size, spec.intermediate_size),
        _resolve_depth(num_layers, kept_layers, spec.num_layers),
    )


def _kept_channels(
    src: Path,
    kept: tuple[int, ...],
    sizes: tuple[int, int],
    texts: list[str] | None,
    budget: int,
    progress: ProgressFn,
) -> tuple[torch.Tensor, dict[int, torch.Tensor], int]:
    """The `sizes` = (hidden, intermediate) most important hidden channels and MLP neurons of each kept layer
    (indices in teacher order), and the calibration tokens that ranked them."""
    if budget <= 0:
        raise ModelConfigError(f"max_calibration_tokens={budget} must be > 0")
    hidden_imp, neuron_imp, n_tokens = _importance(src, kept, texts, budget, progress)
    neuron_idx = {layer: _top_k(imp, sizes[1]) for layer, imp in neuron_imp.items()}
    return _top_k(hidden_imp, sizes[0]), neuron_idx, n_tokens


def _write_student(src: Path, out: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Weights, config and the teacher's tokenizer files, in HF layout."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # a leftover index would shadow the new weights
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), {"format": "pt"}
    )
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)


def _check_size(name: str, value: int | None, teacher: int) -> int:
    if value is None:
        return teacher
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= teacher:
        raise ModelConfigError(
            f"{name}={value!r} must be an integer in [1, {teacher}] (the teacher's {name})"
        )
    return value


def _resolve_depth(num_layers: int | None, kept_layers: KeptLayers, teacher: int) -> tuple[int, ...]:
    if num_layers is None:
        num_layers = len(kept_layers) if isinstance(kept_layers, (list, tuple)) else teacher
    num_layers = _check_size("num_layers", num_layers, teacher)
    if num_layers < teacher and kept_layers is None:
        raise ModelConfigError(
            f"num_layers={num_layers} is below the teacher's {teacher}: pass kept_layers "
            "('firstlast', 'first', 'last' or a list of teacher layer ids)"
        )
    try:
        return resolve_kept_layers(kept_layers, teacher, num_layers)
    except ModelConfigError as e:
        raise ModelConfigError(f"kept_layers={kept_layers!r}: {e}") from e


def _top_k(importance: torch.Tensor, k: int) -> torch.Tensor:
    # Back in original order so that the surviving channels keep their relative layout.
    return torch.topk(importance, k).indices.sort().values


def _calibration_chunks(
    tokenizer: Any, texts: list[str] | None, budget: int, chunk: int
) -> Iterator[list[int]]:
    if texts is None:
        texts = [reference_text(budget * 8)]  # >= 8 chars per token is ample for any BPE
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:budget]
        budget -= len(ids)
        for start in range(0, len(ids), chunk):
            yield ids[start : start + chunk]
        if budget <= 0:
            return


@torch.no_grad()
def _importance(
    src: Path, kept: tuple[int, ...], texts: list[str] | None, budget: int, progress: ProgressFn
) -> tuple[torch.Tensor, dict[int, torch.Tensor], int]:
    """Mean |activation| per hidden channel (summed over the kept layers' norms and the final norm, as in
    Minitron) and per MLP neuron of each kept layer, from transformers' own teacher forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src))
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    except Exception as e:  # transformers raises many types; all mean "cannot calibrate on this teacher"
        raise ModelConfigError(f"transformers cannot load {src} for calibration: {e}") from e
    layers = model.model.layers
    hidden = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    neurons = {k: torch.zeros(model.config.intermediate_size, dtype=torch.float64) for k in kept}

    def add_hidden(_m: torch.nn.Module, _inp: Any, out: torch.Tensor) -> None:
        hidden.add_(out.abs().flatten(0, -2).sum(0, dtype=torch.float64))

    def add_neurons(k: int) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], None]:
        # down_proj's input is act_fn(gate(x)) * up(x): exactly the neuron activations.
        def hook(_m: torch.nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
            neurons[k].add_(inp[0].abs().flatten(0, -2).sum(0, dtype=torch.float64))

        return hook

    handles = [model.model.norm.register_forward_hook(add_hidden)]
    for k in kept:
        handles.append(layers[k].input_layernorm.register_forward_hook(add_hidden))
        handles.append(layers[k].post_attention_layernorm.register_forward_hook(add_hidden))
        handles.append(layers[k].mlp.down_proj.register_forward_pre_hook(add_neurons(k)))
    chunk = min(CALIBRATION_CHUNK, int(getattr(model.config, "max_position_embeddings", CALIBRATION_CHUNK)))
    n_tokens = 0
    try:
        progress("calibrating", 0, budget)
        for ids in _calibration_chunks(tokenizer, texts, budget, chunk):
            model(torch.tensor([ids]), use_cache=False)
            n_tokens += len(ids)
            progress("calibrating", n_tokens, budget)
        if n_tokens < budget:  # calibration texts shorter than the budget end the stage early
            progress("calibrating", budget, budget)
    finally:
        for handle in handles:
            handle.remove()
    if n_tokens == 0:
        raise ModelConfigError("calibration_texts produced no tokens; width pruning needs calibration text")
    return hidden / n_tokens, {k: v / n_tokens for k, v in neurons.items()}, n_tokens


def _read_tensors(src: Path, progress: ProgressFn = _no_progress) -> dict[str, torch.Tensor]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (src / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise WeightLoadError(f"{src} has no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, torch.Tensor] = {}
    progress("reading weights", 0, len(files))
    for i, name in enumerate(files):
        tensors.update(load_file(str(src / name)))
        progress("reading weights", i + 1, len(files))
    return tensors


def _slice_tensors(
    teacher: dict[str, torch.Tensor],
    kept: tuple[int, ...],
    h: torch.Tensor | None,
    neurons: dict[int, torch.Tensor],
    dtype: torch.dtype | None,
) -> dict[str, torch.Tensor]:
    """Student tensors: teacher layer kept[j] becomes layer j, hidden channels h and MLP neurons kept."""

    def cols(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        return t if idx is None else t.index_select(-1, idx)

    def rows(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        return t if idx is None else t.index_select(0, idx)

    new_layer = {k: j for j, k in enumerate(kept)}
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for name, t in teacher.items():
        m = _LAYER_RE.match(name)
        if m is None:
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                out[name] = cols(t, h)
            elif name == "model.norm.weight":
                out[name] = rows(t, h)
            else:
                unknown.append(name)
            continue
        k, rest = int(m.group(1)), m.group(2)
        if k not in new_layer:
            continue
        i = neurons.get(k)
        if rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            s = rows(t, h)
        elif rest.startswith("self_attn.") and rest.endswith("_proj.weight") and "o_proj" not in rest:
            s = cols(t, h)  # q/k/v: outputs are heads (kept), inputs are hidden channels
        elif rest.startswith("self_attn.") and rest.endswith("_proj.bias") and "o_proj" not in rest:
            s = t
        elif rest in ("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.bias"):
            s = rows(t, h)
        elif rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            s = cols(rows(t, i), h)
        elif rest in ("mlp.gate_proj.bias", "mlp.up_proj.bias"):
            s = rows(t, i)
        elif rest == "mlp.down_proj.weight":
            s = cols(rows(t, h), i)
        else:
            unknown.append(name)
            continue
        out[f"model.layers.{new_layer[k]}.{rest}"] = s
    if unknown:
        raise WeightLoadError(f"cannot prune tensors of an unknown role: {sorted(unknown)}")
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    # Copies, not views: save_file refuses tensors that share storage with unsaved ones.
    return {k: v.clone() for k, v in out.items()}


def _student_config(
    config: dict[str, Any],
    spec: ModelSpec,
    hidden: int,
    intermediate: int,
    kept: tuple[int, ...],
    written: tuple[int, ...],
    dtype: str | None,
) -> dict[str, Any]:
    student = dict(config)
    student.update(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=len(kept),
        # Explicit: hidden_size need no longer be a multiple of num_attention_heads.
        head_dim=spec.head_dim,
    )
    if isinstance(config.get("layer_types"), list):
        student["layer_types"] = [config["layer_types"][k] for k in kept]
    # A width-only student (the released OverFill decoder) has no map; write one when depth changed.
    if spec.kept_layers is not None or len(kept) != spec.num_layers:
        student[KEPT_LAYERS_KEY] = list(written)
    if dtype is not None:
        student["dtype"] = dtype
        if "torch_dtype" in student:
            student["torch_dtype"] = dtype
    return student
