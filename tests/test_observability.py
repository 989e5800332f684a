"""What operators and their tools see (issue 12 items 5, 6, 9), on real Ray Serve with a tiny pair:

- start-up: a request for a pool with no running replica gets 503 `pool_starting` with Retry-After at once
  (gRPC UNAVAILABLE), while the other pool's mode serves; gRPC health says NOT_SERVING;
- `GET /metrics` on the HTTP port: Prometheus text with the request series and every model replica's KV,
  queue and transfer series;
- gRPC `grpc.health.v1.Health` (Check, Watch, List) and server reflection v1 and v1alpha on the gRPC port.

The app is deployed twice: first with a decode pool whose replicas cannot start (a bad `kept_layers`: its
constructor fails, so it has 0 of 1 replicas running while nothing is wrong with placement), then whole.
"""

from __future__ import annotations

import http.client
import json
import time

import pytest
from serve_harness import GRPC_PORT, HTTP_PORT, load_app_config, pair_args, run_app, start_ray, wait_until

pytest.importorskip("ray")
grpc = pytest.importorskip("grpc")

APP = "observe"
PROMPT = list(range(20, 36))


def _headers(response: http.client.HTTPResponse) -> dict[str, str]:
    return {name.lower(): value for name, value in response.getheaders()}


def _get(path: str, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=timeout)
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, _headers(response), response.read()


def _complete(model: str, timeout: float = 60) -> tuple[int, dict[str, str], dict, float]:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=timeout)
    body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = json.loads(response.read())
    return response.status, _headers(response), data, time.perf_counter() - start


def _health() -> dict:
    status, _, body = _get("/health")
    return {"code": status, **json.loads(body)} if body else {"code": status}


def _channel():
    return grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}")


def _health_check(service: str = "") -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status)


@pytest.fixture(scope="module")
def cluster():
    from ray import serve

    start_ray({})
    yield load_app_config()[0]["grpc_options"]["grpc_servicer_functions"]
    serve.shutdown()
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def decode_down(cluster, pairs):
    """The app with its decode pool unable to start a replica."""
    run_app(pair_args(pairs["width"], APP, kept_layers="no-such-strategy"), APP, cluster, wait_running=False)

    def prefill_up_decode_down() -> bool:
        pools = _health().get("pools", {})
        return pools.get("prefill", {}).get("running") == 1 and pools.get("decode", {}).get("running") == 0

    wait_until(prefill_up_decode_down, timeout=120, what="prefill replica up, decode pool at 0 of 1")


@pytest.fixture(scope="module")
def served(decode_down, cluster, pairs):
    """The whole app, redeployed over the broken one, with two ingress replicas (as the GPU configs have)."""
    run_app(pair_args(pairs["width"], APP), APP, cluster, options={"Ingress": {"num_replicas": 2}})
    wait_until(lambda: _health()["code"] == 200, timeout=60, what="/health 200 (both pools up)")


# -- start-up: no replica in a pool ---------------------------------------------------------------------------
@pytest.mark.parametrize("model", [APP, f"{APP}:pruned"])
def test_a_pool_without_replicas_answers_503_retry_after_at_once(decode_down, model):
    status, headers, body, seconds = _complete(model)
    assert status == 503 and body["error"]["code"] == "pool_starting", body
    assert headers["retry-after"] == "1" and "decode pool" in body["error"]["message"]
    assert seconds < 3.0  # answered, not queued in Serve's router until a timeout
    assert _health()["code"] == 503


def test_the_other_pools_mode_serves_meanwhile(decode_down):
    status, _, body, _ = _complete(f"{APP}:full")
    assert status == 200 and body["usage"]["completion_tokens"] == 6, body


