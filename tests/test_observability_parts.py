"""The pure parts of `/metrics`, gRPC health and reflection v1 (issue 12 items 5 and 6), without Ray Serve:
the exposition text, the health states, and reflection v1 on a plain grpc.aio server."""

from __future__ import annotations

import asyncio
import socket

import pytest
from prometheus_client.parser import text_string_to_metric_families

from overfill_serve.errors import ServiceNotFoundError
from overfill_serve.serve import grpc_health
from overfill_serve.serve.app_metrics import exposition
from overfill_serve.serve.metrics import LATENCY_BOUNDS, SERIES, ReplicaMetrics, RequestMetrics
from overfill_serve.transfer.channel import TransferStats
from overfill_serve.worker.worker_stats import WorkerStats

STATS = WorkerStats(
    free_blocks=30, total_blocks=40, waiting=3, running=2, swapped=1, queued_prompt_tokens=7, finished=5,
    tpot_s=0.01,
)  # fmt: skip


def _transfer(seconds: float) -> TransferStats:
    return TransferStats("t", "grpc", nbytes=1000, seconds=seconds, queue_seconds=0.0, saved_bytes=500)


def _families(text: bytes) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def _value(family, sample_name: str, **labels: str) -> float:
    [value] = [
        s.value for s in family.samples if s.name == sample_name and labels.items() <= s.labels.items()
    ]
    return value


def test_exposition_has_every_series_with_request_and_replica_values():
    requests = RequestMetrics("pair")
    requests.observe("overfill", 10, 5, 0.2, 1.0, "stop")
    requests.observe("full", 4, 0, None, 0.05, "error")  # failed before its first token: still counted
    replica = ReplicaMetrics("decode", "pair")
    for seconds in (0.003, 0.2, 100.0):
        replica.observe_transfer(_transfer(seconds))
    report = {**STATS.__dict__, **replica.report(), "replica_id": "r1"}
    families = _families(exposition(requests, [("decode", report)]))
    assert {s.name for s in SERIES.values()} <= set(families)  # one definition, all exposed
    ttft = families["overfill_ttft_seconds"]
    assert ttft.type == "histogram" and _value(ttft, "overfill_ttft_seconds_count", mode="overfill") == 1
    tpot = families["overfill_tpot_seconds"]
    assert _value(tpot, "overfill_tpot_seconds_sum", pair="pair", mode="overfill") == pytest.approx(0.2)
    done = families["overfill_requests"]
    assert _value(done, "overfill_requests_total", mode="overfill", finish_reason="stop") == 1
    assert _value(done, "overfill_requests_total", mode="full", finish_reason="error") == 1
    tokens = families["overfill_generation_tokens"]
    assert _value(tokens, "overfill_generation_tokens_total", mode="full") == 0
    labels = {"pair": "pair", "role": "decode", "replica": "r1"}
    assert _value(families["overfill_kv_usage_ratio"], "overfill_kv_usage_ratio", **labels) == 0.25
    assert _value(families["overfill_kv_blocks_used"], "overfill_kv_blocks_used", **labels) == 10
    assert _value(families["overfill_queue_depth"], "overfill_queue_depth", **labels) == 3
    assert _value(families["overfill_swapped_requests"], "overfill_swapped_requests", **labels) == 1
    moved = families["overfill_kv_transfer_bytes"]
    assert _value(moved, "overfill_kv_transfer_bytes_total", backend="grpc", **labels) == 3000
    saved = families["overfill_kv_transfer_saved_bytes"]
    assert _value(saved, "overfill_kv_transfer_saved_bytes_total", backend="grpc", **labels) == 1500
    seconds = families["overfill_kv_transfer_seconds"]
    buckets = [s for s in seconds.samples if s.name.endswith("_bucket")]
    assert [s.labels["le"] for s in buckets] == [*(str(b) for b in LATENCY_BOUNDS), "+Inf"]
    le = {float(s.labels["le"]): s.value for s in buckets}
    assert (le[0.005], le[0.25], le[60.0], le[float("inf")]) == (1, 2, 2, 3)  # cumulative
    assert _value(seconds, "overfill_kv_transfer_seconds_sum", **labels) == pytest.approx(100.203)


def test_request_series_of_several_ingress_replicas_are_summed():
    one, two = RequestMetrics("pair"), RequestMetrics("pair")
    one.observe("overfill", 10, 5, 0.2, 1.0, "stop")
    two.observe("overfill", 4, 3, 0.02, 0.5, "stop")
    two.observe("full", 4, 3, 0.02, 0.5, "length")
    families = _families(exposition(one, [], [two.samples()]))
    done = families["overfill_requests"]
    assert _value(done, "overfill_requests_total", mode="overfill", finish_reason="stop") == 2
    assert _value(done, "overfill_requests_total", mode="full", finish_reason="length") == 1
    ttft = families["overfill_ttft_seconds"]
    assert _value(ttft, "overfill_ttft_seconds_count", mode="overfill") == 2
    assert _value(ttft, "overfill_ttft_seconds_sum", mode="overfill") == pytest.approx(0.22)
    assert _value(ttft, "overfill_ttft_seconds_bucket", mode="overfill", le="0.025") == 1
    assert _value(families["overfill_prompt_tokens"], "overfill_prompt_tokens_total", mode="overfill") == 14


