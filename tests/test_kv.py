"""BlockPool bookkeeping and PagedKVCache sizing."""

from __future__ import annotations

import torch

from overfill_serve.kv.block_pool import BlockPool
from overfill_serve.kv.paged_cache import PagedKVCache


def test_allocate_free_and_refcounts():
    pool = BlockPool(8)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert a is not None and b is not None
    assert len(set(a) | set(b)) == 8 and pool.num_free == 0
    assert pool.allocate(1) is None and pool.num_free == 0
    pool.share(a)  # a second holder (e.g. a transfer lease)
    pool.free(a)
    assert pool.num_free == 0  # still held once
    pool.free(a)
    pool.free(b)
    assert pool.num_free == 8 and pool.num_used == 0


def test_cache_sized_from_budget_and_layer_views():
    bpb = PagedKVCache.bytes_per_block(4, 16, 2, 8, torch.float32)
    assert bpb == 4 * 2 * 16 * 2 * 8 * 4
    n = PagedKVCache.blocks_for_budget(10 * bpb + bpb // 2, 4, 16, 2, 8, torch.float32)
    assert n == 10
    cache = PagedKVCache(4, n, 16, 2, 8, torch.float32)
    assert cache.nbytes == n * bpb
    k, v = cache.layer(2)
    k.fill_(1.0)
    assert cache.tensor[2, 0].sum() == k.numel() and cache.tensor[2, 1].sum() == 0
    assert [kv[0].data_ptr() for kv in cache.layers((0, 3))] == [
        cache.layer(0)[0].data_ptr(),
        cache.layer(3)[0].data_ptr(),
    ]
