"""BlockPool bookkeeping and PagedKVCache sizing."""

from __future__ import annotations

import pytest
import torch

from overfill_serve.engine.config import EngineConfig
from overfill_serve.errors import ModelConfigError
from overfill_serve.kv.block_pool import BlockPool
from overfill_serve.kv.paged_cache import PagedKVCache


def test_allocate_and_free():
    pool = BlockPool(8)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert a is not None and b is not None
    assert len(set(a) | set(b)) == 8 and pool.num_free == 0
    assert pool.allocate(1) is None and pool.num_free == 0
    pool.free(a)
    assert pool.num_free == 3 and pool.allocate(4) is None
    pool.free(b)
    assert pool.num_free == 8 and pool.num_used == 0
    with pytest.raises(AssertionError, match="freed twice"):
        pool.free(b[:1])


def test_cache_sized_from_budget_and_layer_views():
    bpb = PagedKVCache.bytes_per_block(4, 16, 2, 8, torch.float32)
    assert bpb == 4 * 2 * 16 * 2 * 8 * 4
    n = EngineConfig(kv_cache_bytes=10 * bpb + bpb // 2).resolved().num_blocks(4, 2, 8)
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


def test_engine_config_context_limit_and_validation():
    """One rule for the longest sequence: the configured cap, the models' positions, and what the pool holds
    (a request running alone must fit)."""
    assert EngineConfig().context_limit(4096, num_blocks=100) == 1600  # 100 blocks of 16 tokens
    assert EngineConfig(max_model_len=512).context_limit(4096, num_blocks=100) == 512
    assert EngineConfig(num_kv_blocks=10, block_size=4).context_limit(4096) == 40  # before the pool exists
    assert EngineConfig().context_limit(2048) == 2048  # pool unknown yet: the model's limit
    for bad in ({"block_size": 0}, {"max_num_seqs": -1}, {"num_swap_blocks": -2}, {"kv_cache_bytes": 1.5}):
        with pytest.raises(ModelConfigError, match=next(iter(bad))):
            EngineConfig(**bad)
    with pytest.raises(ModelConfigError, match="holds no block"):
        EngineConfig(kv_cache_bytes=100).resolved().num_blocks(4, 2, 8)


def test_engine_config_resolves_for_the_device():
    """auto / None become what each device calls for; a CUDA graph cannot capture torch attention's syncs."""
    cpu, gpu = EngineConfig().resolved(), EngineConfig(device="cuda").resolved()
    assert (cpu.dtype, cpu.attention_backend, cpu.cuda_graphs, cpu.pad_to_multiple) == (
        "float32",
        "torch",
        False,
        0,
    )
    assert (gpu.dtype, gpu.attention_backend, gpu.cuda_graphs, gpu.pad_to_multiple) == (
        "bfloat16",
        "triton",
        True,
        64,
    )
    assert EngineConfig(device="cuda", attention_backend="torch").resolved().cuda_graphs is False
    forced = EngineConfig(dtype="float16", attention_backend="triton", cuda_graphs=True, pad_to_multiple=128)
    assert forced.resolved() == forced  # explicit settings stand
    with pytest.raises(ModelConfigError, match="cuda_graphs needs attention_backend='triton'"):
        EngineConfig(device="cuda", attention_backend="torch", cuda_graphs=True).resolved()
    with pytest.raises(ModelConfigError, match="attention_backend"):
        EngineConfig(attention_backend="flash")