def test_grpc_unavailable_and_not_serving_while_a_pool_has_no_replica(decode_down):
    from overfill_serve._proto.overfill.v1 import generate_pb2 as pb
    from overfill_serve._proto.overfill.v1 import generate_pb2_grpc

    with _channel() as channel:
        stub = generate_pb2_grpc.GenerateStub(channel)
        start = time.perf_counter()
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(pb.GenerateRequest(model=APP, text="Hello"), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "retry in 1 s" in e.value.details()
        assert time.perf_counter() - start < 3.0
    assert _health_check("") == _health_check("overfill.v1.Generate") == 2  # NOT_SERVING


# -- the whole app: metrics, health, reflection ---------------------------------------------------------------
def _families() -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    status, headers, body = _get("/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def _samples(family, suffix: str = "") -> list:
    return [s for s in family.samples if s.name == family.name + suffix]


def test_metrics_has_request_and_every_replicas_series(served):
    for model in (APP, f"{APP}:full", APP):
        assert _complete(model)[0] == 200
    families = _families()
    done = {
        (s.labels["mode"], s.labels["finish_reason"]): s.value
        for s in _samples(families["overfill_requests"], "_total")
    }
    assert done[("overfill", "length")] >= 2 and done[("full", "length")] >= 1
    assert all(s.labels["pair"] == APP for s in _samples(families["overfill_requests"], "_total"))
    ttft = {s.labels["mode"]: s.value for s in _samples(families["overfill_ttft_seconds"], "_count")}
    assert ttft["overfill"] >= 2
    generated = {
        s.labels["mode"]: s.value for s in _samples(families["overfill_generation_tokens"], "_total")
    }
    assert generated["overfill"] >= 12
    usage = _samples(families["overfill_kv_usage_ratio"])
    assert sorted(s.labels["role"] for s in usage) == ["decode", "prefill"]
    assert all(0.0 <= s.value <= 1.0 and s.labels["replica"] for s in usage)
    assert {s.labels["role"] for s in _samples(families["overfill_queue_depth"])} == {"prefill", "decode"}
    moved = _samples(families["overfill_kv_transfer_bytes"], "_total")
    assert [s.labels["role"] for s in moved] == ["decode"] and moved[0].value > 0
    assert _samples(families["overfill_kv_transfer_seconds"], "_count")[0].value >= 2


def test_every_ingress_replica_answers_for_all_of_them(served):
    """A scrape reaches one of the two ingress replicas: each sums both replicas' request series."""
    for _ in range(4):
        assert _complete(APP)[0] == 200
    counts = set()
    for _ in range(8):
        requests = _samples(_families()["overfill_requests"], "_total")
        counts.add(sum(s.value for s in requests if s.labels["mode"] == "overfill"))
        ttft = _samples(_families()["overfill_ttft_seconds"], "_count")
        counts.add(sum(s.value for s in ttft if s.labels["mode"] == "overfill"))
    assert len(counts) == 1 and counts.pop() >= 4


def test_grpc_health_check_watch_and_list(served):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    assert _health_check("") == _health_check("overfill.v1.Generate") == 1  # SERVING
    with _channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        listed = stub.List(health_pb2.HealthListRequest(), timeout=10).statuses
        assert {name: s.status for name, s in listed.items()} == {"": 1, "overfill.v1.Generate": 1}


def _reflect(version: str, *asks) -> list:
    from grpc_reflection.v1alpha import reflection_pb2 as alpha

    with _channel() as channel:
        call = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=alpha.ServerReflectionRequest.SerializeToString,
            response_deserializer=alpha.ServerReflectionResponse.FromString,
        )
        return list(call(iter(asks), timeout=30))


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_and_describes_the_services(served, version):
    """What `grpcurl -plaintext host:port list` and `describe` do, over both reflection versions."""
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2 as alpha

    listed, generate, health = _reflect(
        version,
        alpha.ServerReflectionRequest(list_services=""),
        alpha.ServerReflectionRequest(file_containing_symbol="overfill.v1.Generate"),
        alpha.ServerReflectionRequest(file_containing_symbol="grpc.health.v1.Health"),
    )
    names = {s.name for s in listed.list_services_response.service}
    assert names == {
        "overfill.v1.Generate", "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection",
    }  # fmt: skip
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw) for raw in
             generate.file_descriptor_response.file_descriptor_proto]  # fmt: skip
    [service] = [s for f in files if f.package == "overfill.v1" for s in f.service]
    assert {m.name for m in service.method} == {"Generate", "GenerateStream", "ListModels"}
    [health_file] = health.file_descriptor_response.file_descriptor_proto
    assert descriptor_pb2.FileDescriptorProto.FromString(health_file).package == "grpc.health.v1"
