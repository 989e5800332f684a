"""Triton paged attention over the KV cache: store, decode (split-KV flash-decoding), prefix (flash attention).

k_cache / v_cache are per-layer views [num_blocks, block_size, Hkv, D] of one pool tensor; they may be strided
across layers (strides are passed), with the last three dims contiguous. Token position p of a sequence lives
in block block_table[p // block_size] at offset p % block_size. Tiles gather token by token through the block
table, so a tile spans several pages and any block_size works (tested: 16, 32); a power of two makes that index
math shifts. head_dim up to 256 (padded to a power of two >= 16 for tl.dot). GQA: query head h reads kv head
h // (Hq // Hkv). Softmax runs in float32 (exp2); tl.dot takes the cache dtype (16-bit on the tensor cores,
IEEE fp32 for a float32 cache, so fp32 results match a float32 reference).

The wrappers only allocate and launch: no `.item()`, no host sync, grids sized from shapes and host ints, so
they can be captured in a CUDA graph. Tile sizes were checked to compile for sm_90 without register spills.
"""

from __future__ import annotations

import functools
import os

import torch

if not torch.cuda.is_available():
    # No GPU: Triton's interpreter runs the kernels on CPU with numpy (how CI tests them). Triton reads the
    # flag when kernels are decorated, so it must be set before the @triton.jit definitions below.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# tl.max, tl.sum, tl.zeros and tl.cdiv are themselves @triton.jit functions, decorated when triton is imported.
# If that came before TRITON_INTERPRET was set (transformers imports triton through torch._dynamo), they stay
# compiled functions that the interpreter cannot call. tl.reduce with their combine functions (which the
# interpreter maps to numpy) and tl.full work in both modes, so the kernels use those.
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine

