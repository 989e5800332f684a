"""A decode replica whose KV pool is far too small for the requests it holds: preempted requests swap their KV
to host memory and back, every request completes with the offline engine's text, and none goes back to
the prefill pool (each prompt is prefilled exactly once)."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("ray")
from serve_harness import completion, load_app_config, pair_args, replica_stats, run_app, start_ray

from overfill_serve import LLM, SamplingParams

PROMPTS = [list(range(10 + 7 * i, 40 + 7 * i)) for i in range(6)]
MAX_TOKENS = 150  # 30 + 150 tokens = 45 blocks of 4 a request; six of them against a 64-block decode pool


def test_squeezed_decode_pool_swaps_and_loses_nothing(pairs):
    from ray import serve

    pair = pairs["width"]
    args = pair_args(pair, "squeeze", prefill_kv_blocks=256, decode_kv_blocks=64, decode_swap_blocks=256)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    want = [
        out.text
        for out in LLM(pair.teacher, pair.student, num_kv_blocks=256, block_size=4).generate(PROMPTS, params)
    ]
    start_ray({})
    try:
        run_app(args, "squeeze", load_app_config()[0]["grpc_options"]["grpc_servicer_functions"])
        results: dict[int, tuple[int, str]] = {}

        def complete(i: int) -> None:
            body = {"model": "squeeze", "prompt": PROMPTS[i], "max_tokens": MAX_TOKENS, "temperature": 0}
            results[i] = completion({**body, "ignore_eos": True})

        threads = [threading.Thread(target=complete, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        assert [results.get(i) for i in range(len(PROMPTS))] == [(200, text) for text in want]
        [prefill] = replica_stats("squeeze", "PrefillServer")
        [decode] = replica_stats("squeeze", "DecodeServer")
        assert prefill["prefilled"] == len(PROMPTS)  # no request was handed back for a re-prefill
        assert decode["finished"] == len(PROMPTS) and decode["free_blocks"] == decode["total_blocks"]
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
