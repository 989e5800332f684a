"""Scale-down loses nothing in flight. The decode pool goes from 2 replicas to 1 while long streams run on both
replicas: the replica chosen for removal gets no new requests and either finishes its streams within
its graceful-shutdown window or, when the window is too short, its streams migrate (re-prefill with the
tokens so far) and still end with the offline engine's text. The requests that arrive after the scale-down
are served by the replicas that remain."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("ray")
from serve_harness import (
    completion,
    deploy_config,
    load_app_config,
    pair_args,
    replica_stats,
    start_ray,
    wait_until,
)

from overfill_serve import LLM, SamplingParams

PROMPTS = [list(range(20, 50)), list(range(60, 75)), list(range(5, 45)), list(range(100, 130))]
MAX_TOKENS = 1900  # a few seconds a stream on the tiny model: still running at the scale-down


def _deployments(replicas: int, decode_grace_s: float) -> list[dict]:
    return [{"name": "DecodeServer", "num_replicas": replicas, "graceful_shutdown_timeout_s": decode_grace_s}]


def _complete(prompt: list[int], results: dict[int, tuple[int, str]], key: int) -> None:
    body = {
        "model": "shrink",
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }
    results[key] = completion(body, timeout=180)


@pytest.mark.slow  # about 40 s each: long streams through a real scale-down
@pytest.mark.parametrize("decode_grace_s, migrates", [(60.0, False), (0.5, True)], ids=["finish", "migrate"])
def test_scale_down_mid_stream_loses_nothing(pairs, decode_grace_s, migrates):
    from ray import serve

    pair = pairs["width"]
    args = pair_args(
        pair,
        "shrink",
        prefill_kv_blocks=512,
        decode_kv_blocks=2048,  # four ~1900-token streams on the replica that remains
        transfer={"secret": "scale-down-test-secret"},  # the same args each deploy: a scale, not a redeploy
    )
    llm = LLM(pair.teacher, pair.student, num_kv_blocks=512, block_size=4)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    want = [out.text for out in llm.generate(PROMPTS, params)]
    servicers = load_app_config()[0]["grpc_options"]["grpc_servicer_functions"]
    start_ray({})
    try:
        deploy_config(args, "shrink", servicers, _deployments(2, decode_grace_s))
        results: dict[int, tuple[int, str]] = {}
        threads = []
        for i, prompt in enumerate(PROMPTS):  # spaced so the router sees each replica's load
            threads.append(threading.Thread(target=_complete, args=(prompt, results, i)))
            threads[-1].start()
            time.sleep(0.7)
        busy = [s for s in replica_stats("shrink", "DecodeServer") if s["running"] > 0]
        assert len(busy) == 2, "both decode replicas should be streaming before the scale-down"

        deploy_config(args, "shrink", servicers, _deployments(1, decode_grace_s))  # an in-place update
        assert len(replica_stats("shrink", "DecodeServer")) == 1
        late: dict[int, tuple[int, str]] = {}
        _complete(PROMPTS[0], late, 0)  # the remaining replicas serve what comes next
        for t in threads:
            t.join(timeout=180)

        assert [results[i] for i in range(len(PROMPTS))] == [(200, text) for text in want]
        assert late == {0: (200, want[0])}
        [prefill] = replica_stats("shrink", "PrefillServer")
        [decode] = replica_stats("shrink", "DecodeServer")
        # one prefill per request, plus one per stream cut at the deadline and migrated
        assert (prefill["prefilled"] > len(PROMPTS) + 1) == migrates
        wait_until(lambda: replica_stats("shrink", "DecodeServer")[0]["running"] == 0, timeout=30)
        for stats in replica_stats("shrink", "PrefillServer") + replica_stats("shrink", "DecodeServer"):
            assert stats["free_blocks"] == stats["total_blocks"]
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
