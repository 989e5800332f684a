"""Triton paged attention against an independent float64 softmax over each sequence's own K/V.

On a machine without a GPU the kernels run in Triton's interpreter, so the shapes stay tiny. Every cache slot
that no sequence owns (the rest of a partly filled block, spare blocks, the other layer, the padding of the
block tables) holds NaN: a kernel that reads one, or misses a mask, returns NaN and fails the comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from overfill_serve.model.triton_attention import (
    MAX_SPLITS,
    choose_num_splits,
    decode_attention,
    prefix_attention,
    store_kv,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: {"atol": 2e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2}}


@dataclass
class Paged:
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D], a strided view of the pool
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, W] int32, scattered blocks, padded with a NaN-filled block
    context_lens: torch.Tensor  # [B] int32
    keys: list[torch.Tensor]  # per sequence [context_len, Hkv, D], what the reference attends over
    values: list[torch.Tensor]


def make_pool(num_blocks: int, block_size: int, hkv: int, d: int, dtype: torch.dtype, interleaved: bool):
    """Layer 1's k / v views of a NaN-filled two-layer pool. The engine's layout [layers, 2, blocks, ...];
    interleaved [blocks, layers, 2, ...] makes each view strided across blocks, as a kernel must allow."""
    shape = (num_blocks, 2, 2) if interleaved else (2, 2, num_blocks)
    pool = torch.full((*shape, block_size, hkv, d), float("nan"), dtype=dtype, device=DEVICE)
    return (pool, *make_pool_views(pool, interleaved))


def make_pool_views(pool: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return (pool[:, 1, 0], pool[:, 1, 1]) if interleaved else (pool[1, 0], pool[1, 1])


def make_paged(lens: list[int], hkv: int, d: int, dtype: torch.dtype, block_size: int = 16,
               interleaved: bool = True, seed: int = 0) -> Paged:  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + 3
    free = torch.randperm(num_blocks, generator=g).tolist()  # shuffled: tables are not contiguous
    poison = free.pop()  # never written: NaN
    _, k_cache, v_cache = make_pool(num_blocks, block_size, hkv, d, dtype, interleaved)
    tables = torch.full((len(lens), max(need) + 1), poison, dtype=torch.int32)
    keys, values = [], []
    for i, (n, nb) in enumerate(zip(lens, need)):
        tables[i, :nb] = torch.tensor([free.pop() for _ in range(nb)], dtype=torch.int32)
        k = torch.randn(n, hkv, d, generator=g).to(dtype).to(DEVICE)
        v = torch.randn(n, hkv, d, generator=g).to(dtype).to(DEVICE)
        pos = torch.arange(n)
        blocks = tables[i, pos // block_size].long().to(DEVICE)
        k_cache[blocks, (pos % block_size).to(DEVICE)] = k
        v_cache[blocks, (pos % block_size).to(DEVICE)] = v
        keys.append(k)
        values.append(v)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    return Paged(k_cache, v_cache, tables.to(DEVICE), lens_t, keys, values)


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
              scale: float) -> torch.Tensor:  # fmt: skip
    """q [L, Hq, D] at absolute `positions` attends to keys at positions <= its own. Float64, explicit."""
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    s = torch.einsum("lhd,nhd->hln", q.double(), k) * scale
    visible = torch.arange(keys.shape[0], device=q.device)[None, :] <= positions[:, None]
    s = s.masked_fill(~visible, float("-inf"))
    return torch.einsum("hln,nhd->lhd", s.softmax(-1), v)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_store_kv_writes_only_its_slots(dtype, interleaved):
    block_size, hkv, d, num_blocks = 16, 2, 32, 6
    pool, k_cache, v_cache = make_pool(num_blocks, block_size, hkv, d, dtype, interleaved)
    pool.copy_(torch.randn(pool.shape, generator=torch.Generator().manual_seed(1)).to(dtype))
    before = pool.clone()
    slots = torch.tensor([37, -1, 5, 90, -1, 16, 95], dtype=torch.int64, device=DEVICE)
    # k and v as slices of one fused qkv tensor: token stride larger than Hkv * D.
    qkv = torch.randn(len(slots), 3, hkv, d, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)
    k, v = qkv[:, 1], qkv[:, 2]
    store_kv(k, v, k_cache, v_cache, slots)

    expected = before.clone()
    ek, ev = make_pool_views(expected, interleaved)
    real = slots >= 0
    ek[slots[real] // block_size, slots[real] % block_size] = k[real]
    ev[slots[real] // block_size, slots[real] % block_size] = v[real]
    assert torch.equal(pool, expected)  # exact: the other layer, the padded rows' slots all untouched
    assert not torch.equal(pool, before)


DECODE_CASES = [  # Hq, Hkv, head_dim, dtype, block_size, num_splits (None: the heuristic)
    (6, 2, 32, torch.float32, 16, None),
    (6, 2, 32, torch.float32, 16, 3),
    (2, 2, 64, torch.float32, 32, 4),
    (24, 8, 16, torch.float32, 16, 2),
    (6, 2, 128, torch.bfloat16, 16, 3),
    (4, 4, 64, torch.bfloat16, 16, None),
]


@pytest.mark.parametrize(("hq", "hkv", "d", "dtype", "block_size", "splits"), DECODE_CASES)
def test_decode_matches_reference(hq, hkv, d, dtype, block_size, splits):
    lens = [1, 16, 0, 32, 150, 77]  # one token, block boundaries, a padded row, several blocks
    paged = make_paged(lens, hkv, d, dtype, block_size)
    q = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    scale = d**-0.5
    out = decode_attention(
        q, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens, scale, num_splits=splits
    )
    for i, n in enumerate(lens):
        if n == 0:
            assert torch.equal(out[i], torch.zeros_like(out[i]))
            continue
        pos = torch.tensor([n - 1], device=DEVICE)
        assert_close(
            out[i : i + 1], reference(q[i : i + 1], paged.keys[i], paged.values[i], pos, scale), dtype
        )


def test_decode_heuristic_splits_a_long_context():
    """One sequence, long context: the heuristic splits it (no forcing) and the merge is exact."""
    lens, hq, hkv, d = [600], 4, 2, 16
    assert choose_num_splits(1, hkv, 640, 132) > 1
    paged = make_paged(lens, hkv, d, torch.float32)
    q = torch.randn(1, hq, d, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    cache = (paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens)
    ref = reference(q, paged.keys[0], paged.values[0], torch.tensor([599], device=DEVICE), d**-0.5)
    assert_close(decode_attention(q, *cache, d**-0.5), ref, torch.float32)
    # A tighter host-side bound on the longest context (here 300: fewer splits) changes nothing but speed.
    assert_close(decode_attention(q, *cache, d**-0.5, max_context_len=300), ref, torch.float32)


def test_choose_num_splits():
    assert choose_num_splits(256, 8, 4096, 132) == 1  # the batch alone fills the SMs
    assert choose_num_splits(1, 8, 100, 132) == 1  # too short to be worth a merge
    assert choose_num_splits(1, 8, 4096, 132) == 16  # one split per 256 tokens
    assert choose_num_splits(1, 1, 1 << 20, 132) == MAX_SPLITS
    assert choose_num_splits(4, 8, 1 << 20, 132) == 9  # 4 * 8 * 9 programs: two waves of 132


PREFIX_CASES = [  # Hq, Hkv, head_dim, dtype, block_size
    (6, 2, 32, torch.float32, 16),
    (2, 2, 64, torch.float32, 32),
    (24, 8, 16, torch.float32, 16),
    (6, 2, 128, torch.bfloat16, 16),
]


def run_prefix(paged: Paged, q_lens: list[int], hq: int, d: int, dtype: torch.dtype, extra_grid: int = 0):
    starts = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    q = torch.randn(sum(q_lens), hq, d, generator=torch.Generator().manual_seed(5)).to(dtype).to(DEVICE)
    scale = d**-0.5
    max_q = max(q_lens) + extra_grid
    args = (paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens, starts, max_q, scale)
    out = prefix_attention(q, *args)
    assert out.shape == q.shape
    for i, (q_len, n) in enumerate(zip(q_lens, paged.context_lens.tolist())):
        rows = slice(int(starts[i]), int(starts[i + 1]))
        pos = torch.arange(n - q_len, n, device=DEVICE)
        assert_close(out[rows], reference(q[rows], paged.keys[i], paged.values[i], pos, scale), dtype)


@pytest.mark.parametrize(("hq", "hkv", "d", "dtype", "block_size"), PREFIX_CASES)
def test_prefix_fresh_prompts(hq, hkv, d, dtype, block_size):
    lens = [1, 16, 70, 32]
    run_prefix(make_paged(lens, hkv, d, dtype, block_size), lens, hq, d, dtype)


@pytest.mark.parametrize(("hq", "hkv", "d", "dtype", "block_size"), PREFIX_CASES)
def test_prefix_chunks_over_cached_prefix(hq, hkv, d, dtype, block_size):
    """Mixed in one call: a chunk over a cached prefix, a one-token catch-up, a fresh prompt, a long chunk, and a
    chunk starting at position 62, so the last key that every row of its first tile sees ends a 64-key tile."""
    lens, q_lens = [40, 33, 20, 150, 80], [17, 1, 20, 70, 18]
    run_prefix(make_paged(lens, hkv, d, dtype, block_size, seed=1), q_lens, hq, d, dtype)


def test_prefix_grid_larger_than_any_query():
    """max_query_len is an upper bound from the host: tiles past every sequence's length store nothing."""
    lens, q_lens = [48, 9], [30, 9]
    run_prefix(make_paged(lens, 2, 32, torch.float32, interleaved=False), q_lens, 2, 32, torch.float32, 100)


def test_store_then_attend_round_trip():
    """store_kv fills the cache that prefix and decode then read, as one engine step after another."""
    hkv, hq, d, block_size, n = 2, 6, 32, 16, 21
    paged = make_paged([n], hkv, d, torch.float32)  # allocates the table; its contents are overwritten
    k, v = torch.randn(2, n, hkv, d, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    table = paged.block_tables[0].long()
    pos = torch.arange(n, device=DEVICE)
    store_kv(k, v, paged.k_cache, paged.v_cache, table[pos // block_size] * block_size + pos % block_size)
    q = torch.randn(n, hq, d, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    starts = torch.tensor([0, n], dtype=torch.int32, device=DEVICE)
    cache = (paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens)
    assert_close(
        prefix_attention(q, *cache, starts, n, d**-0.5), reference(q, k, v, pos, d**-0.5), torch.float32
    )
    last = decode_attention(q[-1:], *cache, d**-0.5, num_splits=2)
    assert_close(last, reference(q[-1:], k, v, pos[-1:], d**-0.5), torch.float32)
