"""OpenAI responses: completions, chat completions and their SSE streams, which the official `openai` client's own
types and stream parser accept; the model list; the whole exchange through that client over an in-process
HTTP transport."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

import openai
import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from test_openai_protocol import PAIR, chat_body, completion_body

from overfill_serve.engine.output_processor import StepOutput
from overfill_serve.errors import OutOfBlocksError
from overfill_serve.model.random_model import make_tokenizer
from overfill_serve.prompt import PromptEncoder
from overfill_serve.request import FinishReason, Mode, TokenLogprob
from overfill_serve.serve.model_names import model_list, resolve_model
from overfill_serve.serve.openai_errors import ApiError, from_exception
from overfill_serve.serve.openai_requests import (
    ChatCompletionRequest,
    CompletionRequest,
    choice_sampling_params,
    encode_prompts,
    parse_request,
)
from overfill_serve.serve.openai_responses import SSE_DONE, make_responder, merge_choices, sse
from overfill_serve.serve.served_by import ServedBy

try:
    import httpx2 as httpx  # what the installed openai client is built on
except ImportError:  # pragma: no cover - older openai releases use httpx
    import httpx  # type: ignore[no-redef]

SERVED = ServedBy.of(Mode.OVERFILL, "teacher-1.7b", "student-0.9b")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def steps_for(tok, text: str, *, top: int | None = None, reason=FinishReason.STOP) -> list[StepOutput]:
    """One StepOutput per token of `text`, the last one finishing; with logprobs when `top` is given."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out, shown = [], ""
    for i, t in enumerate(ids):
        piece = tok.decode(ids[: i + 1])
        # Hold text back while it ends inside a character, as the incremental detokenizer does.
        delta = "" if piece.endswith("\ufffd") and i + 1 < len(ids) else piece[len(shown) :]
        shown += delta
        lps: tuple[TokenLogprob, ...] = ()
        if top is not None:
            alts = tuple((a, -1.0 - k) for k, a in enumerate([t, 5, 6, 7][:top]))
            lps = (TokenLogprob(t, -0.25 - i, alts),)
        last = i + 1 == len(ids)
        out.append(StepOutput("r", (t,), delta, last, reason if last else None, lps))
    return out


def test_model_list():
    listing = model_list(PAIR, 1700000000, "teacher", "student")
    assert listing["object"] == "list"
    models = [Model.model_validate(m) for m in listing["data"]]
    assert [m.id for m in models] == [PAIR, f"{PAIR}:overfill", f"{PAIR}:full", f"{PAIR}:pruned"]
    assert {m.owned_by for m in models} == {"overfill-serve"}
    stages = [(d["overfill"]["prefill_model"], d["overfill"]["decode_model"]) for d in listing["data"]]
    assert stages == [
        ("teacher", "student"),
        ("teacher", "student"),
        ("teacher", "teacher"),
        ("student", "student"),
    ]
    assert all(d["overfill"]["description"] for d in listing["data"])
    assert model_list(PAIR, 0, "teacher", "student")["data"][3]["overfill"]["mode"] == "pruned"


# ---------------------------------------------------------------------------------------------- responses


def test_completion_response_with_logprobs(tok):
    req = parse_request(CompletionRequest, completion_body(logprobs=2, max_tokens=50))
    r = make_responder(req, SERVED, tok, prompt_tokens=3, request_id="cmpl-1", created=5)
    text = "The cat sat."
    for s in steps_for(tok, text, top=2):
        r.add(0, s)
    body = r.response()
    c = Completion.model_validate(body)
    assert (c.id, c.created, c.model, c.object) == ("cmpl-1", 5, PAIR, "text_completion")
    ch = c.choices[0]
    assert (ch.text, ch.finish_reason, ch.index) == (text, "stop", 0)
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    assert c.usage is not None and (
        c.usage.prompt_tokens,
        c.usage.completion_tokens,
        c.usage.total_tokens,
    ) == (
        3,
        n,
        3 + n,
    )
    lp = ch.logprobs
    assert (
        lp is not None
        and lp.tokens is not None
        and lp.text_offset is not None
        and lp.top_logprobs is not None
    )
    assert "".join(lp.tokens) == text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    assert lp.token_logprobs == [-0.25 - i for i in range(n)]
    assert all(tok in top for tok, top in zip(lp.tokens, lp.top_logprobs))
    assert body["overfill"] == {
        "mode": "overfill",
        "prefill_model": "teacher-1.7b",
        "decode_model": "student-0.9b",
    }


