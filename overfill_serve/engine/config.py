"""`EngineConfig`: every setting of one engine (KV pool, batching, dtype, device, the GPU fast path), with one
set of defaults.

`LLM`, the workers and the Serve app's two pools (`ServeConfig.prefill` / `.decode`) all take one; an engine
runs on its `resolved()` copy, where "auto" and None have become what the device calls for.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from overfill_serve.errors import ModelConfigError
from overfill_serve.kv.paged_cache import PagedKVCache
from overfill_serve.model.attention import BACKENDS
from overfill_serve.model.loader import parse_dtype

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
GPU_PAD_MULTIPLE = 64  # hidden 1689 -> 1728, intermediate 4505 -> 4544: 1.2-1.7x faster GEMMs on an H200


@dataclass(frozen=True)
class EngineConfig:
    dtype: str = "auto"  # bfloat16 on CUDA, float32 on CPU
    device: str = "cpu"
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # None: as many as kv_cache_bytes holds
    kv_cache_bytes: int | None = None  # None: 1 GiB on CPU; on a GPU what gpu_memory_utilization leaves
    gpu_memory_utilization: float = 0.9  # of the GPU's memory for weights, activations and the KV cache
    max_num_seqs: int = 64  # requests per batch, per stage
    max_num_batched_tokens: int = 2048  # prompt tokens per prefill step (longer prompts are chunked)
    max_model_len: int | None = None  # None: what the models and the pool allow
    num_swap_blocks: int = 0  # host memory for preempted decodes' KV (0: re-prefill them)
    # Reuse the KV of prompt prefixes a prefill computed before (blocks indexed by their token ids and model).
    enable_prefix_caching: bool = True
    # GPU fast path (each None: on where it pays, i.e. on CUDA; set explicitly to force on or off).
    attention_backend: str | None = None  # "triton" | "torch"; None: triton on CUDA, torch on CPU
    cuda_graphs: bool | None = None  # capture decode steps per batch-size bucket (CUDA, triton backend)
    pad_to_multiple: int | None = None  # zero-pad odd hidden / intermediate sizes; None: 64 on CUDA, 0 on CPU

    def __post_init__(self) -> None:
        if self.dtype != "auto":
            parse_dtype(self.dtype)
        if self.attention_backend not in (None, *BACKENDS):
            raise ModelConfigError(
                f"attention_backend must be one of {BACKENDS}, got {self.attention_backend!r}"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ModelConfigError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
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

    @property
    def on_cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def resolved(self) -> EngineConfig:
        """This config with "auto" and None settled for the device: on CUDA bfloat16, the Triton kernels, CUDA
        graphs and padding to multiples of 64; on CPU float32, torch attention, none of the rest."""
        cuda = self.on_cuda
        backend = self.attention_backend or ("triton" if cuda else "torch")
        graphs = self.cuda_graphs if self.cuda_graphs is not None else cuda and backend == "triton"
        if graphs and cuda and backend != "triton":
            raise ModelConfigError("cuda_graphs needs attention_backend='triton' (torch attention syncs)")
        return replace(
            self,
            dtype=self.dtype if self.dtype != "auto" else ("bfloat16" if cuda else "float32"),
            attention_backend=backend,
            cuda_graphs=graphs,
            pad_to_multiple=self.pad_to_multiple
            if self.pad_to_multiple is not None
            else GPU_PAD_MULTIPLE * cuda,
        )

    def num_blocks(self, num_layers: int, num_kv_heads: int, head_dim: int, activation_bytes: int = 0) -> int:
        """The pool's size in blocks: `num_kv_blocks`, else what the KV budget holds for this geometry: on a GPU,
        `gpu_memory_utilization` of its memory less what is allocated (the weights) and `activation_bytes` (a
        step's measured peak)."""
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        budget = self.kv_cache_bytes
        if budget is None and self.on_cuda:
            device = torch.device(self.device)
            total = torch.cuda.get_device_properties(device).total_memory
            budget = (
                int(total * self.gpu_memory_utilization)
                - torch.cuda.memory_allocated(device)
                - activation_bytes
            )
        elif budget is None:
            budget = DEFAULT_CPU_KV_CACHE_BYTES
        per_block = PagedKVCache.bytes_per_block(
            num_layers, self.block_size, num_kv_heads, head_dim, self.torch_dtype
        )
        if budget < per_block:
            raise ModelConfigError(
                f"the KV cache budget ({budget} bytes) holds no block of {per_block} bytes; "
                "raise kv_cache_bytes or gpu_memory_utilization, or set num_kv_blocks"
            )
        return budget // per_block

    def context_limit(self, model_limit: int, num_blocks: int | None = None) -> int:
        """The longest sequence (prompt plus output) a request may reach: `max_model_len`, the models' position
        limit and the pool (a request running alone must always fit, so preemption can always make progress).
        `num_blocks`: the pool's actual size where known, else `num_kv_blocks` if set."""
        blocks = num_blocks or self.num_kv_blocks
        limits = (model_limit, self.max_model_len, blocks * self.block_size if blocks else None)
        return min(x for x in limits if x is not None)
