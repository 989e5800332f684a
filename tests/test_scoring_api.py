"""Scoring through the Serve app (issue 12 item 1), on a tiny depth-pruned pair: /v1/completions with echo +
logprobs + max_tokens 0 (how lm-eval scores), vLLM's prompt_logprobs, the OverFill split
(`continuation_start`, one per prompt of a batch), streaming, and the gRPC API's equivalents. In OverFill mode
the split crosses the KV channel: the prefill replica's teacher scores up to it, the decode replica's student
the rest. The reference is the offline LLM on the same pair (checked against transformers in
tests/test_scoring.py)."""

from __future__ import annotations

import json

import pytest
from serve_harness import (
    GRPC_PORT,
    HTTP_PORT,
    offline_llm,
    openai_client,
    pools_full,
    post_json,
    serve_pair,
    wait_until,
)

pytest.importorskip("ray")
openai = pytest.importorskip("openai")

APP = "scoring"
PROMPTS = [list(range(20, 45)), [5, 17, 33, 101, 7, 9, 200, 3]]
SPLITS = [9, 5]
MODES = {APP: "overfill", f"{APP}:full": "full", f"{APP}:pruned": "pruned"}


@pytest.fixture(scope="module")
def served(pairs):
    yield from serve_pair(pairs["depth"], APP, max_model_len=256)


@pytest.fixture(scope="module")
def offline(served):
    return offline_llm(served, max_model_len=256)


@pytest.fixture(scope="module")
def client(served):
    return openai_client()


def _reference(offline, mode: str, splits, k: int = 1, max_tokens: int = 0, prompts=PROMPTS):
    from overfill_serve import SamplingParams

    params = [
        SamplingParams(
            max_tokens=max_tokens, temperature=0, prompt_logprobs=k, continuation_start=c, ignore_eos=True
        )
        for c in splits
    ]
    return offline.generate(prompts, params, mode=mode)


@pytest.mark.parametrize("model", MODES)
@pytest.mark.parametrize("split", [True, False], ids=["split", "no-split"])
def test_echo_logprobs_score_every_prompt_token(client, offline, model, split):
    """The response lm-eval reads: prompt tokens first (the first without a logprob), each with its top
    alternatives; equal to the engine's scores for the mode (and the split, when given)."""
    splits = SPLITS if split else [None, None]
    extra = {"continuation_start": SPLITS} if split else {}
    out = client.completions.create(
        model=model, prompt=PROMPTS, echo=True, logprobs=2, max_tokens=0, temperature=0, extra_body=extra
    )
    want = _reference(offline, MODES[model], splits, k=2)
    for choice, ref, prompt in zip(sorted(out.choices, key=lambda c: c.index), want, PROMPTS):
        lp = choice.logprobs
        assert choice.finish_reason == "length" and len(lp.tokens) == len(prompt)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx([s.logprob for s in ref.prompt_logprobs[1:]], abs=1e-5)
        assert all(len(top) >= 2 for top in lp.top_logprobs[1:])
        assert lp.text_offset == sorted(lp.text_offset)
    assert out.usage.completion_tokens == 0
    wait_until(lambda: pools_full(APP), timeout=30, what="KV pools full")


def test_split_changes_overfill_scores_only_after_the_split(client, offline):
    """In OverFill mode the split hands the prompt to the student: tokens up to it keep the teacher's scores,
    later ones differ (a depth-pruned student); :full scores are the same with or without it."""

    def scores(model, **extra):
        out = client.completions.create(
            model=model, prompt=PROMPTS[0], echo=True, logprobs=0, max_tokens=0, extra_body=extra
        )
        return out.choices[0].logprobs.token_logprobs[1:]

    teacher, split = scores(APP), scores(APP, continuation_start=SPLITS[0])
    k = SPLITS[0]
    # (A shorter prefill runs other matmul shapes: float32 rounding differs in the 6th digit.)
    assert split[:k] == pytest.approx(teacher[:k], abs=1e-5)  # tokens 1..k: the teacher's logits
    assert all(abs(a - b) > 1e-3 for a, b in zip(split[k:], teacher[k:]))
    assert scores(f"{APP}:full", continuation_start=k) == pytest.approx(teacher, abs=1e-5)


