"""`EngineConfig`: every setting of one engine (KV pool, batching, dtype, device), with one set of defaults.

`LLM`, the workers and the Serve app's two pools (`ServeConfig.prefill` / `.decode`) all take one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from overfill_serve.errors import ModelConfigError
from overfill_serve.kv.paged_cache import PagedKVCache
from overfill_serve.model.loader import parse_dtype

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
GPU_KV_CACHE_FRACTION = 0.8  # of the memory free once the weights are loaded


@dataclass(frozen=True)
class EngineConfig:
    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # None: as many as kv_cache_bytes holds
    kv_cache_bytes: int | None = None  # None: 1 GiB on CPU, 80 % of the free memory on a GPU
    max_num_seqs: int = 64  # requests per batch, per stage
    max_num_batched_tokens: int = 2048  # prompt tokens per prefill step (longer prompts are chunked)
    max_model_len: int | None = None  # None: what the models and the pool allow
    num_swap_blocks: int = 0  # host memory for preempted decodes' KV (0: re-prefill them)

    def __post_init__(self) -> None:
        parse_dtype(self.dtype)
        positive = ("block_size", "max_num_seqs", "max_num_batched_tokens")
        optional = ("num_kv_blocks", "kv_cache_bytes", "max_model_len")
        for name in positive + optional:
            value = getattr(self, name)
            if not (value is None and name in optional) and not (isinstance(value, int) and value > 0):
                raise ModelConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.num_swap_blocks, int) or self.num_swap_blocks < 0:
            raise ModelConfigError(f"num_swap_blocks must be >= 0, got {self.num_swap_blocks!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    def num_blocks(self, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
        """The pool's size in blocks: `num_kv_blocks`, else what the KV budget holds for this geometry."""
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        budget = self.kv_cache_bytes
        if budget is None:
            device = torch.device(self.device)
            if device.type == "cuda":
                budget = int(torch.cuda.mem_get_info(device)[0] * GPU_KV_CACHE_FRACTION)
            else:
                budget = DEFAULT_CPU_KV_CACHE_BYTES
        per_block = PagedKVCache.bytes_per_block(
            num_layers, self.block_size, num_kv_heads, head_dim, self.torch_dtype
        )
        if budget < per_block:
            raise ModelConfigError(
                f"the KV cache budget ({budget} bytes) holds no block of {per_block} bytes; "
                "raise kv_cache_bytes or set num_kv_blocks"
            )
        return budget // per_block

    def context_limit(self, model_limit: int, num_blocks: int | None = None) -> int:
        """The longest sequence (prompt plus output) a request may reach: `max_model_len`, the models' position
        limit and the pool (a request running alone must always fit, so preemption can always make progress).
        `num_blocks`: the pool's actual size where known, else `num_kv_blocks` if set."""
        blocks = num_blocks or self.num_kv_blocks
        limits = (model_limit, self.max_model_len, blocks * self.block_size if blocks else None)
        return min(x for x in limits if x is not None)
