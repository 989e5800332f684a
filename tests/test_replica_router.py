"""Replica choice as pure functions: prefill by queued prompt tokens, decode by free KV and running requests."""

from __future__ import annotations

from overfill_serve.serve.replica_router import load_score, rank_replicas
from overfill_serve.worker.worker_stats import WorkerStats


def _stats(
    free: int = 100, total: int = 100, running: int = 0, waiting: int = 0, queued: int = 0
) -> WorkerStats:
    return WorkerStats(free, total, waiting, running, 0, queued, 0, 0.0)


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