LOG2E = 1.4426950408889634
MIN_SPLIT_TOKENS = 256  # a decode split shorter than this costs more in the reduce than it saves
MAX_SPLITS = 32
DEFAULT_NUM_SMS = 132  # H200 / H100 SXM; used when there is no GPU to ask (the interpreter)


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cs, stride_ch,
    NUM_KV_HEADS: tl.constexpr, HKV_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, HKV_PAD)[:, None]
    d = tl.arange(0, D_PAD)[None, :]
    # slot < 0: a padded row, touch nothing (a row width of 0: a scalar in a mask trips the interpreter).
    mask = (h < NUM_KV_HEADS) & (d < tl.where(slot >= 0, HEAD_DIM, 0))
    dst = blk * stride_cb + off * stride_cs + h * stride_ch + d
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    tl.store(kc_ptr + dst, k, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(vc_ptr + dst, v, mask=mask)


@triton.jit
def _attend_tile(
    q, kc_ptr, vc_ptr, bt_row, kv_off, stride_cb, stride_cs, start, kv_end, q_pos, m_i, l_i, acc, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_MODE: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """Online softmax over keys [start, start + BLOCK_N). MASK_MODE 0: every key visible to every row;
    1: keys < kv_end (decode); 2: causal, key position <= the row's q_pos (which implies < kv_end for real
    rows; rows past a sequence's length see zeros there and are never stored)."""
    pos = start + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D_PAD)
    valid = pos < kv_end  # loads past the context would follow unallocated block-table entries
    blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    offs = kv_off + blk[:, None] * stride_cb + (pos % BLOCK_SIZE)[:, None] * stride_cs + d[None, :]
    kv_mask = valid[:, None] & (d < HEAD_DIM)[None, :]
    k = tl.load(kc_ptr + offs, mask=kv_mask, other=0.0)
    if DOT_PREC == "ieee":  # fp32 operands: a float32 cache, or 16-bit ones in the interpreter
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if MASK_MODE == 1:
        s = tl.where(valid[None, :], s, float("-inf"))
    elif MASK_MODE == 2:
        s = tl.where(pos[None, :] <= q_pos[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
    v = tl.load(vc_ptr + offs, mask=kv_mask, other=0.0)
    if DOT_PREC == "ieee":
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, lens_ptr, o_ptr, m_ptr, l_ptr, qk_scale,
    stride_qb, stride_qh, stride_bt, stride_cb, stride_cs, stride_ch,
    stride_ob, stride_oh, stride_os, stride_mb, stride_mh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """One program per (sequence, kv head, split): the kv head's whole query group reads each tile once.
    Each sequence cuts its own context into NUM_SPLITS tile-aligned pieces. Writes the split's normalized
    output to o (the final output when NUM_SPLITS == 1) and its running max / sum to m / l."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(lens_ptr + b)
    split_len = ((ctx + NUM_SPLITS - 1) // NUM_SPLITS + TILE_N - 1) // TILE_N * TILE_N
    start = split * split_len
    end = tl.minimum(start + split_len, ctx)  # ctx 0 (a padded row): empty, reads nothing, writes zeros
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    heads = kvh * GROUP + g
    q_mask = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)
    q = q.to(tl.float32 if DOT_PREC == "ieee" else kc_ptr.dtype.element_ty)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.full([GROUP_PAD], 0.0, tl.float32)
    acc = tl.full([GROUP_PAD, D_PAD], 0.0, tl.float32)
    bt_row = bt_ptr + b * stride_bt
    for t0 in range(start, end, TILE_N):
        m_i, l_i, acc = _attend_tile(
            q, kc_ptr, vc_ptr, bt_row, kvh * stride_ch, stride_cb, stride_cs, t0, end, g, m_i, l_i, acc,
            qk_scale, HEAD_DIM, D_PAD, BLOCK_SIZE, TILE_N, 1, DOT_PREC,
        )  # fmt: skip
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_offs = b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :]
    tl.store(o_ptr + o_offs, out.to(o_ptr.dtype.element_ty), mask=q_mask)
    if NUM_SPLITS > 1:
        ml_offs = b * stride_mb + heads * stride_mh + split
        tl.store(m_ptr + ml_offs, m_i, mask=g < GROUP)
        tl.store(l_ptr + ml_offs, l_i, mask=g < GROUP)


@triton.jit
def _decode_reduce_kernel(
    part_ptr, m_ptr, l_ptr, out_ptr,
    stride_pb, stride_ph, stride_ps, stride_mb, stride_mh, stride_ob, stride_oh,
    NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
):  # fmt: skip
    """Merge one (sequence, query head)'s split outputs, each weighted by its share of the softmax sum."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D_PAD)
    s_mask = s < NUM_SPLITS
    ml_offs = b * stride_mb + h * stride_mh + s
    m = tl.load(m_ptr + ml_offs, mask=s_mask, other=float("-inf"))
    l_s = tl.load(l_ptr + ml_offs, mask=s_mask, other=0.0)
    m_max = tl.reduce(m, 0, _MAX)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty: weights 0, output 0
    w = l_s * tl.exp2(m - m_max)
    total = tl.reduce(w, 0, _SUM)
    p_mask = s_mask[:, None] & (d < HEAD_DIM)[None, :]
    part = tl.load(
        part_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :], mask=p_mask
    )
    out = tl.reduce(part * w[:, None], 0, _SUM) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _prefix_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, lens_ptr, qstart_ptr, out_ptr, qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, stride_cb, stride_cs, stride_ch,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """One program per (query tile, sequence, query head). The grid is sized from max_query_len; a tile past
    its sequence's own length loops over nothing and stores nothing."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest (last, causal) tiles start first
    b = tl.program_id(1)
    h = tl.program_id(2)
    q0 = tl.load(qstart_ptr + b)
    q_len = tl.load(qstart_ptr + b + 1) - q0
    first = tl.load(lens_ptr + b) - q_len  # position of the sequence's first new token
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D_PAD)
    q_pos = first + rows
    tile_rows = tl.minimum(q_len - m0, BLOCK_M)
    # Keys below full_end are visible to every row of the tile (no mask); the rest up to kv_end are causal.
    kv_end = tl.where(tile_rows > 0, first + m0 + tile_rows, 0)
    full_end = tl.where(tile_rows > 0, (first + m0 + 1) // BLOCK_N * BLOCK_N, 0)
    q_mask = (rows < q_len)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + (q0 + rows)[:, None] * stride_qt + h * stride_qh + d[None, :], mask=q_mask, other=0.0)
    q = q.to(tl.float32 if DOT_PREC == "ieee" else kc_ptr.dtype.element_ty)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, D_PAD], 0.0, tl.float32)
    bt_row = bt_ptr + b * stride_bt
    kv_off = (h // GROUP) * stride_ch
    for start in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, kc_ptr, vc_ptr, bt_row, kv_off, stride_cb, stride_cs, start, kv_end, q_pos, m_i, l_i, acc,
            qk_scale, HEAD_DIM, D_PAD, BLOCK_SIZE, BLOCK_N, 0, DOT_PREC,
        )  # fmt: skip
    for start in range(full_end, kv_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, kc_ptr, vc_ptr, bt_row, kv_off, stride_cb, stride_cs, start, kv_end, q_pos, m_i, l_i, acc,
            qk_scale, HEAD_DIM, D_PAD, BLOCK_SIZE, BLOCK_N, 2, DOT_PREC,
        )  # fmt: skip
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_offs = (q0 + rows)[:, None] * stride_ot + h * stride_oh + d[None, :]
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def _dims(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int]:
    """(group size, head_dim, head_dim padded to a power of two >= 16 for tl.dot)."""
    num_q_heads, head_dim = q.shape[-2], q.shape[-1]
    num_kv_heads = k_cache.shape[2]
    assert num_q_heads % num_kv_heads == 0, f"{num_q_heads} query heads over {num_kv_heads} kv heads"
    assert k_cache.shape[3] == head_dim and head_dim <= 256, f"head_dim {head_dim} vs cache {k_cache.shape}"
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1, (
        "k/v views: same strides, rows contiguous"
    )
    return num_q_heads // num_kv_heads, head_dim, max(16, triton.next_power_of_2(head_dim))


def _dot_precision(k_cache: torch.Tensor) -> str:
    """Dot precision. "ieee": fp32 operands, exact for a float32 cache; Triton's interpreter multiplies
    bfloat16 dot operands as their raw uint16 bits, so it gets fp32 ones too. "tf32" is a no-op on 16 bits."""
    if k_cache.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1":
        return "ieee"
    return "tf32"


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _decode_config(dtype: torch.dtype, d_pad: int) -> tuple[int, int]:
    """(tokens per KV tile, warps). A tile spans several pages gathered through the block table. float32 takes
    the FMA (not tensor-core) dot, whose register tiles spill at the 16-bit sizes (ptxas, sm_90)."""
    if dtype == torch.float32:
        return 32 * 128 // max(d_pad, 128), 8
    return 64 * 128 // max(d_pad, 128), 4


def _prefix_config(dtype: torch.dtype, d_pad: int, max_query_len: int) -> tuple[int, int, int]:
    """(BLOCK_M query rows, BLOCK_N keys, warps). Short queries (chunks, catch-ups) get short row tiles; long
    prompts take 128-row tiles on 8 warps (wgmma). Sized to run without register spills on sm_90."""
    rows = max(16, triton.next_power_of_2(max_query_len))
    if dtype == torch.float32:
        return min(32, rows), (16 if d_pad >= 128 else 32), 8
    if d_pad > 128:
        return min(64, rows), 32, 8
    if max_query_len >= 512:
        return 128, 64, 8
    return min(64, rows), 64, 4


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Splits per sequence so that batch * kv heads * splits fills about two waves of the SMs, with each
    split at least MIN_SPLIT_TOKENS of the longest context and at most MAX_SPLITS."""
    programs = max(1, batch * num_kv_heads)
    wanted = triton.cdiv(2 * num_sms, programs)
    return max(1, min(wanted, triton.cdiv(max(max_context, 1), MIN_SPLIT_TOKENS), MAX_SPLITS))


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:  # fmt: skip
    """k, v [T, Hkv, D] into the caches at flat slots slot_mapping[T] (= block * block_size + offset; int64).
    A slot < 0 writes nothing (padded rows of a CUDA-graph batch)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert k.stride(2) == 1 and v.stride(2) == 1 and k_cache.stride() == v_cache.stride()
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HKV_PAD=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim,
        D_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=k_cache.shape[1], num_warps=1,
    )  # fmt: skip


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, *, num_splits: int | None = None,
                     max_context_len: int | None = None) -> torch.Tensor:  # fmt: skip
    """One query token per sequence: q [B, Hq, D] -> out [B, Hq, D]. block_tables [B, W] int32, context_lens
    [B] int32 (tokens in the cache for that sequence, the query's own included; 0 = a padded row: output
    zeros, read nothing). Attends over positions [0, context_len).

    num_splits forces the split-KV count (tests); otherwise it comes from the batch and max_context_len, a
    host-side bound on the longest context (default: the block table's width, W * block_size)."""
    group, head_dim, d_pad = _dims(q, k_cache, v_cache)
    batch, num_q_heads = q.shape[0], q.shape[1]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    q = q if q.stride(2) == 1 else q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    if num_splits is None:
        bound = max_context_len if max_context_len is not None else block_tables.shape[1] * block_size
        num_splits = choose_num_splits(batch, num_kv_heads, bound, _num_sms(q.device))
    tile, warps = _decode_config(k_cache.dtype, d_pad)
    if num_splits == 1:
        part, m, l_sum = out, out, out  # m / l are not written with one split
        part_strides = (out.stride(0), out.stride(1), 0)
    else:
        part = torch.empty(batch, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        m = torch.empty(batch, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
        l_sum = torch.empty_like(m)
        part_strides = (part.stride(0), part.stride(1), part.stride(2))
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, part, m, l_sum, scale * LOG2E,
        q.stride(0), q.stride(1), block_tables.stride(0), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), *part_strides, m.stride(0), m.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, D_PAD=d_pad,
        BLOCK_SIZE=block_size, TILE_N=tile, NUM_SPLITS=num_splits, DOT_PREC=_dot_precision(k_cache),
        num_warps=warps, num_stages=3,
    )  # fmt: skip
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_q_heads)](
            part, m, l_sum, out, part.stride(0), part.stride(1), part.stride(2), m.stride(0), m.stride(1),
            out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, S_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim, D_PAD=d_pad,
            num_warps=1,
        )  # fmt: skip
    return out


def prefix_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, query_start: torch.Tensor, max_query_len: int,
                     scale: float) -> torch.Tensor:  # fmt: skip
    """Several new tokens per sequence (prefill, chunked prefill over a cached prefix, a preempted request
    catching up): q [T, Hq, D] holds sequence i's new tokens at rows query_start[i] .. query_start[i+1]-1
    (query_start [B+1] int32). Their K/V are already in the cache (store_kv runs first). The new tokens sit at
    the END of each sequence's context: row r of sequence i is at position context_lens[i] - q_len_i + r and
    attends causally to cache positions <= its own. Returns [T, Hq, D]."""
    group, head_dim, d_pad = _dims(q, k_cache, v_cache)
    num_q_heads = q.shape[1]
    batch = query_start.shape[0] - 1
    q = q if q.stride(2) == 1 else q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch <= 0 or max_query_len <= 0 or q.shape[0] == 0:
        return out
    block_m, block_n, warps = _prefix_config(k_cache.dtype, d_pad, max_query_len)
    _prefix_kernel[(triton.cdiv(max_query_len, block_m), batch, num_q_heads)](
        q, k_cache, v_cache, block_tables, context_lens, query_start, out, scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=k_cache.shape[1], BLOCK_M=block_m,
        BLOCK_N=block_n, DOT_PREC=_dot_precision(k_cache), num_warps=warps,
        num_stages=2 if k_cache.dtype == torch.float32 else 3,
    )  # fmt: skip
    return out
