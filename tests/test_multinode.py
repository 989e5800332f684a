"""A multi-node Ray cluster on one machine (`ray.cluster_utils.Cluster`): a head node, a node labelled as the
prefill pool and an "L4" node labelled as the decode pool. Prefill replicas are pinned by label selector,
decode replicas by accelerator type; they land on their nodes, the KV crosses from one node to the other and
outputs equal the offline engine. A pool asking for hardware no node has is reported by name, and the modes
the other pool serves keep working."""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
import grpc
from serve_harness import (
    GRPC_PORT,
    HTTP_PORT,
    load_app_config,
    pair_args,
    post_json,
    quiet_ray_env,
    replica_stats,
    run_app,
    wait_until,
)

from overfill_serve import LLM, SamplingParams
from overfill_serve.tools.client import GRPCClient, GRPCError

pytestmark = pytest.mark.slow  # a three-node Ray cluster: about 30 s
POOL = "overfill.io/pool"
PROMPTS = [list(range(10, 40)), list(range(50, 61)), list(range(3, 80))]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    quiet_ray_env()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    prefill_node = c.add_node(num_cpus=2, labels={POOL: "prefill"})
    decode_node = c.add_node(num_cpus=2, labels={POOL: "decode"}, resources={"accelerator_type:L4": 1})
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c, prefill_node.node_id, decode_node.node_id
    finally:
        serve.shutdown()
        ray.shutdown()
        c.shutdown()


def _args(pair, name: str) -> dict:
    return pair_args(pair, name, prefill_kv_blocks=128, decode_kv_blocks=128, pool_check_period_s=0.5)


def _pools(decode_actor_options: dict) -> dict:
    return {
        "PrefillServer": {"ray_actor_options": {"num_cpus": 0.5, "label_selector": {POOL: "prefill"}}},
        # a replica that never starts is stopped only after this timeout: keep the test's teardown short
        "DecodeServer": {
            "ray_actor_options": {"num_cpus": 0.5, **decode_actor_options},
            "graceful_shutdown_timeout_s": 2,
        },
    }


def _get(path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=30)
    conn.request("GET", path)
    return json.loads(conn.getresponse().read())


def _complete(model: str, prompt: list[int]) -> tuple[int, dict]:
    return post_json(
        "/v1/completions",
        {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True},
    )


def _offline(pair, mode: str) -> list[str]:
    llm = LLM(pair.teacher, pair.student, num_kv_blocks=128, block_size=4)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return [llm.generate(p, params, mode=mode)[0].text for p in PROMPTS]


def test_pools_land_on_their_nodes_and_kv_crosses_nodes(cluster, pairs):
    from ray import serve

    _, prefill_node, decode_node = cluster
    pair = pairs["depth"]
    servicers = load_app_config()[0]["grpc_options"]["grpc_servicer_functions"]
    run_app(_args(pair, "pools"), "pools", servicers, options=_pools({"accelerator_type": "L4"}))
    try:
        [prefill] = replica_stats("pools", "PrefillServer")
        [decode] = replica_stats("pools", "DecodeServer")
        assert prefill["node_id"] == prefill_node and decode["node_id"] == decode_node
        got = []
        for prompt in PROMPTS:
            status, body = _complete("pools", prompt)
            assert status == 200, body
            got.append(body["choices"][0]["text"])
        assert got == _offline(pair, "overfill")
        # every prompt's KV was prefilled on the prefill node and decoded on the decode node
        [prefill] = replica_stats("pools", "PrefillServer")
        [decode] = replica_stats("pools", "DecodeServer")
        assert prefill["prefilled"] == len(PROMPTS) and decode["finished"] == len(PROMPTS)
        assert (
            prefill["free_blocks"] == prefill["total_blocks"]
            and decode["free_blocks"] == decode["total_blocks"]
        )
        # the router's view converges on both pools running (it re-reads them every pool_check_period_s)
        wait_until(lambda: _get("/health")["status"] == "ok", timeout=15, what="/health ok")
    finally:
        serve.delete("pools")


def test_unsatisfiable_pool_is_reported_and_the_rest_serves(cluster, pairs):
    from ray import serve

    c, prefill_node, _ = cluster
    pair = pairs["depth"]
    servicers = load_app_config()[0]["grpc_options"]["grpc_servicer_functions"]
    run_app(
        _args(pair, "nob200"),
        "nob200",
        servicers,
        options=_pools({"accelerator_type": "B200"}),
        wait_running=False,
    )
    try:

        def pools() -> dict:
            return _get("/health").get("pools", {})

        wait_until(
            lambda: pools().get("prefill", {}).get("running") == 1 and pools()["decode"]["problem"],
            timeout=60,
            what="a running prefill pool and the decode pool's placement problem in /health",
        )
        health = _get("/health")
        assert health["status"] == "degraded" and health["pools"]["decode"]["running"] == 0
        assert "no alive node has accelerator_type:B200 >= 0.001" in health["pools"]["decode"]["problem"]
        assert health["pools"]["prefill"]["problem"] is None

        # the prefill pool serves the full model; the overfill and pruned modes fail at once, saying why
        status, body = _complete("nob200:full", PROMPTS[0])
        assert status == 200 and body["choices"][0]["text"] == _offline(pair, "full")[0]
        for model in ("nob200", "nob200:pruned"):
            start = time.monotonic()
            status, body = _complete(model, PROMPTS[0])
            assert status == 503 and time.monotonic() - start < 5
            assert body["error"]["code"] == "pool_unavailable"
            assert (
                "decode pool" in body["error"]["message"]
                and "accelerator_type:B200" in body["error"]["message"]
            )
        with GRPCClient(f"127.0.0.1:{GRPC_PORT}", application="nob200", timeout=30) as client:
            with pytest.raises(GRPCError) as e:
                client.generate(PROMPTS[0], model="nob200", max_tokens=4)
            assert e.value.code == grpc.StatusCode.UNAVAILABLE and "accelerator_type:B200" in e.value.details
        [prefill] = replica_stats("nob200", "PrefillServer")
        assert prefill["node_id"] == prefill_node and prefill["free_blocks"] == prefill["total_blocks"]

        # and the operator finds the reason in the router's output (what `serve run` prints, the worker's
        # stderr in the node's logs), not a replica silently STARTING
        logs = {Path(node.get_logs_dir_path()) for node in c.list_all_nodes()}  # wherever the router runs
        lines = [
            line
            for d in logs
            for f in d.rglob("*")
            if f.is_file() and f.suffix in (".log", ".err")
            for line in f.read_text(errors="replace").splitlines()
            if "cannot be placed" in line
        ]
        assert any(
            "decode pool (DecodeServer): 0 of 1 replicas running" in line and "B200" in line for line in lines
        )
    finally:
        serve.delete("nob200")
