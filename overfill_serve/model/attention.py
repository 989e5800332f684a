"""Attention over a paged KV cache: the one function a GPU kernel replaces.

`AttentionMetadata` is built once per engine step (not per layer) from the scheduled batch; every layer then
writes its new K/V into the cache slots and attends over the request's whole context through its block table.
The portable path gathers each request's context into a dense tensor and calls torch SDPA with a mask, which
covers prefill (variable-length prompts, chunked continuations) and decode (one token per request) alike.
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
    query_index: torch.Tensor  # [T] position of each new token in the padded [B * max_query_len] layout
    attn_mask: (
        torch.Tensor | None
    )  # [B, 1, max_query_len, L] True where attention is allowed; None: decode, all valid
    num_seqs: int
    max_query_len: int

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
    ) -> AttentionMetadata:
        """context_lens[i] counts request i's tokens in the cache after this step, its new tokens included."""
        num_seqs = len(query_lens)
        max_q, max_ctx = max(query_lens), max(context_lens)
        ctx_pos = torch.arange(max_ctx)
        blocks = torch.zeros(num_seqs, -(-max_ctx // block_size), dtype=torch.long)
        slot_mapping: list[int] = []
        query_index: list[int] = []
        for i, (q_len, ctx_len, table) in enumerate(zip(query_lens, context_lens, block_tables)):
            n_blocks = -(-ctx_len // block_size)
            blocks[i, :n_blocks] = torch.tensor(table[:n_blocks], dtype=torch.long)
            for pos in range(ctx_len - q_len, ctx_len):
                slot_mapping.append(table[pos // block_size] * block_size + pos % block_size)
            query_index.extend(range(i * max_q, i * max_q + q_len))
        # Positions past a request's context point at block 0 of its table (a valid slot) and are masked out.
        context_slots = blocks[:, ctx_pos // block_size] * block_size + ctx_pos % block_size
        ctx = torch.tensor(context_lens)
        q_len_t = torch.tensor(query_lens)
        mask = None
        if not (max_q == 1 and min(context_lens) == max_ctx):  # equal-length decode needs no mask
            # Query row r of request i sits at absolute position ctx_i - q_len_i + r; causal within context.
            q_pos = (ctx - q_len_t)[:, None] + torch.arange(max_q)[None, :]
            mask = (ctx_pos[None, None, :] <= q_pos[:, :, None]) & (
                ctx_pos[None, None, :] < ctx[:, None, None]
            )
            mask = mask[:, None].to(device)
        return cls(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
            context_slots=context_slots.to(device),
            query_index=torch.tensor(query_index, dtype=torch.long, device=device),
            attn_mask=mask,
            num_seqs=num_seqs,
            max_query_len=max_q,
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

    b, max_q = meta.num_seqs, meta.max_query_len
    ctx_k = flat_k[meta.context_slots].transpose(1, 2)  # [B, Hkv, L, D]
    ctx_v = flat_v[meta.context_slots].transpose(1, 2)
    if max_q == 1:  # decode: one token per request, no padding
        q_pad = q[:, None]
    else:
        q_pad = q.new_zeros(b * max_q, q.shape[1], head_dim)
        q_pad[meta.query_index] = q
        q_pad = q_pad.view(b, max_q, q.shape[1], head_dim)
    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2), ctx_k, ctx_v, attn_mask=meta.attn_mask, enable_gqa=True
    )  # [B, Hq, max_q, D]
    out = out.transpose(1, 2).reshape(b * max_q, q.shape[1], head_dim)
    return out if max_q == 1 else out[meta.query_index]