def test_completion_stream_chunks_and_usage(tok):
    req = parse_request(
        CompletionRequest, completion_body(n=2, stream=True, stream_options={"include_usage": True})
    )
    r = make_responder(req, SERVED, tok, prompt_tokens=4)
    assert r.start() == []
    chunks = []
    a, b = steps_for(tok, "one two"), steps_for(tok, "three", reason=FinishReason.LENGTH)
    for i in range(max(len(a), len(b))):  # the two choices interleave
        for index, steps in ((0, a), (1, b)):
            if i < len(steps):
                chunks += r.add(index, steps[i])
    assert r.finished
    chunks += r.finish()
    for ch in chunks[:-1]:
        assert ch["object"] == "text_completion" and ch["usage"] is None and len(ch["choices"]) == 1
    finals = [ch for ch in chunks if ch["choices"] and ch["choices"][0]["finish_reason"]]
    finals.sort(key=lambda ch: ch["choices"][0]["index"])
    assert [Completion.model_validate(f).choices[0].finish_reason for f in finals] == ["stop", "length"]
    texts = [
        "".join(ch["choices"][0]["text"] for ch in chunks[:-1] if ch["choices"][0]["index"] == i)
        for i in (0, 1)
    ]
    assert texts == ["one two", "three"]
    usage = Completion.model_validate(chunks[-1])
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens == len(a) + len(b) and usage.usage.prompt_tokens == 4


def test_completion_echo(tok):
    req = parse_request(CompletionRequest, completion_body(prompt="Say:", echo=True, stream=True))
    r = make_responder(req, SERVED, tok, prompt_tokens=2)
    assert [ch["choices"][0]["text"] for ch in r.start()] == ["Say:"]
    for s in steps_for(tok, " hi"):
        r.add(0, s)
    assert Completion.model_validate(r.response()).choices[0].text == "Say: hi"


def test_chat_response_with_logprobs_reports_exact_bytes(tok):
    req = parse_request(ChatCompletionRequest, chat_body(logprobs=True, top_logprobs=3))
    r = make_responder(req, SERVED, tok, prompt_tokens=6)
    text = "naïve café ✓ — “quotes”"
    steps = steps_for(tok, text, top=3)
    for s in steps:
        r.add(0, s)
    c = ChatCompletion.model_validate(r.response())
    assert c.object == "chat.completion" and c.id.startswith("chatcmpl-")
    ch = c.choices[0]
    assert (ch.message.role, ch.message.content, ch.finish_reason) == ("assistant", text, "stop")
    content = ch.logprobs.content if ch.logprobs else None
    assert content is not None and len(content) == len(steps)
    # Tokens that split a character report their raw bytes; all together they are the text's UTF-8.
    assert bytes(b for e in content for b in (e.bytes or [])) == text.encode()
    assert any(e.token.startswith("bytes:") for e in content)
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token for e in content)


