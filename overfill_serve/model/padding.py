"""Exact zero-padding of a model's hidden and intermediate sizes to a multiple, applied while loading.

Odd sizes (the released OverFill student's hidden 1689 / intermediate 4505) make GPU GEMMs slow; padded to
multiples of 64 the same step runs faster and computes the same logits:

- hidden n -> n': embedding, LM head and q/k/v inputs get zero columns; o_proj and down_proj (the residual
  branches' outputs) get zero rows and zero bias entries, so the padded residual dims stay exactly 0. Every
  RMSNorm weight is scaled by sqrt(n/n') (zero in the padding) and its eps by n/n': the mean of squares over
  n' dims is n/n' times the one over n, so (mean + eps) scales by n/n' and the weight scaling cancels it.
- intermediate i -> i': gate and up rows (each half of the fused gate_up) and their biases get zeros, down_proj
  zero columns: silu(0) * 0 = 0.

Heads, KV heads, head_dim, RoPE and vocabulary are untouched, so the KV cache layout is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from overfill_serve.errors import ModelConfigError
from overfill_serve.model.spec import ModelSpec

# Which dims of each parameter (named by its last two name components) are sized by the hidden size ("h"),
# the intermediate size ("i") or the fused gate/up rows ("2i"); None: untouched by padding.
_DIMS: dict[str, tuple[str | None, ...]] = {
    "embed_tokens.weight": (None, "h"),
    "lm_head.weight": (None, "h"),
    "self_attn.qkv_proj.weight": (None, "h"),
    "self_attn.qkv_proj.bias": (None,),
    "self_attn.o_proj.weight": ("h", None),
    "self_attn.o_proj.bias": ("h",),
    "mlp.gate_up_proj.weight": ("2i", "h"),
    "mlp.gate_up_proj.bias": ("2i",),
    "mlp.down_proj.weight": ("h", "i"),
    "mlp.down_proj.bias": ("h",),
}
_NORM_SUFFIX = "norm.weight"  # input_layernorm, post_attention_layernorm and the final norm


@dataclass(frozen=True, kw_only=True)
class PaddedModelSpec(ModelSpec):
    """A `ModelSpec` with padded hidden / intermediate sizes and scaled eps; `unpadded` is the checkpoint's."""

    unpadded: ModelSpec
    multiple: int


def padded_size(size: int, multiple: int | None) -> int:
    """`size` rounded up to a multiple of `multiple` (0 or None: no padding)."""
    if not multiple:
        return size
    if multiple < 0:
        raise ModelConfigError(f"pad_to_multiple must be >= 0, got {multiple}")
    return -(-size // multiple) * multiple


def unpadded_spec(spec: ModelSpec) -> ModelSpec:
    """The checkpoint's own spec (its real hidden size), whether or not `spec` is padded."""
    return spec.unpadded if isinstance(spec, PaddedModelSpec) else spec


def padded_spec(spec: ModelSpec, multiple: int | None) -> ModelSpec:
    """`spec` with hidden and intermediate sizes padded to `multiple` and eps scaled to match; `spec` itself
    (the unpadded one, if it was padded) when both sizes are already multiples or `multiple` is 0 / None."""
    base = unpadded_spec(spec)
    hidden = padded_size(base.hidden_size, multiple)
    intermediate = padded_size(base.intermediate_size, multiple)
    if (hidden, intermediate) == (base.hidden_size, base.intermediate_size):
        return base
    values = {f.name: getattr(base, f.name) for f in fields(base)}
    values.update(
        hidden_size=hidden,
        intermediate_size=intermediate,
        rms_norm_eps=base.rms_norm_eps * base.hidden_size / hidden,  # see the module docstring
    )
    return PaddedModelSpec(**values, unpadded=base, multiple=int(multiple or 0))


def _dims(name: str) -> tuple[str | None, ...] | None:
    """The padding rule of our parameter `name` (None for a norm weight); unknown names are refused so that
    a new parameter is never silently left unpadded."""
    if name.endswith(_NORM_SUFFIX):
        return None
    key = ".".join(name.split(".")[-3:]) if name.startswith("layers.") else name
    if key not in _DIMS:
        raise ValueError(f"no padding rule for parameter {name!r}")
    return _DIMS[key]


def _sizes(spec: ModelSpec) -> dict[str | None, int]:
    return {"h": spec.hidden_size, "i": spec.intermediate_size, "2i": 2 * spec.intermediate_size}


def checkpoint_shape(name: str, shape: tuple[int, ...], spec: ModelSpec) -> tuple[int, ...]:
    """The shape the checkpoint's (fused) tensor must have for our parameter `name` of shape `shape` in a
    model built from `spec` (padded or not)."""
    base = unpadded_spec(spec)
    if base is spec:
        return shape
    dims = _dims(name) or ("h",)
    sizes = _sizes(base)
    return tuple(size if kind is None else sizes[kind] for size, kind in zip(shape, dims))


def _zero_pad(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(tensor.shape) == shape:
        return tensor
    out = tensor.new_zeros(shape)
    out[tuple(slice(0, n) for n in tensor.shape)] = tensor
    return out


def pad_parameter(name: str, tensor: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """The checkpoint's tensor for our parameter `name` (gate/up already fused), padded for a model built from
    `spec`; unchanged if `spec` is not padded. Norm weights come back in float32 (the scaling is computed in
    float32; the caller casts to the model dtype once)."""
    base = unpadded_spec(spec)
    if base is spec:
        return tensor
    dims, padded = _dims(name), _sizes(spec)
    if dims is None:  # an RMSNorm weight
        if spec.hidden_size == base.hidden_size:
            return tensor
        scaled = tensor.float() * math.sqrt(base.hidden_size / spec.hidden_size)
        return _zero_pad(scaled, (spec.hidden_size,))
    shape = tuple(n if kind is None else padded[kind] for n, kind in zip(tensor.shape, dims))
    if dims[0] == "2i":  # pad the gate and up halves separately: each is [i, ...] -> [i', ...]
        half = (spec.intermediate_size, *shape[1:])
        return torch.cat([_zero_pad(part, half) for part in tensor.chunk(2, dim=0)], dim=0)
    return _zero_pad(tensor, shape)
