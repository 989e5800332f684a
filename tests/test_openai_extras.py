"""vLLM's extras at the protocol level: /tokenize and /detokenize bodies (the served tokenizer through the
PromptEncoder every API uses, with 400s naming the field and 404 for a model not served), GET /v1/models/{id},
the responses to a batch of prompts and usage on every streamed chunk (continuous_usage_stats)."""

from __future__ import annotations

import json

import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletionChunk
from test_openai_api import SERVED, steps_for
from test_openai_protocol import PAIR, chat_body, completion_body

from overfill_serve.engine.output_processor import StepOutput
from overfill_serve.errors import ModelNotFoundError
from overfill_serve.model.random_model import make_tokenizer
from overfill_serve.prompt import PromptEncoder
from overfill_serve.request import FinishReason, TokenLogprob
from overfill_serve.serve.model_names import model_entry
from overfill_serve.serve.openai_errors import ApiError, from_exception
from overfill_serve.serve.openai_requests import ChatCompletionRequest, CompletionRequest, parse_request
from overfill_serve.serve.openai_responses import make_responder
from overfill_serve.serve.openai_tokenize import detokenize, tokenize, tokenizer_info


@pytest.fixture(scope="module")
def encoder() -> PromptEncoder:
    tok = make_tokenizer()
    return PromptEncoder(tok, len(tok), 64)


def call(fn, body: dict, encoder: PromptEncoder) -> dict:
    return fn(json.dumps(body).encode(), encoder, PAIR)


def error_of(fn, body: dict, encoder: PromptEncoder) -> ApiError:
    with pytest.raises(Exception) as info:
        call(fn, body, encoder)
    return from_exception(info.value)


