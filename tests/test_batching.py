"""Continuous batching, chunked prefill and preemption give the tokens of one-at-a-time generation."""

from __future__ import annotations

import random

import pytest

from overfill_serve import LLM, SamplingParams


def _workload(n: int, seed: int = 0) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    return [
        (
            [rng.randrange(3, 500) for _ in range(rng.randint(1, 60))],
            SamplingParams(max_tokens=rng.randint(1, 20), temperature=0, ignore_eos=True),
        )
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def one_at_a_time(width_pair):
    llm = LLM(width_pair.teacher, width_pair.student, num_kv_blocks=256, block_size=4)
    return {i: llm.generate(p, sp)[0].token_ids for i, (p, sp) in enumerate(_workload(32))}


def _run_staggered(llm: LLM, work, arrivals_per_step: int) -> dict[int, list[int]]:
    """Requests arrive a few per engine step while others are mid-prefill or mid-decode."""
    pending = list(enumerate(work))
    ids: dict[str, int] = {}
    tokens: dict[int, list[int]] = {}
    while pending or llm.has_unfinished():
        for _ in range(arrivals_per_step):
            if pending:
                i, (prompt, params) = pending.pop(0)
                ids[llm.add_request(prompt, params)] = i
        for out in llm.step():
            tokens.setdefault(ids[out.request_id], []).extend(out.token_ids)
    return tokens


@pytest.mark.parametrize("batch", [1, 8, 32])
def test_batched_equals_one_at_a_time(width_pair, one_at_a_time, batch):
    llm = LLM(width_pair.teacher, width_pair.student, num_kv_blocks=256, block_size=4, max_num_seqs=batch)
    work = _workload(32)
    outs = llm.generate([p for p, _ in work], [sp for _, sp in work])
    assert {i: o.token_ids for i, o in enumerate(outs)} == one_at_a_time
    assert llm.core.pool.num_free == llm.core.pool.num_blocks


@pytest.mark.parametrize("arrivals_per_step", [1, 3])
def test_staggered_arrivals(width_pair, one_at_a_time, arrivals_per_step):
    llm = LLM(width_pair.teacher, width_pair.student, num_kv_blocks=256, block_size=4, max_num_seqs=8)
    assert _run_staggered(llm, _workload(32), arrivals_per_step) == one_at_a_time
    assert llm.core.pool.num_free == llm.core.pool.num_blocks


def test_chunked_prefill(width_pair, one_at_a_time):
    """A token budget smaller than most prompts splits them over several prefill steps."""
    llm = LLM(
        width_pair.teacher, width_pair.student, num_kv_blocks=256, block_size=4, max_num_batched_tokens=7
    )
    assert _run_staggered(llm, _workload(32), 2) == one_at_a_time
    assert llm.core.pool.num_free == llm.core.pool.num_blocks


def test_preemption_keeps_outputs(width_pair, one_at_a_time):
    """A pool far too small for the batch forces decode-side preemptions; every request still ends with the
    same tokens, and the student recomputes its own KV for the tokens it had generated."""
    llm = LLM(width_pair.teacher, width_pair.student, num_kv_blocks=24, block_size=4, max_num_seqs=32)
    work = _workload(32)
    outs = llm.generate([p for p, _ in work], [sp for _, sp in work])
    assert {i: o.token_ids for i, o in enumerate(outs)} == one_at_a_time
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    assert llm.core.pool.num_free == llm.core.pool.num_blocks


def _count_re_prefills(llm: LLM) -> list[str]:
    """Requests sent back to a prefill engine (a preempted decode's re-prefill goes to the front)."""
    calls: list[str] = []
    for engine in llm.core.prefill.values():
        add = engine.add

        def counted(request, front=False, add=add):
            if front:
                calls.append(request.request_id)
            add(request, front)

        engine.add = counted  # type: ignore[method-assign]
    return calls


@pytest.mark.parametrize("swap_blocks", [64, 6])
def test_preemption_with_swap_keeps_outputs(width_pair, one_at_a_time, swap_blocks):
    """Preempted decodes swap their KV out and back in: the same tokens, nothing recomputed while the swap
    space has room (64 blocks), re-prefill as the fallback when it has not (6 blocks)."""
    llm = LLM(
        width_pair.teacher,
        width_pair.student,
        num_kv_blocks=24,
        block_size=4,
        max_num_seqs=32,
        num_swap_blocks=swap_blocks,
    )
    re_prefilled = _count_re_prefills(llm)
    work = _workload(32)
    outs = llm.generate([p for p, _ in work], [sp for _, sp in work])
    assert {i: o.token_ids for i, o in enumerate(outs)} == one_at_a_time
    preemptions = sum(o.metrics.num_preemptions for o in outs)
    assert preemptions > 0
    assert (len(re_prefilled) == 0) if swap_blocks == 64 else (0 < len(re_prefilled) < preemptions)
    assert (
        llm.core.pool.num_free == llm.core.pool.num_blocks
        and llm.core.swap is not None
        and llm.core.swap.num_used == 0
    )


def test_abort_while_swapped_frees_the_swap_space(width_pair):
    llm = LLM(width_pair.teacher, width_pair.student, num_kv_blocks=12, block_size=4, num_swap_blocks=64)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    ids = [llm.add_request(list(range(10 + i, 20 + i)), params) for i in range(3)]
    swapped = llm.core.decode["student"].swapped
    while not swapped:
        llm.step()
    victim = swapped[0].request_id
    assert llm.core.swap is not None and llm.core.swap.num_used > 0
    assert llm.abort(victim)
    while llm.has_unfinished():
        llm.step()
    assert (
        victim in ids and llm.core.swap.num_used == 0 and llm.core.pool.num_free == llm.core.pool.num_blocks
    )


def test_abort_mid_flight_frees_blocks(width_pair):
    llm = LLM(width_pair.teacher, width_pair.student, num_kv_blocks=64, block_size=4)
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    a = llm.add_request(list(range(10, 40)), params)
    b = llm.add_request(list(range(50, 60)), params)
    llm.step()  # both prefilled, first tokens sampled
    llm.step()  # decoding
    assert llm.core.pool.num_free < llm.core.pool.num_blocks
    assert llm.abort(a) and llm.abort(b)
    assert not llm.abort(a)
    assert not llm.has_unfinished()
    assert llm.core.pool.num_free == llm.core.pool.num_blocks


def test_prefill_takes_blocks_only_for_prompts_it_schedules(width_pair):
    """Waiting prompts beyond the step's token budget hold no blocks: in the shared pool, blocks taken early
    would be blocks the running decodes cannot grow into."""
    llm = LLM(
        width_pair.teacher, width_pair.student, num_kv_blocks=128, block_size=4, max_num_batched_tokens=32
    )
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    for i in range(4):
        llm.add_request(list(range(10 + i, 40 + i)), params)  # 30 tokens: 8 blocks each
    llm.step()  # the budget covers the first prompt and 2 tokens of the second
    prefill = llm.core.prefill["teacher"]
    assert [r.num_computed_tokens for r in prefill.running] == [2]
    assert len(prefill.waiting) == 2 and not any(r.block_table for r in prefill.waiting)
    assert llm.core.pool.num_used == 8 + 8  # the first (now decoding, 31 tokens) and the second prompt


def test_waiting_prompts_do_not_preempt_a_running_decode(width_pair):
    """A decode running beside a queue of long prompts: each prompt takes its blocks when it is scheduled,
    so the decode grows into the pool and is never preempted; the outputs equal one-at-a-time runs."""
    prompts = [list(range(3, 11))] + [list(range(100 + 9 * i, 164 + 9 * i)) for i in range(6)]
    params = [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)] + [
        SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    ] * 6  # 8 + 40 tokens (12 blocks), then 64-token prompts (16 blocks each) that end on their first token
    reference = LLM(width_pair.teacher, width_pair.student, num_kv_blocks=128, block_size=4)
    want = [reference.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params)]
    llm = LLM(
        width_pair.teacher, width_pair.student, num_kv_blocks=34, block_size=4, max_num_batched_tokens=32
    )
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == want
    assert [o.metrics.num_preemptions for o in outs] == [0] * 7
    assert llm.core.pool.num_free == llm.core.pool.num_blocks