def test_exposition_without_replicas_still_parses():
    families = _families(exposition(RequestMetrics("p"), []))
    assert "overfill_kv_usage_ratio" in families and not families["overfill_kv_usage_ratio"].samples


def test_health_states_follow_the_pools():
    from grpc_health.v1 import health_pb2

    request = health_pb2.HealthCheckRequest(service="overfill.v1.Generate").SerializeToString()
    assert grpc_health.check(request, "ok").status == health_pb2.HealthCheckResponse.SERVING
    for pools in ("starting", "degraded"):
        assert grpc_health.check(b"", pools).status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(ServiceNotFoundError):
        grpc_health.check(health_pb2.HealthCheckRequest(service="nope").SerializeToString(), "ok")
    listed = grpc_health.list_all("ok").statuses
    assert {name: s.status for name, s in listed.items()} == {"": 1, "overfill.v1.Generate": 1}
    assert grpc_health.serving_status("nope", "ok") == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


def test_watch_sends_the_status_then_each_change(monkeypatch):
    monkeypatch.setattr(grpc_health, "WATCH_PERIOD_S", 0.001)
    states = iter(["starting", "starting", "ok", "ok", "degraded"] + ["degraded"] * 100)

    async def first_three() -> list[int]:
        stream = grpc_health.watch("", lambda: next(states))
        return [(await anext(stream)).status for _ in range(3)]

    assert asyncio.run(first_three()) == [2, 1, 2]  # NOT_SERVING, SERVING, NOT_SERVING


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_reflection_v1_lists_and_describes_on_a_plain_server():
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2 as alpha

    from overfill_serve.serve.grpc_reflection import SERVICE_NAME, enable_reflection_v1

    async def run() -> tuple[list[str], str]:
        server = grpc.aio.server()
        port = server.add_insecure_port(f"127.0.0.1:{_free_port()}")
        enable_reflection_v1(server, ["overfill.v1.Generate", SERVICE_NAME])
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.stream_stream(
                    f"/{SERVICE_NAME}/ServerReflectionInfo",
                    request_serializer=alpha.ServerReflectionRequest.SerializeToString,
                    response_deserializer=alpha.ServerReflectionResponse.FromString,
                )
                asks = [
                    alpha.ServerReflectionRequest(list_services=""),
                    alpha.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
                ]
                answers = [a async for a in call(iter(asks))]
        finally:
            await server.stop(None)
        from google.protobuf import descriptor_pb2

        names = [s.name for s in answers[0].list_services_response.service]
        [raw] = answers[1].file_descriptor_response.file_descriptor_proto
        return names, descriptor_pb2.FileDescriptorProto.FromString(raw).package

    names, package = asyncio.run(run())
    assert names == [SERVICE_NAME, "overfill.v1.Generate"] and package == "grpc.reflection.v1"


def test_on_ray_serves_proxy_server_reflection_v1_and_v1alpha_list_the_same_services():
    """Ray Serve's gRPC proxy server class, as its proxy builds it: Ray's API, our servicer function, then
    Ray's v1alpha reflection. v1 answers on the proxy (a passthrough service) and lists what v1alpha does."""
    from unittest.mock import Mock

    import grpc
    from grpc_reflection.v1alpha import reflection_pb2 as alpha
    from ray.serve._private.grpc_util import enable_server_reflection, gRPCGenericServer
    from ray.serve.generated.serve_pb2_grpc import add_RayServeAPIServiceServicer_to_server

    from overfill_serve.serve.grpc_service import add_GenerateServicer_to_server

    def routed_to_replicas(service_method: str, streaming_type: object):
        async def handler(request: object, context: object) -> bytes:
            return b""

        return handler

    async def run() -> dict[str, list[str]]:
        server = gRPCGenericServer(routed_to_replicas)
        port = server.add_insecure_port("127.0.0.1:0")
        for add in (add_RayServeAPIServiceServicer_to_server, add_GenerateServicer_to_server):
            add(Mock(), server)
        enable_server_reflection(server)
        await server.start()
        listed = {}
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                for version in ("v1", "v1alpha"):
                    call = channel.stream_stream(
                        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                        request_serializer=alpha.ServerReflectionRequest.SerializeToString,
                        response_deserializer=alpha.ServerReflectionResponse.FromString,
                    )
                    [answer] = [
                        a async for a in call(iter([alpha.ServerReflectionRequest(list_services="")]))
                    ]
                    listed[version] = [s.name for s in answer.list_services_response.service]
        finally:
            await server.stop(None)
        return listed

    listed = asyncio.run(run())
    assert set(listed["v1"]) == set(listed["v1alpha"]) == {
        "overfill.v1.Generate", "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection",
    }  # fmt: skip
