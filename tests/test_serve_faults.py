"""Faults under Ray Serve, on a tiny pair: a decode replica killed mid-stream (the request migrates to the
other replica and ends with the offline output), and overload (503 / RESOURCE_EXHAUSTED with a retry hint,
nothing lost)."""

from __future__ import annotations

import http.client
import json
import threading

import pytest
from serve_harness import (
    GRPC_PORT,
    HTTP_PORT,
    load_app_config,
    pools_full,
    replica_stats,
    run_app,
    start_ray,
    wait_until,
)

pytest.importorskip("ray")

APP = "tiny"
API_KEY = "test-api-key"
METRICS_PORT = 18080
PROMPT = list(range(20, 60))


@pytest.fixture(scope="module")
def served(pairs):
    from ray import serve

    pair = pairs["width"]
    config, _ = load_app_config()
    args = {
        "pair_name": "tiny",
        "prefill_model": str(pair.teacher),
        "decode_model": str(pair.student),
        "block_size": 4,
        "prefill_kv_blocks": 256,
        "decode_kv_blocks": 256,
        "max_inflight_requests": 3,
        "api_key": API_KEY,
    }
    start_ray({}, metrics_port=METRICS_PORT)
    run_app(
        args,
        APP,
        config["grpc_options"]["grpc_servicer_functions"],
        options={"DecodeServer": {"num_replicas": 2}, "PrefillServer": {"num_replicas": 2}},
    )
    yield pair
    serve.shutdown()
    import ray

    ray.shutdown()


def _post(body: dict, key: str | None = API_KEY) -> http.client.HTTPResponse:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    conn = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps(body), headers)
    return conn.getresponse()


def _prefill_hits() -> int:
    return sum(s["prefix_hits"] for s in replica_stats(APP, "PrefillServer"))


def test_killed_decode_replica_migrates_the_stream(served):
    """With prefix caching on (the default) against an offline run with it off: the prompt is cached on both
    sides first, so the stream starts from cached KV, and its re-prefill after the kill finds it again."""
    import ray

    from overfill_serve import LLM, SamplingParams

    pair = served
    max_tokens = 300
    want = LLM(
        pair.teacher, pair.student, num_kv_blocks=256, block_size=4, enable_prefix_caching=False
    ).generate(PROMPT, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))[0]
    warm = _post({"model": "tiny", "prompt": PROMPT, "max_tokens": 2, "temperature": 0, "ignore_eos": True})
    assert warm.status == 200 and want.text.startswith(json.loads(warm.read())["choices"][0]["text"])
    hits = _prefill_hits()
    response = _post(
        {
            "model": "tiny",
            "prompt": PROMPT,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
    )
    assert response.status == 200
    first = response.readline() + response.readline()  # the first event is out: the request is decoding

    busy = []
    wait_until(
        lambda: bool(busy.extend(s for s in replica_stats(APP, "DecodeServer") if s["running"]) or busy),
        timeout=30,
        what="a decode replica running the request",
    )
    ray.kill(
        ray.get_actor(f"SERVE_REPLICA::{APP}#DecodeServer#{busy[0]['replica_id']}", namespace="serve"),
        no_restart=True,
    )

    events = [line[6:] for line in (first + response.read()).split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks), chunks[-1]
    assert "".join(c["choices"][0]["text"] for c in chunks if c.get("choices")) == want.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # Forty tokens: nine cached blocks before the last token's, found by the stream and by its re-prefill.
    assert _prefill_hits() - hits >= 2 * 36
    wait_until(lambda: pools_full(APP), timeout=30, what="KV pools full after the migration")


def test_killed_prefill_replica_requests_go_to_the_other(served):
    """With one of two prefill replicas gone, every request still completes (Serve and the dispatcher route
    around the dead replica), and nothing stays allocated."""
    import ray

    victim = replica_stats(APP, "PrefillServer")[0]["replica_id"]
    ray.kill(
        ray.get_actor(f"SERVE_REPLICA::{APP}#PrefillServer#{victim}", namespace="serve"), no_restart=True
    )
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    for _ in range(6):
        response = _post(body)
        assert response.status == 200, response.read()
        assert json.loads(response.read())["usage"]["completion_tokens"] == 8
    wait_until(lambda: pools_full(APP), timeout=30, what="KV pools full")


def test_overload_answers_503_with_retry_hint_and_loses_nothing(served):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    results: list[tuple[int, dict, str | None]] = []

    def run() -> None:
        response = _post(body)
        results.append((response.status, json.loads(response.read()), response.getheader("Retry-After")))

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    statuses = sorted(status for status, _, _ in results)
    assert len(results) == 8 and set(statuses) == {200, 503}
    for status, payload, retry_after in results:
        if status == 503:
            assert payload["error"]["code"] == "overloaded" and retry_after
        else:
            assert len(payload["choices"][0]["text"]) > 0 and payload["usage"]["completion_tokens"] == 200
    wait_until(lambda: pools_full(APP), timeout=30, what="KV pools full after the burst")


def test_overload_grpc_resource_exhausted(served):
    import grpc

    from overfill_serve.tools.client import GRPCClient, GRPCError

    errors: list[GRPCError] = []
    done: list[int] = []

    def run() -> None:
        with GRPCClient(f"127.0.0.1:{GRPC_PORT}", application=APP, api_key=API_KEY) as client:
            try:
                done.append(
                    len(
                        client.generate(
                            PROMPT, model="tiny", max_tokens=200, ignore_eos=True, temperature=0
                        ).token_ids
                    )
                )
            except GRPCError as e:
                errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors and done and len(errors) + len(done) == 8
    assert all(e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" in e.details for e in errors)
    assert all(n == 200 for n in done)


def test_api_key_required(served):
    import grpc

    from overfill_serve.tools.client import GRPCClient, GRPCError

    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4}
    for key in (None, "wrong-key"):
        response = _post(body, key)
        assert (
            response.status == 401 and json.loads(response.read())["error"]["type"] == "authentication_error"
        )
    assert _post(body).status == 200
    with GRPCClient(f"127.0.0.1:{GRPC_PORT}", application=APP) as client:
        with pytest.raises(GRPCError) as e:
            client.generate(PROMPT, model="tiny", max_tokens=4)
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_prometheus_metrics_exported(served):
    """Ray's metrics agent exports the deployments' metrics (prefixed `ray_`), tagged by mode and role."""
    import urllib.request

    assert _post({"model": "tiny", "prompt": PROMPT, "max_tokens": 4}).status == 200
    wanted = {
        "ray_overfill_ttft_seconds_bucket",
        "ray_overfill_e2e_seconds_bucket",
        "ray_overfill_generation_tokens_total",
        "ray_overfill_kv_blocks_free",
        "ray_overfill_swapped_requests",
        "ray_overfill_kv_transfer_bytes_total",
    }
    lines: list[str] = []

    def scraped() -> bool:
        text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).read().decode()
        lines[:] = [line for line in text.splitlines() if line.startswith("ray_overfill_")]
        return wanted <= {line.split("{")[0] for line in lines}

    wait_until(scraped, timeout=60, what="the overfill metrics")
    assert any(
        line.startswith("ray_overfill_ttft_seconds_bucket") and 'mode="overfill"' in line for line in lines
    )
    assert any(line.startswith("ray_overfill_kv_blocks_free") and 'role="decode"' in line for line in lines)
