"""Replica choice as pure functions: prefill by queued prompt tokens, decode by free KV and running requests."""

from __future__ import annotations

from overfill_serve.serve.replica_router import PrefixAffinity, load_score, rank_replicas
from overfill_serve.worker.worker_stats import WorkerStats


def _stats(
    free: int = 100, total: int = 100, running: int = 0, waiting: int = 0, queued: int = 0
) -> WorkerStats:
    return WorkerStats(free, total, waiting, running, 0, queued, 0, 0.0, block_size=16)


def _decode(free: int, total: int = 100, running: int = 0, waiting: int = 0) -> WorkerStats:
    return _stats(free, total, running, waiting)


def test_decode_prefers_free_kv_then_fewer_sequences():
    stats = [_decode(10), _decode(80, running=5), _decode(80, running=1), _decode(50)]
    assert rank_replicas("decode", stats) == [2, 1, 3, 0]


def test_decode_compares_fractions_across_pool_sizes():
    # 300 of 1000 free is a fuller replica than 50 of 100 free.
    assert rank_replicas("decode", [_decode(300, total=1000), _decode(50, total=100)]) == [1, 0]


def test_prefill_prefers_fewest_queued_prompt_tokens():
    stats = [_stats(queued=5000, waiting=1), _stats(queued=0), _stats(queued=5000)]
    assert rank_replicas("prefill", stats) == [1, 2, 0]


def test_replicas_without_stats_rank_last_and_ties_spread():
    assert rank_replicas("decode", [None, _decode(10), None])[0] == 1
    assert {rank_replicas("decode", [_decode(10), None])[0] for _ in range(50)} == {0}
    firsts = [rank_replicas("prefill", [_stats(queued=7)] * 3)[0] for _ in range(300)]
    assert all(firsts.count(i) > 50 for i in range(3))  # equal replicas share the traffic
    assert load_score("decode", None) > load_score("decode", _decode(0))


def test_prefill_goes_where_the_prefix_is_cached_until_its_queue_outweighs_it():
    """Work = queued prompt tokens less what the replica likely holds of this prompt."""
    idle, busy = _stats(queued=0), _stats(queued=600)
    assert rank_replicas("prefill", [idle, busy], cached_blocks=[0, 64])[0] == 1  # saves more than it waits
    assert rank_replicas("prefill", [idle, busy], cached_blocks=[0, 32])[0] == 0  # a hot prefix spreads


def test_decode_goes_where_the_prefix_is_cached_until_another_has_that_much_more_free_kv():
    """Room = free blocks plus the blocks of this prompt the replica likely holds."""
    holder, other = _decode(40), _decode(60)
    assert rank_replicas("decode", [other, holder], cached_blocks=[0, 30])[0] == 1
    assert rank_replicas("decode", [other, holder], cached_blocks=[0, 10])[0] == 0  # too full to be worth it


def test_prefix_affinity_remembers_where_each_prompt_block_went():
    affinity = PrefixAffinity(block_size=4, model="teacher", capacity=6)
    system, a, b = list(range(8)), [50, 51, 52, 53], [60, 61, 62, 63]
    first = affinity.hashes(system + a)
    affinity.record(first, "r1")
    second = affinity.hashes(system + b)
    assert affinity.cached_blocks(second, "r1") == 2  # the shared two blocks, not the other question's
    assert affinity.cached_blocks(second, "r2") == 0
    affinity.record(second, "r2")  # the shared blocks now count for r2, the one that saw them last
    assert affinity.cached_blocks(first, "r2") == 2 and affinity.cached_blocks(first, "r1") == 0
    affinity.record(affinity.hashes(list(range(100, 124))), "r3")  # six blocks: the oldest are forgotten
    assert affinity.cached_blocks(second, "r2") == 0
