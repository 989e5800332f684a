"""Role-aware autoscaling: the pure decision, the Serve policy adapter, and real bursts on Ray Serve where the
decode pool (long generations) and the prefill pool (long prompts) each scale 1 -> 2 -> 1, both replicas
take traffic, and every request of the burst completes with the offline output."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from overfill_serve.errors import ModelConfigError
from overfill_serve.serve.autoscaling import RoleAutoscaler, desired_replicas

TARGETS = {"queued_prompt_tokens": 1000.0, "kv_utilization": 0.5, "requests": 4.0}


def test_desired_replicas_by_role():
    # prefill: 2500 queued prompt tokens over a 1000-token target -> 3 replicas
    assert (
        desired_replicas(
            "prefill", [{"queued_prompt_tokens": 2000}, {"queued_prompt_tokens": 500}], TARGETS, 1, 8
        )
        == 3
    )
    # decode: the tighter of KV utilisation (0.9 / 0.5) and requests held (2 / 4) counts
    assert desired_replicas("decode", [{"kv_utilization": 0.9, "requests": 2}], TARGETS, 1, 8) == 2
    assert desired_replicas("decode", [{"kv_utilization": 0.1, "requests": 10}], TARGETS, 1, 8) == 3
    # idle pools shrink to the minimum; bursts stop at the maximum
    assert desired_replicas("decode", [{"kv_utilization": 0.0, "requests": 0}] * 3, TARGETS, 1, 8) == 1
    assert desired_replicas("prefill", [{"queued_prompt_tokens": 10**6}], TARGETS, 1, 4) == 4


def test_latency_targets_scale_like_work():
    targets = {**TARGETS, "ttft_s": 0.5, "tpot_s": 0.05}
    # a short queue, but one replica's TTFT is 3x its target and the other's on target: 3 + 1 -> 4
    prefill = [{"queued_prompt_tokens": 10, "ttft_s": 1.5}, {"queued_prompt_tokens": 0, "ttft_s": 0.5}]
    assert desired_replicas("prefill", prefill, targets, 1, 8) == 4
    decode = [{"kv_utilization": 0.1, "requests": 1, "tpot_s": 0.12}]
    assert desired_replicas("decode", decode, targets, 1, 8) == 3
    # without latency targets the same replicas ask for no more than their work
    assert desired_replicas("prefill", prefill, TARGETS, 1, 8) == 1
    assert desired_replicas("decode", decode, TARGETS, 1, 8) == 1
    assert RoleAutoscaler("decode", tpot_s=0.05).targets["tpot_s"] == 0.05
    assert "ttft_s" not in RoleAutoscaler("prefill").targets
    with pytest.raises(ModelConfigError, match="positive"):
        RoleAutoscaler("prefill", ttft_s=0)


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
    policy = RoleAutoscaler("decode", kv_utilization=0.5, requests=4, downscale_delay_s=10)
    busy = {"kv_utilization": {"r1": 0.9, "r2": 0.8}, "requests": {"r1": 3, "r2": 3}}
    assert policy(_ctx(busy, current=2))[0] == 4  # (0.9 + 0.8) / 0.5 = 3.4 -> 4
    idle = {"kv_utilization": {"r1": 0.0, "r2": 0.0}, "requests": {"r1": 0, "r2": 0}}
    n, state = policy(_ctx(idle, current=2, now=100.0))
    assert n == 2 and state["low_since"] == 100.0  # a lull: wait
    assert policy(_ctx(idle, current=2, state=state, now=105.0))[0] == 2
    assert policy(_ctx(idle, current=2, state=state, now=110.0))[0] == 1
    assert policy(_ctx(busy, current=2, state=state, now=106.0)) == (4, {})  # load came back: timer reset


def test_bad_policy_settings_are_refused():
    with pytest.raises(ModelConfigError, match="role"):
        RoleAutoscaler("router")
    with pytest.raises(ModelConfigError, match="positive"):
        RoleAutoscaler("decode", requests=0)


def _policy_options(deployment: str, policy_kwargs: dict) -> dict:
    return {
        deployment: {
            "autoscaling_config": {
                "min_replicas": 1,
                "max_replicas": 2,
                "metrics_interval_s": 0.5,
                "look_back_period_s": 1,
                "upscale_delay_s": 0,
                "downscale_delay_s": 0,
                "policy": {
                    "policy_function": "overfill_serve.serve.autoscaling:RoleAutoscaler",
                    "policy_kwargs": {**policy_kwargs, "downscale_delay_s": 2},
                },
            }
        }
    }


def _burst_scales_one_pool(
    pair, app: str, deployment: str, args: dict, options: dict, prompt, params, per_client: int
):
    """Run a burst (4 clients x `per_client` requests) against `app`; assert the deployment went 1 -> 2 -> 1, both of
    its replicas did some of the work, and every response equals the offline engine's."""
    from ray import serve
    from serve_harness import completion, load_app_config, replica_stats, run_app, start_ray
    from serve_harness import wait_until as wait

    from overfill_serve import LLM

    config, _ = load_app_config()
    start_ray({})
    try:
        run_app(args, app, config["grpc_options"]["grpc_servicer_functions"], options=options)

        def running_replicas() -> int:
            states = serve.status().applications[app].deployments[deployment].replica_states
            return sum(n for state, n in states.items() if str(state).endswith("RUNNING"))

        llm = LLM(pair.teacher, pair.student, num_kv_blocks=256, block_size=4)
        want = llm.generate(prompt, params)[0].text
        body = {
            "model": app,
            "prompt": prompt,
            "max_tokens": params.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        results: list[tuple[int, str]] = []  # checked here: an assert in a thread would not fail the test

        def client() -> None:
            for _ in range(per_client):
                results.append(completion(body))

        assert running_replicas() == 1
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        work = "prefilled" if deployment == "PrefillServer" else "finished"
        done_by: dict[str, int] = {}  # replica id -> requests it served, as last seen
        peak, start = 1, time.monotonic()
        while any(t.is_alive() for t in threads) and time.monotonic() - start < 180:
            peak = max(peak, running_replicas())
            done_by.update({s["replica_id"]: s[work] for s in replica_stats(app, deployment)})
            time.sleep(0.25)
        for t in threads:
            t.join(timeout=60)
        assert results == [(200, want)] * (4 * per_client)
        assert peak == 2
        # the router followed the pool: the replica that joined took part of the burst
        assert len([n for n in done_by.values() if n > 0]) == 2, done_by
        wait(lambda: running_replicas() == 1, timeout=60, what=f"the {deployment} pool back to one replica")
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()


def _args(pair, app: str, **overrides) -> dict:
    from serve_harness import pair_args

    return pair_args(pair, app, prefill_kv_blocks=256, decode_kv_blocks=1024, **overrides)


@pytest.mark.slow  # about a minute: a real burst on Ray Serve
def test_decode_pool_scales_with_a_burst(pairs):
    """Long generations: requests held over a target of 1 a replica."""
    pytest.importorskip("ray")
    from overfill_serve import SamplingParams

    pair = pairs["width"]
    _burst_scales_one_pool(
        pair,
        "burst",
        "DecodeServer",
        _args(pair, "burst"),
        _policy_options("DecodeServer", {"role": "decode", "requests": 1}),
        list(range(20, 60)),
        SamplingParams(max_tokens=600, temperature=0, ignore_eos=True),
        per_client=6,
    )


@pytest.mark.slow  # about a minute: a real burst on Ray Serve
def test_prefill_pool_scales_with_a_prompt_heavy_burst(pairs):
    """Long prompts, a few output tokens, prefill in 16-token chunks: queued prompt tokens over a target of
    64 a replica."""
    pytest.importorskip("ray")
    from overfill_serve import SamplingParams

    pair = pairs["width"]
    _burst_scales_one_pool(
        pair,
        "promptburst",
        "PrefillServer",
        # One prompt sent 120 times: with prefix caching every prefill after the first would be a few tokens.
        _args(pair, "promptburst", max_num_batched_tokens=16, enable_prefix_caching=False),
        _policy_options("PrefillServer", {"role": "prefill", "queued_prompt_tokens": 64}),
        [(7 * i) % 400 + 3 for i in range(700)],
        SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
        per_client=30,  # long enough for the metrics, the policy and a new replica's start-up
    )