def test_chat_stream_chunks(tok):
    req = parse_request(
        ChatCompletionRequest,
        chat_body(n=2, stream=True, stream_options={"include_usage": True}, logprobs=True),
    )
    r = make_responder(req, SERVED, tok, prompt_tokens=6)
    chunks = r.start()
    assert [ch["choices"][0]["delta"] for ch in chunks] == [{"role": "assistant", "content": ""}] * 2
    # A step whose text is held back (stop string or partial character) says nothing... unless it carries
    # its token's logprob, which is streamed with empty content.
    plain = make_responder(
        parse_request(ChatCompletionRequest, chat_body(stream=True)), SERVED, tok, prompt_tokens=1
    )
    assert plain.add(0, StepOutput("r", (200,), "", False)) == []
    held = make_responder(req, SERVED, tok, prompt_tokens=1)
    [chunk] = held.add(0, StepOutput("r", (200,), "", False, None, (TokenLogprob(200, -1.0),)))
    assert chunk["choices"][0]["delta"] == {"content": ""}
    held_logprobs = ChatCompletionChunk.model_validate(chunk).choices[0].logprobs
    assert held_logprobs is not None and len(held_logprobs.content or []) == 1
    for index, text in ((0, "Hello there"), (1, "Bye")):
        for s in steps_for(tok, text, top=0):
            chunks += r.add(index, s)
    chunks += r.finish()
    parsed = [ChatCompletionChunk.model_validate(ch) for ch in chunks]
    assert all(p.object == "chat.completion.chunk" and p.id == r.id for p in parsed)
    last = parsed[-1]
    assert (
        last.choices == []
        and last.usage is not None
        and last.usage.total_tokens == 6 + r.usage()["completion_tokens"]
    )
    assert all(p.usage is None for p in parsed[:-1])
    for i, text in ((0, "Hello there"), (1, "Bye")):
        mine = [p.choices[0] for p in parsed[:-1] if p.choices[0].index == i]
        assert "".join(c.delta.content or "" for c in mine) == text
        assert [c.finish_reason for c in mine][-1] == "stop" and all(
            c.finish_reason is None for c in mine[:-1]
        )
        assert all(c.logprobs is not None for c in mine[1:])


def test_abort_and_misuse(tok):
    r = make_responder(parse_request(ChatCompletionRequest, chat_body()), SERVED, tok, prompt_tokens=1)
    with pytest.raises(RuntimeError):
        r.response()  # not finished
    with pytest.raises(ApiError) as info:
        r.add(0, StepOutput("r", (5,), "x", True, FinishReason.ABORT))
    assert info.value.status == 503


def test_sse_format():
    event = sse({"a": "é", "b": [1]})
    assert event.startswith("data: ") and event.endswith("\n\n") and "\n" not in event[:-2]
    assert json.loads(event[len("data: ") :]) == {"a": "é", "b": [1]}
    assert SSE_DONE == "data: [DONE]\n\n"


# ------------------------------------------------- the official client, over an in-process HTTP transport


async def _aiter(
    items: Iterable[tuple[int, StepOutput]], fail: Exception | None = None
) -> AsyncIterator[Any]:
    for item in items:
        yield item
    if fail is not None:
        raise fail


def _serve(tok, fail: Exception | None = None):
    """A tiny handler doing what the ingress does, for the openai client to talk to."""

    prompts = PromptEncoder(tok, len(tok), 4096)

    def handler(request: httpx.Request) -> httpx.Response:
        try:
            req: CompletionRequest | ChatCompletionRequest
            if request.url.path.endswith("/chat/completions"):
                req = parse_request(ChatCompletionRequest, request.content)
            else:
                req = parse_request(CompletionRequest, request.content)
            mode = resolve_model(req.model, PAIR)
            served = ServedBy.of(mode, "teacher", "student")
            choice_sampling_params(req)
            r = make_responder(req, served, tok, prompt_tokens=sum(map(len, encode_prompts(req, prompts))))
            outputs = [(i, s) for i in range(req.num_choices) for s in steps_for(tok, f"answer {i}", top=1)]
            if req.stream:

                async def collect() -> str:
                    return "".join([e async for e in r.sse_stream(_aiter(outputs, fail))])

                body = asyncio.run(collect())
                return httpx.Response(
                    200, content=body.encode(), headers={"content-type": "text/event-stream"}
                )
            for i, s in outputs:
                r.add(i, s)
            return httpx.Response(200, json=r.response())
        except Exception as e:
            err = from_exception(e)
            return httpx.Response(err.status, json=err.to_json(), headers=err.headers)

    return openai.OpenAI(
        api_key="k",
        base_url="http://router/v1",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
    )


