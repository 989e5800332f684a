"""Attention over a paged KV cache: the one function a GPU kernel replaces.

`AttentionMetadata` is built once per engine step (not per layer) from the scheduled batch; every layer then
writes its new K/V into the cache slots and attends over the request's whole context through its block table.
The portable path uses torch SDPA two ways:
- a decode step (one new token per request) is one batched call over the gathered contexts, masked to each
  request's length;
- any step with a multi-token query (prefill, chunked prefill, a preempted request catching up) attends per
  request, so a batch of mixed prompt lengths pays no padding; a fresh prompt uses the new K/V directly with
  a causal mask and gathers nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionMetadata:
    """Per-step attention inputs shared by every layer. T new tokens from B requests."""

    slot_mapping: torch.Tensor  # [T] cache slot (block * block_size + offset) of each new token
    context_slots: torch.Tensor  # [B, L] cache slots of each request's context, L = max context length
    decode_mask: torch.Tensor | None  # [B, 1, 1, L] decode only: True inside each context; None if all full
    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]  # tokens in the cache after this step, new ones included

    @property
    def is_decode(self) -> bool:
        return max(self.query_lens) == 1

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
    ) -> AttentionMetadata:
        max_ctx = max(context_lens)
        ctx_pos = torch.arange(max_ctx)
        blocks = torch.zeros(len(query_lens), -(-max_ctx // block_size), dtype=torch.long)
        slot_mapping: list[int] = []
        for i, (q_len, ctx_len, table) in enumerate(zip(query_lens, context_lens, block_tables)):
            n_blocks = -(-ctx_len // block_size)
            blocks[i, :n_blocks] = torch.tensor(table[:n_blocks], dtype=torch.long)
            for pos in range(ctx_len - q_len, ctx_len):
                slot_mapping.append(table[pos // block_size] * block_size + pos % block_size)
        # Positions past a request's context point at block 0 of its table (a valid slot) and are masked out.
        context_slots = blocks[:, ctx_pos // block_size] * block_size + ctx_pos % block_size
        decode_mask = None
        if max(query_lens) == 1 and min(context_lens) != max_ctx:
            lens = torch.tensor(context_lens)
            decode_mask = (ctx_pos[None, :] < lens[:, None])[:, None, None, :].to(device)
        return cls(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
            context_slots=context_slots.to(device),
            decode_mask=decode_mask,
            query_lens=tuple(query_lens),
            context_lens=tuple(context_lens),
        )


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Store k/v [T, Hkv, D] into the cache, then attend q [T, Hq, D] over each request's context.

    k_cache / v_cache: [num_blocks, block_size, Hkv, D]. Returns [T, Hq, D].
    """
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)
    flat_v = v_cache.view(-1, num_kv_heads, head_dim)
    flat_k.index_copy_(0, meta.slot_mapping, k)
    flat_v.index_copy_(0, meta.slot_mapping, v)

    if meta.is_decode:
        ctx_k = flat_k[meta.context_slots].transpose(1, 2)  # [B, Hkv, L, D]
        ctx_v = flat_v[meta.context_slots].transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q[:, None].transpose(1, 2), ctx_k, ctx_v, attn_mask=meta.decode_mask, enable_gqa=True
        )  # [B, Hq, 1, D]
        return out.transpose(1, 2).reshape(q.shape)

    out = torch.empty_like(q)
    start = 0
    for i, (q_len, ctx_len) in enumerate(zip(meta.query_lens, meta.context_lens)):
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
