"""The vLLM-compatible extras people script against (issue 12 item 4), end to end through the Serve app on a
tiny width-pruned pair, with the `openai` client, raw HTTP and gRPC: a batch of prompts in one completions
request, min_tokens, logit_bias, stop options, /tokenize, /detokenize, /version, /v1/models/{id}, cached-token
usage, continuous usage stats, and a 400 for what is not implemented. Outputs are compared with the offline
LLM on the same pair (itself checked against transformers in tests/test_sampling_extras.py)."""

from __future__ import annotations

import http.client
import json

import pytest
from serve_harness import (
    GRPC_PORT,
    HTTP_PORT,
    offline_llm,
    openai_client,
    pools_full,
    serve_pair,
    wait_until,
)

pytest.importorskip("ray")
openai = pytest.importorskip("openai")

APP = "extras"
PROMPTS = [list(range(20, 40)), [5, 17, 33, 101, 7, 9, 200], list(range(60, 70))]
GREEDY = {"temperature": 0, "max_tokens": 6}


@pytest.fixture(scope="module")
def served(pairs):
    yield from serve_pair(pairs["width"], APP, max_model_len=256)


@pytest.fixture(scope="module")
def offline(served):
    return offline_llm(served, max_model_len=256)


@pytest.fixture(scope="module")
def client(served):
    return openai_client()


def _request(method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=120)
    conn.request(
        method, path, None if body is None else json.dumps(body), {"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    data = response.read()
    return response.status, json.loads(data) if data else {}


def _offline(offline, prompt: list[int], **params):
    from overfill_serve import SamplingParams

    return offline.generate(prompt, SamplingParams(**params))[0]


def test_a_batch_of_prompts_answers_each_prompt_with_its_n_choices(client, offline):
    out = client.completions.create(model=APP, prompt=PROMPTS, n=2, extra_body={"ignore_eos": True}, **GREEDY)
    assert [c.index for c in sorted(out.choices, key=lambda c: c.index)] == list(range(6))
    texts = {c.index: c.text for c in out.choices}
    for i, prompt in enumerate(PROMPTS):
        expected = _offline(offline, prompt, ignore_eos=True, **GREEDY).text
        assert texts[2 * i] == texts[2 * i + 1] == expected
    assert out.usage is not None and out.usage.prompt_tokens == sum(map(len, PROMPTS))
    assert out.usage.completion_tokens == 6 * 6
    # A prompt's second choice may find the blocks its first computed (prefix caching), never more than
    # every block before the last token's.
    assert out.usage.prompt_tokens_details is not None
    assert 0 <= out.usage.prompt_tokens_details.cached_tokens <= sum((len(p) - 1) // 4 * 4 for p in PROMPTS)
    strings = client.completions.create(model=f"{APP}:full", prompt=["a b", "c"], max_tokens=2, temperature=0)
    assert len(strings.choices) == 2
    wait_until(lambda: pools_full(APP), timeout=30, what="KV pools full")


@pytest.mark.parametrize("model", [APP, f"{APP}:full"])
def test_min_tokens_holds_back_eos_and_stop_token_ids(client, offline, model):
    prompt = PROMPTS[0]
    first = _offline(offline, prompt, **GREEDY).token_ids
    # The first token is a stop token: without min_tokens the request ends on it (on the prefill replica).
    stop = {"stop_token_ids": [first[0]]}
    short = client.completions.create(model=model, prompt=prompt, extra_body=stop, **GREEDY)
    assert short.usage is not None and short.usage.completion_tokens == 1
    body = {**stop, "min_tokens": 4}
    out = client.completions.create(model=model, prompt=prompt, extra_body=body, **GREEDY)
    mode = model.partition(":")[2] or "overfill"
    from overfill_serve import SamplingParams

    params = SamplingParams(stop_token_ids=(first[0],), min_tokens=4, **GREEDY)
    expected = offline.generate(prompt, params, mode=mode)[0]
    assert out.choices[0].text == expected.text and out.usage is not None
    assert out.usage.completion_tokens == len(expected.token_ids) >= 4
    assert expected.token_ids[0] != first[0]  # masked, not merely not stopping


def test_logit_bias_over_http_and_grpc_equals_the_offline_engine(client, offline):
    from overfill_serve import SamplingParams
    from overfill_serve.tools.client import GRPCClient

    prompt = PROMPTS[1]
    plain = _offline(offline, prompt, ignore_eos=True, **GREEDY).token_ids
    bias = {plain[0]: -100.0, plain[2]: -100.0, 77: 3.0}
    expected = offline.generate(prompt, SamplingParams(ignore_eos=True, logit_bias=bias, **GREEDY))[0]
    assert expected.token_ids != plain
    body = {"ignore_eos": True}
    out = client.completions.create(
        model=APP, prompt=prompt, logit_bias={str(k): v for k, v in bias.items()}, extra_body=body, **GREEDY
    )
    assert out.choices[0].text == expected.text
    with GRPCClient(f"127.0.0.1:{GRPC_PORT}", application=APP) as grpc_client:
        reply = grpc_client.generate(
            prompt, model=APP, ignore_eos=True, logit_bias=bias, min_tokens=2, **GREEDY
        )
    assert list(reply.token_ids) == expected.token_ids
    status, error = _request(
        "POST", "/v1/completions", {"model": APP, "prompt": prompt, "logit_bias": {"99999": 1}}
    )
    assert status == 400 and error["error"]["param"] == "logit_bias"


def test_stop_string_options_pass_through(client, offline):
    prompt = PROMPTS[2]
    text = _offline(offline, prompt, ignore_eos=True, skip_special_tokens=False, **GREEDY).text
    stop = text[3:5] if len(text.strip()) >= 5 else text[-1]
    for include in (False, True):
        extra = {"ignore_eos": True, "include_stop_str_in_output": include, "skip_special_tokens": False}
        out = client.completions.create(model=APP, prompt=prompt, stop=[stop], extra_body=extra, **GREEDY)
        expected = _offline(
            offline,
            prompt,
            stop=(stop,),
            ignore_eos=True,
            include_stop_str_in_output=include,
            skip_special_tokens=False,
            **GREEDY,
        )
        assert out.choices[0].text == expected.text
        assert out.choices[0].text.endswith(stop) == include


def test_continuous_usage_stats_on_every_streamed_chunk(client):
    stream = client.chat.completions.create(
        model=APP,
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
        extra_body={"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
        **GREEDY,
    )
    chunks = list(stream)
    assert chunks and all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks if c.usage is not None]
    assert counts == sorted(counts) and counts[-1] > 0


def test_tokenize_detokenize_version_and_one_model(served, offline):
    status, tokens = _request("POST", "/tokenize", {"model": APP, "prompt": "Hello world"})
    assert status == 200 and tokens["count"] == len(tokens["tokens"]) and 0 < tokens["max_model_len"] <= 256
    status, text = _request("POST", "/detokenize", {"model": APP, "tokens": tokens["tokens"]})
    assert status == 200 and text == {"prompt": "Hello world"}
    messages = [{"role": "user", "content": "Hi"}]
    status, chat = _request("POST", "/tokenize", {"model": APP, "messages": messages})
    assert status == 200 and chat["tokens"] == offline.prompts.chat(messages)
    status, version = _request("GET", "/version")
    from overfill_serve import __version__

    assert status == 200 and version == {"version": __version__}
    status, model = _request("GET", f"/v1/models/{APP}:pruned")
    assert status == 200 and model["id"] == f"{APP}:pruned" and model["overfill"]["mode"] == "pruned"
    status, missing = _request("GET", "/v1/models/gpt-4")
    assert status == 404 and missing["error"]["code"] == "model_not_found"
    status, bad = _request("POST", "/tokenize", {"model": "gpt-4", "prompt": "x"})
    assert status == 404


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"guided_json": {"type": "object"}}, "guided_json"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ],
)
def test_what_is_not_implemented_is_a_400_naming_it(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=APP, prompt="x", max_tokens=1, extra_body=extra)
    assert e.value.param == param


