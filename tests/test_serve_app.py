"""The Ray Serve application started from cluster/config.yaml's own settings, on the embedded model: the OpenAI
client, raw SSE and gRPC all return the offline engine's greedy output; concurrency, disconnects and bad input
behave; the KV pools are full again afterwards."""

from __future__ import annotations

import http.client
import json
import threading

import pytest
from serve_harness import (
    GRPC_PORT,
    HTTP_PORT,
    load_app_config,
    openai_client,
    pools_full,
    run_app,
    start_ray,
    wait_until,
)

pytest.importorskip("ray")
openai = pytest.importorskip("openai")

APP = "overfill"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "The three primary colors are",
]


@pytest.fixture(scope="module")
def served():
    from ray import serve

    from overfill_serve.tools.default_model import default_model_dir

    model_dir = default_model_dir()  # convert once here, not in three replicas at a time
    config, app = load_app_config()
    start_ray({"OVERFILL_CACHE_DIR": str(model_dir.parent)})
    run_app(app["args"], APP, config["grpc_options"]["grpc_servicer_functions"])
    yield app["args"], model_dir
    serve.shutdown()
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def offline(served):
    from overfill_serve import LLM

    args, model_dir = served
    return LLM(model_dir, model_dir, max_model_len=2048)


@pytest.fixture(scope="module")
def client(served):
    return openai_client()


def _greedy(max_tokens=24):
    from overfill_serve import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0)


def test_config_names_the_app_deployments(served):
    _, app = load_app_config()
    assert {d["name"] for d in app["deployments"]} == {"PrefillServer", "DecodeServer", "Ingress"}


def test_openai_chat_and_completion_match_offline(client, offline):
    want_chat = offline.chat(QUESTION, _greedy())[0]
    chat = client.chat.completions.create(
        model="smollm2-135m", messages=QUESTION, max_tokens=24, temperature=0
    )
    assert chat.choices[0].message.content == want_chat.text
    assert "Paris" in chat.choices[0].message.content
    assert chat.usage.completion_tokens == len(want_chat.token_ids)
    assert chat.model_extra["overfill"]["mode"] == "overfill"

    streamed = client.chat.completions.create(
        model="smollm2-135m",
        messages=QUESTION,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_chat.text
    assert chunks[-1].usage.completion_tokens == len(want_chat.token_ids)

    for prompt in PROMPTS[:2]:
        want = offline.generate(prompt, _greedy(16))[0]
        got = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=16, temperature=0)
        assert got.choices[0].text == want.text
        text = "".join(
            c.choices[0].text
            for c in client.completions.create(
                model="smollm2-135m", prompt=prompt, max_tokens=16, temperature=0, stream=True
            )
            if c.choices
        )
        assert text == want.text


@pytest.mark.parametrize("mode", ["full", "pruned"])
def test_modes_by_model_name(client, offline, mode):
    want = offline.generate(PROMPTS[0], _greedy(12), mode=mode)[0]
    got = client.completions.create(
        model=f"smollm2-135m:{mode}", prompt=PROMPTS[0], max_tokens=12, temperature=0
    )
    assert got.choices[0].text == want.text
    assert got.model_extra["overfill"]["mode"] == mode


def test_raw_sse_stream(served, offline):
    body = json.dumps(
        {
            "model": "smollm2-135m",
            "prompt": PROMPTS[1],
            "max_tokens": 10,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    conn = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=120)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    events = [line[len(b"data: ") :] for line in response.read().split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == offline.generate(PROMPTS[1], _greedy(10))[0].text


def test_grpc_stream_and_unary(served, offline):
    from overfill_serve.tools.client import GRPCClient

    want = offline.generate(PROMPTS[2], _greedy(12))[0]
    with GRPCClient(f"127.0.0.1:{GRPC_PORT}", application=APP) as grpc_client:
        chunks = list(
            grpc_client.generate_stream(PROMPTS[2], model="smollm2-135m", max_tokens=12, temperature=0)
        )
        assert "".join(c.text for c in chunks) == want.text
        assert [t for c in chunks for t in c.token_ids] == want.token_ids
        assert chunks[-1].usage.completion_tokens == 12
        unary = grpc_client.generate(PROMPTS[2], model="smollm2-135m:full", max_tokens=12, temperature=0)
        assert unary.text == offline.generate(PROMPTS[2], _greedy(12), mode="full")[0].text
        assert {m.id for m in grpc_client.list_models()} >= {"smollm2-135m", "smollm2-135m:full"}


def test_sixteen_concurrent_streams(client, offline):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    want = {p: offline.generate(p, _greedy(20))[0].text for p in set(prompts)}
    results: dict[int, str] = {}

    def run(i: int) -> None:
        stream = client.completions.create(
            model="smollm2-135m", prompt=prompts[i], max_tokens=20, temperature=0, stream=True
        )
        results[i] = "".join(c.choices[0].text for c in stream if c.choices)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert {i: results.get(i) for i in range(16)} == {i: want[p] for i, p in enumerate(prompts)}
    wait_until(lambda: pools_full(APP), what="both KV pools full")


def test_disconnect_mid_stream_frees_kv_on_both_sides(served):
    body = json.dumps(
        {
            "model": "smollm2-135m",
            "prompt": PROMPTS[3],
            "max_tokens": 1000,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
    )
    conn = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=60)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    response.read1(200)  # a few chunks: the request is decoding now
    wait_until(lambda: not pools_full(APP), timeout=30, what="the request holding KV")
    conn.close()
    wait_until(lambda: pools_full(APP), timeout=5, what="KV freed after the disconnect")


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model"),
        ("/v1/completions", {"model": "smollm2-135m", "prompt": "hi", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"model": "smollm2-135m", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"model": "smollm2-135m", "prompt": "word " * 9000}, 400, "prompt"),
        ("/v1/chat/completions", {"model": "smollm2-135m", "messages": []}, 400, "messages"),
    ],
)
def test_bad_http_input(served, path, body, status, param):
    conn = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=60)
    conn.request(
        "POST",
        path,
        body if isinstance(body, bytes) else json.dumps(body),
        {"Content-Type": "application/json"},
    )
    response = conn.getresponse()
    error = json.loads(response.read())["error"]
    assert response.status == status and error["message"]
    if param is not None:
        assert error["param"] == param
    assert pools_full(APP)


def test_bad_grpc_input(served):
    import grpc

    from overfill_serve.tools.client import GRPCClient, GRPCError

    with GRPCClient(f"127.0.0.1:{GRPC_PORT}", application=APP) as grpc_client:
        with pytest.raises(GRPCError) as e:
            list(grpc_client.generate_stream("hi", model="smollm2-135m", temperature=-1.0))
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.field == "temperature"
        with pytest.raises(GRPCError) as e:
            grpc_client.generate("hi", model="unknown-model")
        assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_models_and_health(client, served):
    ids = {m.id for m in client.models.list()}
    assert ids == {"smollm2-135m", "smollm2-135m:overfill", "smollm2-135m:full", "smollm2-135m:pruned"}
    conn = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=30)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
