"""Workers on their own: local generation (full mode on the teacher, pruned mode on the student), the async
API, and what a decode worker does when it runs out of blocks."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from peer_process import SECRET

from overfill_serve import LLM, SamplingParams
from overfill_serve.errors import InvalidRequestError, PreemptedError
from overfill_serve.request import Resume
from overfill_serve.transfer.config import TransferConfig
from overfill_serve.worker.decode_worker import DecodeWorker
from overfill_serve.worker.latency_window import LatencyWindow
from overfill_serve.worker.prefill_worker import PrefillWorker

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = [list(range(10, 47)), [7, 8, 9], list(range(100, 160))]


@pytest.fixture(autouse=True)
def secret(monkeypatch):
    monkeypatch.setenv("OVERFILL_CLUSTER_SECRET", SECRET)


@pytest.fixture(scope="module")
def reference(pairs):
    pair = pairs["width"]
    llm = LLM(pair.teacher, pair.student, num_kv_blocks=128, block_size=4)
    return {
        mode: [o.token_ids for o in llm.generate(PROMPTS, GREEDY, mode=mode)] for mode in ("full", "pruned")
    }


def _tokens(stream):
    return [t for out in stream for t in out.token_ids]


def test_local_modes_match_llm(pairs, reference):
    pair = pairs["width"]
    prefill = PrefillWorker(pair.teacher, transfer=TransferConfig(), block_size=4, num_kv_blocks=64).start()
    decode = DecodeWorker(pair.student, transfer=TransferConfig(), block_size=4, num_kv_blocks=64).start()
    try:
        assert [_tokens(prefill.generate(p, GREEDY)) for p in PROMPTS] == reference["full"]
        assert [_tokens(decode.generate(p, GREEDY)) for p in PROMPTS] == reference["pruned"]

        async def run_async():
            async def one(p):
                return [t async for out in decode.agenerate(p, GREEDY) for t in out.token_ids]

            return await asyncio.gather(*(one(p) for p in PROMPTS))

        assert asyncio.run(run_async()) == reference["pruned"]
        with pytest.raises(InvalidRequestError, match="empty"):
            decode.generate([], GREEDY)
    finally:
        prefill.stop()
        decode.stop()
    assert prefill.stats().free_blocks == 64 and decode.stats().free_blocks == 64


def test_leaving_a_stream_early_frees_blocks(pairs):
    decode = DecodeWorker(pairs["width"].student, transfer=TransferConfig(), block_size=4, num_kv_blocks=64)
    decode.start()
    try:
        stream = decode.generate(PROMPTS[2], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        next(stream)
        assert decode.stats().free_blocks < 64
        stream.close()
        deadline = time.monotonic() + 5
        while decode.stats().free_blocks != 64:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        decode.stop()


def test_remote_request_preempted_hands_back_tokens_and_resumes_exactly(pairs):
    """A decode pool too small for two long requests preempts one; it comes back with its tokens, and a
    re-prefill (prompt only, tokens kept) on the prefill worker continues it to the very same output."""
    pair = pairs["width"]
    config = TransferConfig()
    prefill = PrefillWorker(pair.teacher, transfer=config, block_size=4, num_kv_blocks=128).start()
    decode = DecodeWorker(pair.student, transfer=config, block_size=4, num_kv_blocks=30).start()
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    expected = LLM(pair.teacher, pair.student, num_kv_blocks=128, block_size=4).generate(PROMPTS[2], params)[
        0
    ]
    try:
        decode.loop.call(lambda: time.sleep(0.5))  # hold the engine so both requests join the same step
        first = decode.generate_from(prefill.submit(PROMPTS[2], params))
        second = decode.generate_from(prefill.submit(PROMPTS[2], params))
        tokens = []
        with pytest.raises(PreemptedError) as e:
            for out in second:
                tokens += out.token_ids
        assert _tokens(first) == expected.token_ids  # the older request ran on undisturbed
        generated = e.value.output_token_ids
        assert generated and tokens == generated
        ticket = prefill.submit(PROMPTS[2], params, resume=Resume(tuple(generated)))
        rest = _tokens(decode.generate_from(ticket))
        assert generated + rest == expected.token_ids
    finally:
        prefill.stop()
        decode.stop()
    assert decode.stats().free_blocks == 30


def test_remote_request_preempted_with_swap_stays_on_the_decode_worker(pairs):
    """The same squeeze with a swap space: the newer request's KV goes to host memory and comes back when
    the older one finishes. Both end with the offline output and neither goes back to the prefill worker."""
    pair = pairs["width"]
    config = TransferConfig()
    prefill = PrefillWorker(pair.teacher, transfer=config, block_size=4, num_kv_blocks=128).start()
    decode = DecodeWorker(
        pair.student, transfer=config, block_size=4, num_kv_blocks=30, num_swap_blocks=30
    ).start()
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    expected = LLM(pair.teacher, pair.student, num_kv_blocks=128, block_size=4).generate(PROMPTS[2], params)[
        0
    ]
    swap = decode.core.swap
    assert swap is not None
    swapped_out: list[str] = []
    swap_out = swap.swap_out
    swap.swap_out = lambda rid, blocks: (swapped_out.append(rid), swap_out(rid, blocks))  # type: ignore[method-assign]
    try:
        decode.loop.call(lambda: time.sleep(0.5))  # hold the engine so both requests join the same step
        streams = [decode.generate_from(prefill.submit(PROMPTS[2], params)) for _ in "ab"]
        results: list[list[int]] = [[], []]
        threads = [
            threading.Thread(target=lambda k=k, it=it: results[k].extend(_tokens(it)))
            for k, it in enumerate(streams)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert results == [expected.token_ids, expected.token_ids]
        assert swapped_out and swap.num_used == 0
        assert prefill.stats().prefilled == 2  # no re-prefill
    finally:
        prefill.stop()
        decode.stop()
    assert decode.stats().free_blocks == 30


def test_latency_window_forgets_old_samples():
    window = LatencyWindow(window_s=10)
    window.add(0.2, now=100.0)
    window.add(0.4, now=105.0)
    assert window.mean(now=106.0) == pytest.approx(0.3)
    assert window.mean(now=112.0) == pytest.approx(0.4)  # the first sample left the window
    assert window.mean(now=116.0) == 0.0  # idle: nothing recent, not a stale figure


def test_workers_report_recent_ttft_and_tpot(pairs):
    pair = pairs["width"]
    config = TransferConfig()
    prefill = PrefillWorker(pair.teacher, transfer=config, block_size=4, num_kv_blocks=64).start()
    decode = DecodeWorker(pair.student, transfer=config, block_size=4, num_kv_blocks=64).start()
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    try:
        assert prefill.stats().ttft_s == 0.0 and decode.stats().tpot_s == 0.0
        start = time.perf_counter()
        assert len(_tokens(decode.generate_from(prefill.submit(PROMPTS[0], params)))) == 8
        elapsed = time.perf_counter() - start
        assert 0 < prefill.stats().ttft_s < elapsed
        assert 0 < decode.stats().tpot_s < elapsed / 4  # 7 decode steps for 8 tokens
    finally:
        prefill.stop()
        decode.stop()
