"""Cache-aware routing (issue 13 item 4) on real Ray Serve: with two prefill and two decode replicas, a prompt
sent again goes to the prefill replica that prefilled it before, so its prefix cache serves it, and to the
decode replica that received its KV before, so only the block with its last token travels; outputs are
unchanged. (Without affinity the two idle replicas of each pool share the requests at random: the hits
would split.)"""

from __future__ import annotations

import pytest

pytest.importorskip("ray")
from serve_harness import (  # noqa: E402
    completion,
    health_status,
    load_app_config,
    pair_args,
    pools_full,
    replica_stats,
    run_app,
    start_ray,
    wait_until,
)

APP = "routing"
PROMPT = list(range(100, 140))  # 40 tokens: nine cached blocks of 4 before the last token's


@pytest.fixture(scope="module")
def served(pairs):
    import ray
    from ray import serve

    config, _ = load_app_config()
    start_ray({})
    options = {"PrefillServer": {"num_replicas": 2}, "DecodeServer": {"num_replicas": 2}}
    run_app(
        pair_args(pairs["width"], APP),
        APP,
        config["grpc_options"]["grpc_servicer_functions"],
        options=options,
    )
    wait_until(lambda: health_status() == 200, timeout=60, what="/health 200")
    for pool in ("PrefillServer", "DecodeServer"):
        wait_until(lambda p=pool: len(replica_stats(APP, p)) == 2, timeout=60, what=f"two {pool} replicas")
    yield
    serve.shutdown()
    ray.shutdown()


def test_a_repeated_prompt_goes_where_its_prefix_is_cached(served):
    body = {"model": APP, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    outputs = [completion(body) for _ in range(8)]
    assert all(status == 200 for status, _ in outputs) and len({text for _, text in outputs}) == 1
    for pool in ("PrefillServer", "DecodeServer"):  # each request after the first found 36 tokens on one
        hits = sorted(s["prefix_hits"] for s in replica_stats(APP, pool))
        assert hits == [0, 7 * 36], (pool, hits)
    moved = [t for s in replica_stats(APP, "DecodeServer") for t in s["kv_transfers"].values()]
    # Ten blocks a prompt: the first request pulled all of them, each later one only its last.
    sent, saved = sum(t["nbytes"] for t in moved), sum(t["saved_bytes"] for t in moved)
    assert saved * (10 + 7) == sent * 7 * 9, (sent, saved)
    wait_until(lambda: pools_full(APP), timeout=30, what="KV pools full")
