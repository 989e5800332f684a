"""The app's edges under client mistakes and awkward timings (issue 11, seen from outside): n choices in every
mode, bad numbers, oversized bodies, unknown paths, gRPC client mistakes, duplicate request ids, early
disconnects. Each answer is a typed 4xx / gRPC status naming what was wrong, nothing stalls the ingress, and
the KV pools are whole afterwards."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
from serve_harness import (
    GRPC_PORT,
    HTTP_PORT,
    pools_full,
    serve_pair,
    wait_until,
)

pytest.importorskip("ray")
grpc = pytest.importorskip("grpc")

APP = "edge"
PROMPT = list(range(20, 40))


@pytest.fixture(scope="module")
def served(pairs):
    yield from serve_pair(
        pairs["width"], APP, max_model_len=256, max_inflight_requests=8, max_request_bytes=4 << 20
    )


def _request(
    method: str, path: str, body: bytes | dict | None = None, timeout: float = 120
) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=timeout)
    raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, raw, {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    return response.status, json.loads(data) if data else {}


def _health_latency() -> float:
    start = time.perf_counter()
    status, _ = _request("GET", "/health", timeout=30)
    assert status == 200
    return time.perf_counter() - start


@pytest.mark.parametrize("model,n", [(APP, 7), (f"{APP}:full", 2), (f"{APP}:pruned", 2)])
def test_n_choices_complete_in_every_mode_and_block_no_one(served, model, n):
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "n": n}
    result: dict = {}

    def big() -> None:
        result["n"] = _request("POST", "/v1/completions", body, timeout=60)

    thread = threading.Thread(target=big)
    thread.start()
    start = time.perf_counter()
    status, single = _request("POST", "/v1/completions", {**body, "n": 1}, timeout=60)
    single_s = time.perf_counter() - start
    thread.join(timeout=90)
    status_n, payload = result["n"]
    assert status == 200 and status_n == 200, payload
    texts = [c["text"] for c in sorted(payload["choices"], key=lambda c: c["index"])]
    assert len(texts) == n and set(texts) == {single["choices"][0]["text"]}  # greedy: every choice alike
    assert payload["usage"]["completion_tokens"] == 4 * n
    assert single_s < 20, f"an n=1 request waited {single_s:.1f} s beside an n={n} one"
    wait_until(lambda: pools_full(APP), timeout=30, what="KV pools full")


@pytest.mark.parametrize("field", ["temperature", "repetition_penalty", "top_p"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_400_naming_the_field(served, field, literal):
    raw = f'{{"model": "{APP}", "prompt": "hi", "max_tokens": 2, "{field}": {literal}}}'.encode()
    status, payload = _request("POST", "/v1/completions", raw)
    assert status == 400 and payload["error"]["param"] == field, payload


def test_oversized_body_is_413_at_once_and_the_ingress_stays_responsive(served):
    messages = [{"role": "user", "content": "word " * ((8 << 20) // 5)}]
    raw = json.dumps({"model": APP, "messages": messages}).encode()
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(r=_request("POST", "/v1/chat/completions", raw)))
    thread.start()
    time.sleep(0.2)
    assert _health_latency() < 2.0
    thread.join(timeout=60)
    status, payload = result["r"]
    assert status == 413 and payload["error"]["type"] == "invalid_request_error", payload


def test_a_large_valid_body_does_not_stall_health(served):
    """Under the size limit (4 MiB) but long to tokenize (and over the context): 400, /health unaffected."""
    raw = json.dumps({"model": APP, "prompt": "a b c d " * 450_000, "max_tokens": 1}).encode()
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(r=_request("POST", "/v1/completions", raw)))
    thread.start()
    latencies = [_health_latency() for _ in range(5)]
    thread.join(timeout=60)
    assert result["r"][0] == 400 and result["r"][1]["error"]["param"] == "prompt"
    assert max(latencies) < 2.0, latencies


@pytest.mark.parametrize(
    "method,path,status",
    [("GET", "/nope", 404), ("POST", "/v1/nothing", 404), ("GET", "/v1/completions", 405)],
)
def test_unknown_paths_and_methods_answer_openai_errors(served, method, path, status):
    got, payload = _request(method, path)
    assert got == status and payload["error"]["message"] and "detail" not in payload, payload


def _stub():
    from overfill_serve._proto.overfill.v1 import generate_pb2_grpc

    channel = grpc.insecure_channel(
        f"127.0.0.1:{GRPC_PORT}", options=[("grpc.max_send_message_length", 64 << 20)]
    )
    return channel, generate_pb2_grpc.GenerateStub(channel)


def _grpc_code(request, application: str = APP) -> tuple[grpc.StatusCode, str]:
    channel, stub = _stub()
    try:
        list(stub.GenerateStream(request, metadata=[("application", application)], timeout=60))
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    finally:
        channel.close()


def _grpc_cases():
    from overfill_serve.tools.client import make_request

    return [
        ("ids past the vocab", make_request([5, 100_000], model=APP), grpc.StatusCode.INVALID_ARGUMENT),
        ("id 10**9", make_request([10**9], model=APP), grpc.StatusCode.INVALID_ARGUMENT),
        ("over the context", make_request([7] * 9000, model=APP), grpc.StatusCode.INVALID_ARGUMENT),
        ("text over 4 MB", make_request("x" * (5 << 20), model=APP), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (
            "role banana",
            make_request(messages=[{"role": "banana", "content": "hi"}], model=APP),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "NaN temperature",
            make_request(PROMPT, model=APP, temperature=float("nan")),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ]


def test_grpc_client_mistakes_are_typed(served):
    for what, request, code in _grpc_cases():
        got, details = _grpc_code(request)
        assert got == code, f"{what}: {got} {details}"
        assert "internal error" not in details
    wait_until(lambda: pools_full(APP), timeout=30, what="KV pools full")


def test_grpc_unknown_application_is_not_found(served):
    from overfill_serve.tools.client import make_request

    got, details = _grpc_code(make_request(PROMPT, model=APP, max_tokens=2), application="no-such-app")
    assert got == grpc.StatusCode.NOT_FOUND and "no-such-app" in details


def test_duplicate_grpc_request_ids_do_not_collide(served):
    from overfill_serve import LLM, SamplingParams
    from overfill_serve.tools.client import GRPCClient

    pair = served
    prompts = [list(range(20, 60)), list(range(100, 150))]
    want = LLM(pair.teacher, pair.student, block_size=4).generate(
        prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    )
    got: dict[int, list[int]] = {}

    def run(i: int) -> None:
        with GRPCClient(f"127.0.0.1:{GRPC_PORT}", application=APP) as client:
            chunks = list(
                client.generate_stream(
                    prompts[i], model=APP, request_id="same-id", max_tokens=40, temperature=0, ignore_eos=True
                )
            )
            assert all(c.request_id == "same-id" for c in chunks)  # the client's id stays its label
            got[i] = [t for c in chunks for t in c.token_ids]

    for _ in range(3):
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert got == {0: want[0].token_ids, 1: want[1].token_ids}
    wait_until(lambda: pools_full(APP), timeout=30, what="KV pools full")


def test_clients_that_leave_before_reading_leak_no_admission(served):
    """More early disconnects than max_inflight_requests (8): the ingress still admits afterwards."""
    body = json.dumps(
        {"model": APP, "prompt": PROMPT, "max_tokens": 50, "ignore_eos": True, "stream": True}
    ).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    for _ in range(12):
        with socket.create_connection(("127.0.0.1", HTTP_PORT), timeout=10) as s:
            s.sendall(head + body)
    wait_until(
        lambda: _request("GET", "/health")[1]["inflight"] == 0, timeout=60, what="no request in flight"
    )
    status, payload = _request("POST", "/v1/completions", {"model": APP, "prompt": PROMPT, "max_tokens": 2})
    assert status == 200, payload
    wait_until(lambda: pools_full(APP), timeout=30, what="KV pools full")