def test_prompt_logprobs_and_generation_after_the_split(client, offline):
    """vLLM's prompt_logprobs beside generated tokens: past the split the student generates."""
    out = client.completions.create(
        model=APP,
        prompt=PROMPTS[1],
        max_tokens=3,
        temperature=0,
        extra_body={"prompt_logprobs": 3, "continuation_start": SPLITS[1], "ignore_eos": True},
    )
    (ref,) = _reference(offline, "overfill", [SPLITS[1]], k=3, max_tokens=3, prompts=PROMPTS[1:])
    choice = out.choices[0].model_dump()
    assert choice["text"] == ref.text and choice["logprobs"] is None
    scored = choice["prompt_logprobs"]
    assert scored[0] is None and len(scored) == len(PROMPTS[1])
    for entry, lp in zip(scored[1:], ref.prompt_logprobs[1:]):
        assert len(entry) in (3, 4)  # the top 3 and the prompt token (when not among them)
        mine = entry[str(lp.token_id)]
        assert mine["rank"] == lp.rank and mine["logprob"] == pytest.approx(lp.logprob, abs=1e-5)
        assert [e["rank"] for t, e in entry.items() if t != str(lp.token_id)] == [1, 2, 3][: len(entry) - 1]


def test_streamed_echo_carries_the_prompt_scores_first(offline):
    """Streaming: the echo chunk (with the prompt's logprobs) comes first, then the generated tokens."""
    body = {
        "model": APP, "prompt": PROMPTS[0], "echo": True, "logprobs": 1, "max_tokens": 2, "temperature": 0,
        "stream": True, "continuation_start": SPLITS[0], "ignore_eos": True,
    }  # fmt: skip
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    events = [
        line[6:] for line in conn.getresponse().read().decode().splitlines() if line.startswith("data: ")
    ]
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert events[-1] == "[DONE]"
    (ref,) = _reference(offline, "overfill", [SPLITS[0]], max_tokens=2, prompts=PROMPTS[:1])
    echo = chunks[0]
    assert echo["finish_reason"] is None and len(echo["logprobs"]["tokens"]) == len(PROMPTS[0])
    assert echo["logprobs"]["token_logprobs"][1:] == pytest.approx(
        [s.logprob for s in ref.prompt_logprobs[1:]], abs=1e-5
    )
    generated = [t for c in chunks[1:] for t in c["logprobs"]["tokens"]]
    assert len(generated) == 2 and "".join(c["text"] for c in chunks[1:]) == ref.text


def test_bad_scoring_requests_are_400s(served):
    for body, field in (
        (
            {"prompt": PROMPTS[1], "continuation_start": 9, "echo": True, "logprobs": 0, "max_tokens": 0},
            "continuation_start",
        ),
        ({"prompt": PROMPTS, "continuation_start": [3], "echo": True, "logprobs": 0}, "continuation_start"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "prompt_logprobs": 50}, "prompt_logprobs"),
    ):
        status, out = post_json("/v1/completions", {"model": APP, **body})
        assert status == 400 and out["error"]["param"] == field, out
    status, out = post_json(
        "/v1/chat/completions",
        {"model": APP, "messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 1},
    )
    assert status == 400 and out["error"]["param"] == "prompt_logprobs"
    wait_until(lambda: pools_full(APP), timeout=30, what="KV pools full")


def test_grpc_scores_with_the_split(served, offline):
    import grpc

    from overfill_serve.tools.client import GRPCClient, GRPCError

    (ref,) = _reference(offline, "overfill", [SPLITS[0]], k=2, prompts=PROMPTS[:1])
    with GRPCClient(f"127.0.0.1:{GRPC_PORT}", application=APP) as client:
        out = client.generate(
            PROMPTS[0], model=APP, max_tokens=0, prompt_logprobs=2, continuation_start=SPLITS[0]
        )
        with pytest.raises(GRPCError) as e:
            client.generate(PROMPTS[1], model=APP, max_tokens=0, prompt_logprobs=0, continuation_start=99)
    assert [lp.token_id for lp in out.prompt_logprobs] == PROMPTS[0][1:]
    assert [lp.logprob for lp in out.prompt_logprobs] == pytest.approx(
        [s.logprob for s in ref.prompt_logprobs[1:]], abs=1e-5
    )
    assert [lp.rank for lp in out.prompt_logprobs] == [s.rank for s in ref.prompt_logprobs[1:]]
    assert out.token_ids == [] and e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.field == "continuation_start"


def test_lm_eval_remote_tokenizer_works_against_the_app(served):
    """lm-eval's `tokenizer_backend=remote` needs /tokenizer_info, /tokenize and /detokenize, vLLM's shapes."""
    utils = pytest.importorskip("lm_eval.utils")
    from overfill_serve.tokenizer import load_tokenizer

    local = load_tokenizer(served.teacher)
    remote = utils.RemoteTokenizer(f"http://127.0.0.1:{HTTP_PORT}/v1/completions")
    assert utils.check_remote_tokenizer_support(f"http://127.0.0.1:{HTTP_PORT}/v1/completions")
    text = "The quick brown fox"
    ids = local(text, add_special_tokens=False)["input_ids"]
    assert remote.encode(text) == ids and remote.decode(ids) == local.decode(ids)
    assert remote.eos_token == local.eos_token and remote.eos_token_id == local.eos_token_id
