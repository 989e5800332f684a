"""Attention over a paged KV cache, with two backends behind one function.

`AttentionMetadata` is built once per engine step (not per layer) from the scheduled batch; every layer then
writes its new K/V into the cache slots and attends over each sequence's whole context through its block
table. Rows past the real sequences (a CUDA-graph bucket's padding) have slot -1 and context length 0: they
write nothing and their output is ignored.

- `triton` (model/triton_attention.py; the default on CUDA): split-KV decode and a causal prefix kernel read
  the paged cache in place; no host sync, so a decode step can be captured in a CUDA graph.
- `torch` (portable; the default on CPU): SDPA two ways. A decode step (one new token per sequence) is one
  batched call over the gathered contexts, masked to each length; a multi-token step (prefill, chunked
  prefill, a preempted request catching up) attends per sequence, so mixed prompt lengths pay no padding, and
  a fresh prompt uses its new K/V directly with a causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("triton", "torch")


@dataclass(frozen=True)
class AttentionMetadata:
    """Per-step attention inputs shared by every layer: T new tokens from B rows (sequences, then padding)."""

    backend: str
    slot_mapping: torch.Tensor  # [T] cache slot (block * block_size + offset) of each new token; -1: none
    block_tables: torch.Tensor  # [B, W] block ids of each row's context (unused entries 0)
    context_lens: torch.Tensor  # [B] tokens in the cache after this step, new ones included; 0: padding
    query_start: torch.Tensor  # [B + 1] first row in q of each sequence's new tokens
    block_size: int
    max_query_len: int
    # Host copies for the torch backend, real sequences only (a padded row has none).
    query_lens: tuple[int, ...]
    context_lens_host: tuple[int, ...]

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1

    @cached_property
    def context_slots(self) -> torch.Tensor:
        """[B, L] cache slot of every context position, L = the longest real context (torch backend). Positions
        past a row's context point at a valid slot of its first block and are masked out."""
        pos = torch.arange(max(self.context_lens_host), device=self.block_tables.device)
        blocks = self.block_tables[: len(self.query_lens), pos // self.block_size].long()
        return blocks * self.block_size + pos % self.block_size

    @cached_property
    def decode_mask(self) -> torch.Tensor | None:
        """[B, 1, 1, L] True inside each context (torch backend, decode); None if every context is full."""
        lens = self.context_lens_host
        if min(lens) == max(lens):
            return None
        pos = torch.arange(max(lens), device=self.block_tables.device)
        return (pos[None, :] < self.context_lens[: len(lens), None])[:, None, None, :]


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Store k/v [T, Hkv, D] into the cache, then attend q [T, Hq, D] over each sequence's context.

    k_cache / v_cache: [num_blocks, block_size, Hkv, D]. Returns [T, Hq, D].
    """
    scale = q.shape[-1] ** -0.5
    if meta.backend == "triton":
        from overfill_serve.model import triton_attention as kernels

        kernels.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode:
            return kernels.decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale)
        return kernels.prefix_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.context_lens,
            meta.query_start,
            meta.max_query_len,
            scale,
        )
    return _torch_attention(q, k, v, k_cache, v_cache, meta)


def _torch_attention(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata
) -> Tensor:
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)
    flat_v = v_cache.view(-1, num_kv_heads, head_dim)
    real = sum(meta.query_lens)  # padded rows come last and write nothing
    slots = meta.slot_mapping[:real].long()  # int32 in the CUDA-graph buffers
    flat_k.index_copy_(0, slots, k[:real])
    flat_v.index_copy_(0, slots, v[:real])
    if meta.is_decode:
        ctx_k = flat_k[meta.context_slots].transpose(1, 2)  # [B, Hkv, L, D]
        ctx_v = flat_v[meta.context_slots].transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q[:real, None].transpose(1, 2), ctx_k, ctx_v, attn_mask=meta.decode_mask, enable_gqa=True
        )  # [B, Hq, 1, D]
        out = out.transpose(1, 2).reshape(real, *q.shape[1:])
        return out if real == q.shape[0] else torch.cat([out, q.new_zeros(q.shape[0] - real, *q.shape[1:])])

    out = torch.empty_like(q)
    start = 0
    for i, (q_len, ctx_len) in enumerate(zip(meta.query_lens, meta.context_lens_host)):
        end = start + q_len
        qi = q[start:end].transpose(0, 1)[None]  # [1, Hq, q_len, D]
        if q_len == ctx_len:  # a fresh prompt: its context is exactly the new tokens
            ki, vi, mask, causal = k[start:end], v[start:end], None, True
        else:
            slots = meta.context_slots[i, :ctx_len]
            ki, vi, causal = flat_k[slots], flat_v[slots], False
            # Query row r sits at absolute position ctx_len - q_len + r and sees keys up to it.
            rows = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
            mask = torch.arange(ctx_len, device=q.device)[None, :] <= rows[:, None]
        out[start:end] = F.scaled_dot_product_attention(
            qi,
            ki.transpose(0, 1)[None],
            vi.transpose(0, 1)[None],
            attn_mask=mask,
            is_causal=causal,
            enable_gqa=True,
        )[0].transpose(0, 1)
        start = end
    return out