def test_tokenize_a_prompt_and_a_chat(encoder):
    tok = encoder.tokenizer
    out = call(tokenize, {"model": PAIR, "prompt": "Hello world"}, encoder)
    assert out == {
        "count": len(out["tokens"]),
        "max_model_len": 64,
        "tokens": tok("Hello world")["input_ids"],
    }
    long = call(tokenize, {"prompt": "word " * 200}, encoder)  # over the context: still counted
    assert long["count"] > 64
    messages = [{"role": "user", "content": "Hi"}]
    chat = call(tokenize, {"model": f"{PAIR}:full", "messages": messages}, encoder)
    assert tok.decode(chat["tokens"]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert chat["tokens"] == encoder.chat(messages)  # what a chat completion of it would prefill
    bare = call(tokenize, {"messages": messages, "add_generation_prompt": False}, encoder)
    assert tok.decode(bare["tokens"]) == "<|im_start|>user\nHi<|im_end|>\n"


def test_detokenize_round_trips(encoder):
    ids = call(tokenize, {"prompt": "héllo wörld"}, encoder)["tokens"]
    assert call(detokenize, {"model": PAIR, "tokens": ids}, encoder) == {"prompt": "héllo wörld"}


@pytest.mark.parametrize(
    "fn, body, status, param",
    [
        (tokenize, {"model": "other", "prompt": "x"}, 404, "model"),
        (tokenize, {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400, "prompt"),
        (tokenize, {}, 400, "prompt"),
        (tokenize, {"prompt": 5}, 400, "prompt"),
        (tokenize, {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
        (detokenize, {"tokens": [1, 10**6]}, 400, "tokens"),
        (detokenize, {"tokens": [-1]}, 400, "tokens"),
        (detokenize, {"tokens": "abc"}, 400, "tokens"),
        (detokenize, {"model": "other", "tokens": [1]}, 404, "model"),
    ],
)
def test_bad_requests_name_the_field(encoder, fn, body, status, param):
    error = error_of(fn, body, encoder)
    assert (error.status, error.param) == (status, param), error.message


def test_one_model_by_id():
    entry = model_entry(f"{PAIR}:pruned", PAIR, 1700000000, "teacher", "student")
    assert Model.model_validate(entry).id == f"{PAIR}:pruned" and entry["overfill"]["mode"] == "pruned"
    with pytest.raises(ModelNotFoundError):
        model_entry("gpt-4", PAIR, 0, "teacher", "student")
    assert from_exception(ModelNotFoundError("gpt-4", [PAIR])).code == "model_not_found"


@pytest.fixture(scope="module")
def tok(encoder):
    return encoder.tokenizer


def test_a_batch_of_prompts_answers_each_with_its_choices_and_sums_usage(tok):
    req = parse_request(CompletionRequest, completion_body(prompt=[[7, 8], [5, 6]], n=2, echo=True))
    r = make_responder(req, SERVED, tok, prompt_tokens=2 + 2)
    steps = {i: steps_for(tok, f" reply {i}") for i in range(4)}
    for i in (3, 0, 2, 1):  # any arrival order
        for s in steps[i]:
            r.add(i, s)
    body = Completion.model_validate(r.response())
    assert [c.index for c in body.choices] == [0, 1, 2, 3]
    echoed = [tok.decode([7, 8])] * 2 + [tok.decode([5, 6])] * 2
    assert [c.text for c in body.choices] == [f"{e} reply {i}" for i, e in enumerate(echoed)]
    assert body.usage is not None and body.usage.prompt_tokens == 4
    assert body.usage.completion_tokens == sum(len(s) for s in steps.values())
    assert (
        body.usage.prompt_tokens_details is not None and body.usage.prompt_tokens_details.cached_tokens == 0
    )


@pytest.mark.parametrize("include_usage", [True, False])
def test_continuous_usage_stats_put_usage_on_every_chunk(tok, include_usage):
    options = {"include_usage": include_usage, "continuous_usage_stats": True}
    req = parse_request(ChatCompletionRequest, chat_body(stream=True, stream_options=options))
    r = make_responder(req, SERVED, tok, prompt_tokens=6)
    chunks = r.start()
    steps = steps_for(tok, "one two three")
    for s in steps:
        chunks += r.add(0, s)
    chunks += r.finish()
    parsed = [ChatCompletionChunk.model_validate(ch) for ch in chunks]
    assert all(p.usage is not None and p.usage.prompt_tokens == 6 for p in parsed)
    counts = [p.usage.completion_tokens for p in parsed if p.usage is not None]
    assert counts[0] == 0 and counts == sorted(counts) and counts[-1] == len(steps)
    assert (parsed[-1].choices == []) == include_usage  # the final usage chunk only with include_usage
    assert all(p.usage.total_tokens == 6 + p.usage.completion_tokens for p in parsed if p.usage)


def test_scored_echo_offsets_point_into_the_echoed_text(tok):
    """Echo with logprobs lists the prompt's tokens with offsets in the echoed text: increasing, and a token
    that ends inside a character (byte-level BPE) points where that character starts, never past the text."""
    text = "café ☕ naïve"
    ids = tok(text)["input_ids"]
    req = parse_request(CompletionRequest, completion_body(prompt=ids, echo=True, logprobs=1, max_tokens=0))
    r = make_responder(req, SERVED, tok, prompt_tokens=len(ids), prompt_token_ids=[ids])
    scores = tuple(TokenLogprob(t, -1.0, ((t, -1.0),), 1) for t in ids[1:])
    r.add(0, StepOutput("r", (), "", True, FinishReason.LENGTH, prompt_logprobs=scores))
    choice = r.response()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == text and lp["token_logprobs"] == [None] + [-1.0] * (len(ids) - 1)
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][-1] < len(text)
    for token, offset in zip(lp["tokens"], lp["text_offset"]):
        if not token.startswith("bytes:"):
            assert text[offset:].startswith(token)
    assert [text[o] for o in lp["text_offset"][3:5]] == ["é", "é"]  # the two bytes of "é"


def test_tokenizer_info_describes_the_served_tokenizer(encoder):
    info = tokenizer_info(encoder)
    tok = encoder.tokenizer
    assert info["eos_token"] == tok.eos_token and info["bos_token"] == tok.bos_token
    assert info["chat_template"] == tok.chat_template and info["model_max_length"] == encoder.max_model_len
    json.dumps(info)  # a JSON body


def test_usage_counts_each_prompts_cached_tokens_once(tok):
    """n choices of one prompt: the prompt's cached tokens are what its choices found most, counted once."""
    req = parse_request(CompletionRequest, completion_body(prompt=[[7, 8, 9], [5, 6]], n=2))
    r = make_responder(req, SERVED, tok, prompt_tokens=5)
    for index, cached in enumerate((0, 8, 4, 4)):
        r.add(index, StepOutput("r", (7,), "x", True, FinishReason.LENGTH, num_cached_tokens=cached))
    assert r.response()["usage"]["prompt_tokens_details"] == {"cached_tokens": 8 + 4}
