"""A request migrated mid-stream (its decode replica died or gave it back) continues on another decode worker
with exactly the text an unmigrated run produces: what the first worker held back as a possible stop-string
prefix is sent by the second, and a stop string spanning the migration point is found."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from peer_process import SECRET

from overfill_serve import LLM, SamplingParams
from overfill_serve.errors import PreemptedError
from overfill_serve.request import FinishReason, Mode, Resume
from overfill_serve.serve.dispatcher import Dispatcher
from overfill_serve.transfer.config import TransferConfig
from overfill_serve.transfer.control import TransferControl
from overfill_serve.worker.decode_worker import DecodeWorker
from overfill_serve.worker.prefill_worker import PrefillWorker

PROMPT = list(range(30, 52))
TRANSFER = TransferConfig(secret=SECRET)


@dataclass(frozen=True)
class Case:
    params: SamplingParams
    text: str  # the unmigrated run's text, ended by the stop string
    cut: int  # tokens the first decode worker streams: the stop string's text spans their end
    cut_chars: int  # characters those tokens decode to
    finish_reason: FinishReason


def _spanning_stop(full: str, ends: list[int]) -> tuple[int, str]:
    """(cut, stop): a stop string whose first occurrence in `full` begins before ends[cut - 1] and ends after."""
    for cut in range(4, len(ends) - 4):
        at = ends[cut - 1]
        for before, after in ((2, 2), (3, 3), (2, 4), (4, 4)):
            stop = full[at - before : at + after]
            if "\ufffd" not in full[: at + after] and full.find(stop) == at - before:
                return cut, stop
    raise AssertionError("no stop string spans a token boundary: pick another prompt")


@pytest.fixture(scope="module", params=["spans", "diverges"])
def case(request, width_pair) -> Case:
    """The unmigrated run, by LLM, with a stop string that spans the cut, or one whose start ends the text at
    the cut (held back there) but which the text then leaves (released by the second worker)."""
    llm = LLM(width_pair.teacher, width_pair.student, num_kv_blocks=128, block_size=4)
    ids = llm.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].token_ids
    full = llm.tokenizer.decode(ids)
    ends = [len(llm.tokenizer.decode(ids[:k])) for k in range(1, len(ids) + 1)]
    cut, stop = _spanning_stop(full, ends)
    if request.param == "diverges":
        stop = full[full.find(stop) : ends[cut - 1]] + "\u2603"  # a snowman: not in this text
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop])
    out = llm.generate(PROMPT, params)[0]
    if request.param == "spans":
        assert out.stop_reason == stop and out.text == full[: full.find(stop)]
    else:
        assert out.finish_reason == "length" and out.text == full
    return Case(params, out.text, cut, ends[cut - 1], FinishReason(out.finish_reason))


@pytest.fixture(scope="module")
def workers(width_pair):
    prefill = PrefillWorker(width_pair.teacher, transfer=TRANSFER, block_size=4, num_kv_blocks=64)
    decodes = [
        DecodeWorker(width_pair.student, transfer=TRANSFER, block_size=4, num_kv_blocks=64) for _ in range(2)
    ]
    for worker in (prefill, *decodes):
        worker.start()
    yield prefill, decodes
    for worker in (prefill, *decodes):
        worker.stop()


def test_workers_resume_with_the_held_back_text(case, workers) -> None:
    prefill, (first, second) = workers
    stream = first.generate_from(prefill.submit(PROMPT, case.params))
    outs = [next(stream) for _ in range(case.cut)]
    stream.close()  # the first decode worker goes away mid-request
    sent = "".join(o.text for o in outs)
    assert len(sent) < case.cut_chars  # the start of the stop string was held back
    generated = [t for o in outs for t in o.token_ids]
    ticket = prefill.submit(PROMPT, case.params, resume=Resume(tuple(generated), len(sent)))
    rest = list(second.generate_from(ticket))
    assert sent + "".join(o.text for o in rest) == case.text
    assert rest[-1].finished and rest[-1].finish_reason == case.finish_reason
    for worker in (prefill, first, second):
        assert worker.stats().free_blocks == 64


class _Method:
    def __init__(self, call: Any) -> None:
        self.remote = call


class _Handle:
    """The part of a Serve deployment handle the Dispatcher uses, over a worker in this process."""

    def __init__(self, **methods: Any) -> None:
        self._methods = {name: _Method(call) for name, call in methods.items()}

    def options(self, **_: Any) -> _Handle:
        return self

    def __getattr__(self, name: str) -> _Method:
        return self._methods[name]


def test_dispatcher_migration_keeps_the_text_and_the_stop(case, workers) -> None:
    prefill, decodes = workers
    calls = iter(decodes)

    async def submit(*args: Any) -> Any:
        return await prefill.asubmit(*args)

    async def generate_from(ticket: Any) -> AsyncIterator[Any]:
        worker = next(calls)
        n = 0
        async for out in worker.agenerate_from(ticket):
            yield out
            n += 1
            if worker is decodes[0] and n == case.cut:  # the first replica gives the request back here
                raise PreemptedError(ticket.request_id, [])

    control = TransferControl(TRANSFER)
    dispatcher = Dispatcher(_Handle(submit=submit), _Handle(generate_from=generate_from), control)

    async def run() -> list[Any]:
        return [o async for o in dispatcher.generate(PROMPT, case.params, Mode.OVERFILL, "migrated")]

    try:
        outs = asyncio.run(run())
    finally:
        control.stop()
    assert "".join(o.text for o in outs) == case.text
    assert outs[-1].finished and outs[-1].finish_reason == case.finish_reason


def test_dispatcher_finishes_a_one_token_request_on_the_prefill_side(width_pair, workers) -> None:
    """max_tokens=1: the teacher's first token is the whole answer, so no KV is offered and no decode replica
    is asked; the text and token equal LLM's."""
    prefill, _ = workers
    params = SamplingParams(max_tokens=1, temperature=0)
    want = LLM(width_pair.teacher, width_pair.student, num_kv_blocks=64, block_size=4).generate(
        PROMPT, params
    )

    async def submit(*args: Any) -> Any:
        return await prefill.asubmit(*args)

    def generate_from(ticket: Any) -> Any:
        raise AssertionError("a one-token request reached a decode replica")

    opened = prefill.registry.open
    offered: list[Any] = []
    prefill.registry.open = lambda request: (offered.append(request), opened(request))[1]  # type: ignore[method-assign]
    control = TransferControl(TRANSFER)
    dispatcher = Dispatcher(_Handle(submit=submit), _Handle(generate_from=generate_from), control)

    async def run() -> list[Any]:
        return [o async for o in dispatcher.generate(PROMPT, params, Mode.OVERFILL, "one-token")]

    try:
        outs = asyncio.run(run())
    finally:
        control.stop()
        prefill.registry.open = opened  # type: ignore[method-assign]
    assert [(o.token_ids, o.text, o.finish_reason) for o in outs] == [
        (tuple(want[0].token_ids), want[0].text, FinishReason.LENGTH)
    ]
    assert not offered and prefill.registry.num_open == 0 and prefill.stats().free_blocks == 64
