"""Scoring across the KV channel: the prefill worker's teacher scores the prompt up to the continuation start
and ships that KV (only that) with its scores; the decode worker's student computes and scores the rest on it.
Real workers on loopback over gRPC and (where installed) NIXL; the offline `LLM` — checked against
transformers in test_scoring.py — is the reference."""

from __future__ import annotations

import dataclasses

import pytest
from kv_helpers import BACKENDS, wait_pools_returned, worker_pair

from overfill_serve import LLM, SamplingParams
from overfill_serve.errors import ChunkError
from overfill_serve.kv.paged_cache import blocks_for
from overfill_serve.transfer.config import TransferConfig

PROMPT = list(range(10, 47))  # 37 tokens
SPLIT = 13
PARAMS = {
    "score": SamplingParams(max_tokens=0, prompt_logprobs=2, continuation_start=SPLIT),
    "score+generate": SamplingParams(
        max_tokens=4, temperature=0, prompt_logprobs=1, continuation_start=SPLIT
    ),
    "teacher scores all": SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=0),
}


@pytest.fixture(scope="module")
def reference(pairs):
    pair = pairs["depth"]
    llm = LLM(pair.teacher, pair.student, num_kv_blocks=96, block_size=4)
    return {name: llm.generate(PROMPT, params)[0] for name, params in PARAMS.items()}


@pytest.fixture(scope="module", params=BACKENDS)
def workers(pairs, request):
    config = TransferConfig(backend=request.param, chunk_bytes=1024, timeout_seconds=10.0)
    with worker_pair(pairs["depth"], config) as both:
        yield both


@pytest.mark.parametrize("name", PARAMS)
def test_split_scores_across_the_channel(workers, reference, name):
    prefill, decode = workers
    params, want = PARAMS[name], reference[name]
    outs = list(decode.generate_from(prefill.submit(PROMPT, params)))
    assert [t for o in outs for t in o.token_ids] == want.token_ids
    assert outs[-1].finished and outs[-1].finish_reason.value == want.finish_reason
    scores = [o.prompt_logprobs for o in outs if o.prompt_logprobs]
    assert len(scores) == 1 and len(scores[0]) == len(PROMPT) - 1  # once, with the first output
    assert [(lp.token_id, lp.top) for lp in scores[0]] == [
        (lp.token_id, lp.top) for lp in want.prompt_logprobs[1:]
    ]
    assert [lp.logprob for lp in scores[0]] == pytest.approx(
        [lp.logprob for lp in want.prompt_logprobs[1:]], abs=1e-5
    )
    # Only the KV the teacher computed is offered: up to the continuation start when there is one (the blocks
    # an earlier case left in the decode side's prefix cache are not sent again).
    kv_tokens = params.continuation_start or len(PROMPT)
    layout, last = decode.layout, decode.last_transfer
    assert last.nbytes + last.saved_bytes == blocks_for(kv_tokens, 4) * 2 * len(layout.kept_layers) * (
        decode.core.cache.block_bytes
    )
    wait_pools_returned(prefill, decode)


def test_a_completion_that_does_not_fit_the_request_is_refused(workers):
    """The decode side checks the peer's completion against the request it took: scores it did not ask for
    (or missing ones) and a KV length other than its split's are errors, and every block comes back."""
    prefill, decode = workers
    asked = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1, continuation_start=SPLIT)
    for sent, seen in (
        (SamplingParams(max_tokens=2, temperature=0, continuation_start=SPLIT), asked),  # no scores came
        (asked, dataclasses.replace(asked, continuation_start=SPLIT + 5)),  # another split
    ):
        ticket = prefill.submit(PROMPT, sent)
        with pytest.raises(ChunkError, match="scored prompt tokens|completion covers|block addresses"):
            list(decode.generate_from(dataclasses.replace(ticket, params=seen)))
        prefill.abort_transfer(ticket.transfer_id)
    wait_pools_returned(prefill, decode)