def test_a_repeated_prompt_reports_its_cached_tokens(client):
    """Prefix caching through the app: a prompt sent again finds every block its prefill model computed
    before but the last token's (HTTP usage, gRPC usage; in OverFill mode the count crosses the KV channel
    from the prefill replica); /metrics counts the lookups and hits per role."""
    from overfill_serve.tools.client import GRPCClient

    prompt = list(range(200, 237))  # 37 tokens: nine blocks of 4 before the last token's
    texts, cached = [], []
    for model in (APP, f"{APP}:full", f"{APP}:pruned"):
        for _ in range(2):
            out = client.completions.create(
                model=model, prompt=prompt, extra_body={"ignore_eos": True}, **GREEDY
            )
            texts.append(out.choices[0].text)
            cached.append(out.usage.prompt_tokens_details.cached_tokens)
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[4] == texts[5]
    # The teacher's blocks from OverFill serve :full too; the student's own prefill starts with none.
    assert cached == [0, 36, 36, 36, 0, 36]
    with GRPCClient(f"127.0.0.1:{GRPC_PORT}", application=APP) as grpc_client:
        assert grpc_client.generate(prompt, model=APP, max_tokens=2).usage.cached_tokens == 36
    conn = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    hits = [line for line in text.splitlines() if line.startswith("overfill_prefix_cache_hits_total{")]
    # at least this test's four prefill-side hits of 36 tokens (earlier tests may have repeated prompts too)
    assert any('role="prefill"' in h and float(h.split()[-1]) >= 4 * 36 for h in hits), hits
    wait_until(lambda: pools_full(APP), timeout=30, what="KV pools full")
