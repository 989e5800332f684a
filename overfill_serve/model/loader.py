"""Weight loading from a model directory in HF layout (single or sharded safetensors).

The model is built on the meta device, so nothing is allocated until the checkpoint's tensors are placed;
fused projections (qkv, gate_up) are concatenated here and, with `pad_to_multiple`, each tensor is zero-padded
as it is placed (`padding.py`). Every missing, unexpected or mis-shaped tensor is named in one `WeightLoadError`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from overfill_serve.errors import ModelConfigError, WeightLoadError
from overfill_serve.model.llama import CausalLM
from overfill_serve.model.padding import checkpoint_shape, pad_parameter, padded_spec, unpadded_spec
from overfill_serve.model.spec import ModelSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Checkpoint tensors that carry nothing the forward needs.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelConfigError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise WeightLoadError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def checkpoint_fingerprint(model_dir: str | Path, sample_bytes: int = 64) -> str:
    """A name for the weights in `model_dir` that two copies share and a retrained or edited checkpoint does
    not: config.json, each safetensors file's header (tensor names, dtypes, shapes, offsets) and a few bytes
    at the start, middle and end of every tensor (an update changes nearly every value of a tensor it
    touches). Reads a few KiB a tensor, so it costs nothing next to loading."""
    model_dir = Path(model_dir)
    digest = hashlib.blake2b((model_dir / "config.json").read_bytes(), digest_size=16)
    for path in sorted(set(checkpoint_files(model_dir).values())):
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = f.read(size)
            digest.update(len(header).to_bytes(8, "little") + header)
            for entry in json.loads(header).values():
                if "data_offsets" not in entry:
                    continue  # __metadata__
                begin, end = (8 + size + offset for offset in entry["data_offsets"])
                for at in sorted({begin, (begin + end) // 2, max(begin, end - sample_bytes)}):
                    f.seek(at)
                    digest.update(f.read(min(sample_bytes, end - at)))
    return digest.hexdigest()


def checkpoint_sources(spec: ModelSpec) -> dict[str, list[str]]:
    """Our parameter name -> the checkpoint tensors concatenated (dim 0) to make it."""
    sources: dict[str, list[str]] = {
        "embed_tokens.weight": ["model.embed_tokens.weight"],
        "norm.weight": ["model.norm.weight"],
        "lm_head.weight": ["model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"],
    }
    for i in range(spec.num_layers):
        ours, theirs = f"layers.{i}", f"model.layers.{i}"
        sources[f"{ours}.input_layernorm.weight"] = [f"{theirs}.input_layernorm.weight"]
        sources[f"{ours}.post_attention_layernorm.weight"] = [f"{theirs}.post_attention_layernorm.weight"]
        attn = f"{theirs}.self_attn"
        sources[f"{ours}.self_attn.qkv_proj.weight"] = [f"{attn}.{p}_proj.weight" for p in "qkv"]
        sources[f"{ours}.self_attn.o_proj.weight"] = [f"{attn}.o_proj.weight"]
        if spec.qkv_bias:
            sources[f"{ours}.self_attn.qkv_proj.bias"] = [f"{attn}.{p}_proj.bias" for p in "qkv"]
        if spec.o_bias:
            sources[f"{ours}.self_attn.o_proj.bias"] = [f"{attn}.o_proj.bias"]
        mlp = f"{theirs}.mlp"
        sources[f"{ours}.mlp.gate_up_proj.weight"] = [f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"]
        sources[f"{ours}.mlp.down_proj.weight"] = [f"{mlp}.down_proj.weight"]
        if spec.mlp_bias:
            sources[f"{ours}.mlp.gate_up_proj.bias"] = [f"{mlp}.gate_proj.bias", f"{mlp}.up_proj.bias"]
            sources[f"{ours}.mlp.down_proj.bias"] = [f"{mlp}.down_proj.bias"]
    return sources


def load_model(
    model_dir: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    spec: ModelSpec | None = None,
    pad_to_multiple: int | None = 0,
) -> CausalLM:
    """The model in `model_dir`; `pad_to_multiple` > 0 zero-pads its hidden and intermediate sizes to that
    multiple (same logits, faster GEMMs; `model.spec` is then a `PaddedModelSpec`)."""
    model_dir = Path(model_dir)
    spec = unpadded_spec(spec or ModelSpec.from_dir(model_dir))
    torch_dtype, device = parse_dtype(dtype), torch.device(device)
    padded = padded_spec(spec, pad_to_multiple)
    with torch.device("meta"):
        model = CausalLM(padded)
    files = checkpoint_files(model_dir)
    sources = checkpoint_sources(spec)
    expected = {name for names in sources.values() for name in names}
    params = dict(model.named_parameters())

    problems = [f"missing tensor {n}" for n in sorted(expected - files.keys())]
    ignorable = {"lm_head.weight"} if spec.tie_word_embeddings else set()
    problems += [
        f"unexpected tensor {n}"
        for n in sorted(files.keys() - expected - ignorable)
        if not n.endswith(IGNORED_SUFFIXES)
    ]
    if problems:
        raise WeightLoadError(f"{model_dir}: " + "; ".join(problems))

    handles = {path: safe_open(str(path), framework="pt", device="cpu") for path in set(files.values())}
    state: dict[str, torch.Tensor] = {}
    loaded: dict[str, torch.Tensor] = {}  # tied weights share one tensor (embedding and head pad alike)
    for ours, theirs in sources.items():
        key = ",".join(theirs)
        if key not in loaded:
            parts = [handles[files[n]].get_tensor(n) for n in theirs]
            tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            want = checkpoint_shape(ours, tuple(params[ours].shape), padded)
            if tuple(tensor.shape) != want:
                problems.append(f"{'+'.join(theirs)} has shape {tuple(tensor.shape)}, expected {want}")
                continue
            loaded[key] = pad_parameter(ours, tensor, padded).to(device=device, dtype=torch_dtype)
        state[ours] = loaded[key]
    if problems:
        raise WeightLoadError(f"{model_dir}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    model.init_rotary(device)
    return model.eval()
