"""Role-aware autoscaling: the pure decision, the Serve policy adapter, and a real burst on Ray Serve where the
decode pool scales 1 -> 2 -> 1 and every request of the burst completes with the offline output."""

from __future__ import annotations

import http.client
import json
import threading
import time
from types import SimpleNamespace

import pytest

from overfill_serve.errors import ModelConfigError
from overfill_serve.serve.autoscaling import RoleAutoscaler, desired_replicas

TARGETS = {"queued_prompt_tokens": 1000.0, "kv_utilization": 0.5, "running": 4.0}


def test_desired_replicas_by_role():
    # prefill: 2500 queued prompt tokens over a 1000-token target -> 3 replicas
    assert (
        desired_replicas(
            "prefill", [{"queued_prompt_tokens": 2000}, {"queued_prompt_tokens": 500}], TARGETS, 1, 8
        )
        == 3
    )
    # decode: the tighter of KV utilisation (0.9 / 0.5) and running sequences (2 / 4) counts
    assert desired_replicas("decode", [{"kv_utilization": 0.9, "running": 2}], TARGETS, 1, 8) == 2
    assert desired_replicas("decode", [{"kv_utilization": 0.1, "running": 10}], TARGETS, 1, 8) == 3
    # idle pools shrink to the minimum; bursts stop at the maximum
    assert desired_replicas("decode", [{"kv_utilization": 0.0, "running": 0}] * 3, TARGETS, 1, 8) == 1
    assert desired_replicas("prefill", [{"queued_prompt_tokens": 10**6}], TARGETS, 1, 4) == 4


def _ctx(metrics, current, state=None, now=0.0):
    return SimpleNamespace(
        aggregated_metrics=metrics,
        current_num_replicas=current,
        policy_state=state or {},
        current_time=now,
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=4,
    )


def test_policy_scales_up_at_once_and_down_after_the_delay():
    policy = RoleAutoscaler("decode", kv_utilization=0.5, running=4, downscale_delay_s=10)
    busy = {"kv_utilization": {"r1": 0.9, "r2": 0.8}, "running": {"r1": 3, "r2": 3}}
    assert policy(_ctx(busy, current=2))[0] == 4  # (0.9 + 0.8) / 0.5 = 3.4 -> 4
    idle = {"kv_utilization": {"r1": 0.0, "r2": 0.0}, "running": {"r1": 0, "r2": 0}}
    n, state = policy(_ctx(idle, current=2, now=100.0))
    assert n == 2 and state["low_since"] == 100.0  # a lull: wait
    assert policy(_ctx(idle, current=2, state=state, now=105.0))[0] == 2
    assert policy(_ctx(idle, current=2, state=state, now=110.0))[0] == 1
    assert policy(_ctx(busy, current=2, state=state, now=106.0)) == (4, {})  # load came back: timer reset


def test_bad_policy_settings_are_refused():
    with pytest.raises(ModelConfigError, match="role"):
        RoleAutoscaler("router")
    with pytest.raises(ModelConfigError, match="positive"):
        RoleAutoscaler("decode", running=0)


def test_decode_pool_scales_with_a_burst(pairs):
    pytest.importorskip("ray")
    from ray import serve
    from serve_harness import HTTP_PORT, load_app_config, run_app, start_ray
    from serve_harness import wait_until as wait

    from overfill_serve import LLM, SamplingParams

    pair = pairs["width"]
    policy = {
        "policy_function": "overfill_serve.serve.autoscaling:RoleAutoscaler",
        "policy_kwargs": {"role": "decode", "running": 1, "downscale_delay_s": 2},
    }
    options = {
        "DecodeServer": {
            "autoscaling_config": {
                "min_replicas": 1,
                "max_replicas": 2,
                "metrics_interval_s": 0.5,
                "look_back_period_s": 1,
                "upscale_delay_s": 0,
                "downscale_delay_s": 0,
                "policy": policy,
            }
        }
    }
    args = {
        "pair_name": "burst",
        "prefill_model": str(pair.teacher),
        "decode_model": str(pair.student),
        "block_size": 4,
        "prefill_kv_blocks": 256,
        "decode_kv_blocks": 1024,
    }
    config, _ = load_app_config()
    start_ray({})
    try:
        run_app(args, "burst", config["grpc_options"]["grpc_servicer_functions"], options=options)

        def running_replicas() -> int:
            states = serve.status().applications["burst"].deployments["DecodeServer"].replica_states
            return sum(n for state, n in states.items() if str(state).endswith("RUNNING"))

        prompt = list(range(20, 60))
        want = (
            LLM(pair.teacher, pair.student, num_kv_blocks=256, block_size=4)
            .generate(prompt, SamplingParams(max_tokens=600, temperature=0, ignore_eos=True))[0]
            .text
        )
        body = json.dumps(
            {"model": "burst", "prompt": prompt, "max_tokens": 600, "temperature": 0, "ignore_eos": True}
        )
        results: list[tuple[int, str]] = []  # checked here: an assert in a thread would not fail the test

        def client() -> None:
            for _ in range(6):
                conn = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=120)
                conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                payload = json.loads(response.read())
                results.append(
                    (response.status, payload.get("choices", [{}])[0].get("text") or str(payload)[:300])
                )

        assert running_replicas() == 1
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        peak, start = 1, time.monotonic()
        while any(t.is_alive() for t in threads) and time.monotonic() - start < 180:
            peak = max(peak, running_replicas())
            time.sleep(0.25)
        for t in threads:
            t.join(timeout=60)
        assert results == [(200, want)] * 24
        assert peak == 2
        wait(lambda: running_replicas() == 1, timeout=60, what="the decode pool back to one replica")
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