def test_openai_client_round_trip(tok):
    client = _serve(tok)
    c = client.completions.create(model=PAIR, prompt="Hi", logprobs=1, n=2, seed=3)
    assert [ch.text for ch in c.choices] == ["answer 0", "answer 1"]
    assert c.model_extra and c.model_extra["overfill"]["mode"] == "overfill"
    chat = client.chat.completions.create(model=f"{PAIR}:full", messages=[{"role": "user", "content": "Hi"}])
    assert chat.choices[0].message.content == "answer 0"
    assert chat.model_extra and chat.model_extra["overfill"]["decode_model"] == "teacher"
    stream = client.chat.completions.create(
        model=f"{PAIR}:pruned",
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
        top_logprobs=1,
    )
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "answer 0"
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    texts = [ch.choices[0].text for ch in client.completions.create(model=PAIR, prompt="Hi", stream=True)]
    assert "".join(texts) == "answer 0"


def test_openai_client_sees_errors(tok):
    client = _serve(tok)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=PAIR, prompt="Hi", temperature=-1)
    assert bad.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert missing.value.code == "model_not_found"
    failing = _serve(tok, fail=OutOfBlocksError("no room"))
    stream = failing.chat.completions.create(
        model=PAIR, messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    with pytest.raises(openai.APIError) as mid:
        list(stream)
    assert mid.value.type == "service_unavailable" and mid.value.code == "overloaded"


def test_eos_step_without_text_closes_the_choice(tok):
    chat = make_responder(
        parse_request(ChatCompletionRequest, chat_body(stream=True)), SERVED, tok, prompt_tokens=1
    )
    chat.add(0, StepOutput("r", (300,), "Hi", False))
    [last] = chat.add(0, StepOutput("r", (0,), "", True, FinishReason.STOP))
    choice = ChatCompletionChunk.model_validate(last).choices[0]
    assert (choice.delta.content, choice.finish_reason) == (None, "stop")
    assert ChatCompletion.model_validate(chat.response()).usage.completion_tokens == 2  # type: ignore[union-attr]
    text = make_responder(parse_request(CompletionRequest, completion_body()), SERVED, tok, prompt_tokens=1)
    [last] = text.add(0, StepOutput("r", (0,), "", True, FinishReason.LENGTH))
    assert Completion.model_validate(last).choices[0].finish_reason == "length"


async def _steps(texts: list[str], delay: float, fail: Exception | None = None) -> AsyncIterator[StepOutput]:
    for k, text in enumerate(texts):
        await asyncio.sleep(delay)
        yield StepOutput(
            "r", (k,), text, k + 1 == len(texts), FinishReason.STOP if k + 1 == len(texts) else None
        )
    if fail is not None:
        raise fail


def test_merge_choices_interleaves_and_propagates_errors():
    async def collect(streams) -> list[tuple[int, str]]:
        return [(i, s.text) async for i, s in merge_choices(streams)]

    got = asyncio.run(collect([_steps(["a", "b", "c"], 0.01), _steps(["x", "y"], 0.015)]))
    assert [t for i, t in got if i == 0] == ["a", "b", "c"] and [t for i, t in got if i == 1] == ["x", "y"]
    assert asyncio.run(collect([_steps(["solo"], 0)])) == [(0, "solo")]

    cancelled = []

    async def forever() -> AsyncIterator[StepOutput]:
        try:
            while True:
                await asyncio.sleep(0.01)
                yield StepOutput("r", (1,), "z", False)
        finally:
            cancelled.append(True)  # the other choice is stopped, not leaked

    with pytest.raises(OutOfBlocksError):
        asyncio.run(collect([_steps(["a"], 0.02, fail=OutOfBlocksError("full")), forever()]))
    assert cancelled == [True]
