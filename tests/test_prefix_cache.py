"""Prefix caching (issue 13 items 1, 2, 5, 6 in one process): the block pool's sharing and eviction, block
hashes with provenance, and the `LLM` with caching on against caching off — same greedy outputs in every
mode and pair kind, under preemption, swap and eviction, with the pool whole afterwards — plus which blocks a
prefill may reuse (the teacher's own prompt blocks, never what the student computed)."""

from __future__ import annotations

import pytest
from conftest import ENGINES, PAIR_KINDS
from reference import load_hf, overfill_greedy

from overfill_serve import LLM, SamplingParams
from overfill_serve.kv.block_hash import block_hashes
from overfill_serve.kv.block_pool import BlockPool

BS = 4
SYSTEM = list(range(100, 123))  # 23 tokens: five full blocks and a partial one
QUESTIONS = [[7, 9, 11], [300, 301, 302, 303, 304], [42], list(range(50, 60))]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


# -- the pool and the hashes ----------------------------------------------------------------------------
def test_shared_blocks_are_reference_counted_and_evicted_last_used_first():
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.register(a[0], b"h0")
    pool.register(a[1], b"h1")
    assert pool.acquire([b"h0", b"h1", b"h2"], 2) == (a, 2)  # the longest cached prefix, one more ref each
    pool.free(a)
    assert pool.num_free == 2  # still referenced once
    pool.free(a)
    assert pool.num_free == 4 and pool.num_cached == 2  # unreferenced, still cached, counted free
    rest = pool.allocate(2)  # never-cached blocks go first
    assert set(rest).isdisjoint(a) and pool.num_cached == 2
    evicted = pool.allocate(1)  # then the least recently used cached block: the table's last one
    assert evicted == [a[1]] and pool.acquire([b"h0", b"h1"], 1) == ([a[0]], 1)
    pool.free(rest + evicted + [a[0]])
    assert pool.num_free == 4
    with pytest.raises(AssertionError, match="freed twice"):
        pool.free([rest[0]])


def test_acquire_shares_the_cached_prefix_and_takes_the_rest_or_nothing():
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.register(a[0], b"h0")
    pool.register(a[1], b"h1")
    pool.free(a)  # both cached, unreferenced: they count as free, yet sharing them frees nothing more
    assert pool.acquire([b"h0", b"h1"], 5) is None  # 2 shared + 3 new: only 2 never-cached blocks are left
    assert pool.num_free == 4 and pool.num_cached == 2  # nothing taken, nothing evicted
    blocks, shared = pool.acquire([b"h0", b"h1"], 4)
    assert shared == 2 and blocks[:2] == a and pool.num_free == 0 and pool.num_cached == 2
    pool.free(blocks)
    blocks, shared = pool.acquire([b"other"], 4)  # a miss: the cached blocks are evicted for it
    assert shared == 0 and sorted(blocks) == [0, 1, 2, 3] and pool.num_cached == 0
    pool.free(blocks)


def test_a_block_registers_once():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.register(a, b"h")
    pool.register(b, b"h")  # the same KV computed twice: the first block stays the cached one
    pool.register(a, b"other")
    assert pool.acquire([b"h"], 1) == ([a], 1) and pool.acquire([b"other"], 0) == ([], 0)


def test_block_hashes_chain_over_blocks_and_name_the_model():
    tokens = list(range(10))
    teacher = block_hashes(tokens, BS, "teacher")
    assert len(teacher) == 2  # the partial third block has none
    assert block_hashes(tokens[:8], BS, "teacher") == teacher  # a prefix's hashes are the prefix of the chain
    assert block_hashes(tokens, BS, "student")[0] != teacher[0]  # provenance: another model, another hash
    changed = block_hashes([99, *tokens[1:]], BS, "teacher")
    assert changed[1] != teacher[1]  # a block's hash covers every token before it


# -- the engine -----------------------------------------------------------------------------------------
def _llm(pair, caching: bool, **engine) -> LLM:
    settings = dict(num_kv_blocks=96, block_size=BS, enable_prefix_caching=caching) | engine
    return LLM(pair.teacher, pair.student, **settings)


def _run(llm: LLM, prompts, mode: str, params=GREEDY):
    outs = llm.generate(prompts, params, mode=mode)
    assert llm.core.pool.num_free == llm.core.pool.num_blocks  # cached blocks count as free
    return outs


@pytest.mark.parametrize("kind", PAIR_KINDS)
def test_caching_changes_no_output_in_any_mode(pairs, kind):
    pair = pairs[kind]
    on, off = _llm(pair, True), _llm(pair, False)
    prompts = [SYSTEM + q for q in QUESTIONS]
    # Every block of a prompt but the one holding its last token (whose logits are needed) can come from the
    # cache: the prefill model's own blocks only. overfill runs first, so :full finds the teacher's blocks.
    cached = [(len(p) - 1) // BS * BS for p in prompts]
    none = [0] * len(prompts)
    for mode, before in (("overfill", none), ("full", cached), ("pruned", none)):
        want = [o.token_ids for o in _run(off, prompts, mode) + _run(off, prompts, mode)]
        first, second = _run(on, prompts, mode), _run(on, prompts, mode)
        assert [o.token_ids for o in first + second] == want, mode
        # (one batch: nothing it computes is cached yet when its prompts are admitted)
        assert [o.num_cached_tokens for o in first] == before, mode
        assert [o.num_cached_tokens for o in second] == cached, mode
        assert all(o.num_cached_tokens == 0 for o in _run(off, prompts, mode))


def test_the_gpu_path_reads_cached_blocks_as_transformers_computes(pairs):
    """The GPU engine path (the Triton kernels, interpreted here; CUDA-graph buffers; 16-token chunks): a
    prefill that starts after a cached prefix attends to the shared blocks; outputs equal transformers'
    OverFill by hand."""
    pair = pairs["depth"]
    teacher, student = load_hf(pair.teacher), load_hf(pair.student)
    prompts = [SYSTEM + q for q in QUESTIONS]
    want = [overfill_greedy(teacher, student, p, GREEDY.max_tokens, pair.kept_layers)[0] for p in prompts]
    llm = _llm(pair, True, **ENGINES["gpu_path"])
    cold = _run(llm, prompts, "overfill")
    warm = [_run(llm, [p], "overfill")[0] for p in prompts]  # one at a time: each finds the shared prefix
    assert [o.token_ids for o in cold] == want and [o.token_ids for o in warm] == want
    assert [o.num_cached_tokens for o in warm] == [(len(p) - 1) // BS * BS for p in prompts]


def test_a_second_turn_reuses_the_teachers_prompt_blocks_not_the_students_answer(width_pair):
    """Turn 2 resends turn 1's prompt and the answer the student wrote: the teacher's blocks of turn 1's
    prompt are reused, the answer's tokens are computed again by the teacher (the student's KV of them would
    change the algorithm)."""
    on, off = _llm(width_pair, True), _llm(width_pair, False)
    turn1 = SYSTEM + [5, 6, 7, 8, 9]  # 28 tokens: seven blocks
    answer = _run(on, [turn1], "overfill")[0].token_ids
    assert answer == _run(off, [turn1], "overfill")[0].token_ids
    turn2 = turn1 + answer + [60, 61, 62]
    got, want = _run(on, [turn2], "overfill")[0], _run(off, [turn2], "overfill")[0]
    assert got.token_ids == want.token_ids
    assert got.num_cached_tokens == 28  # turn 1's prompt blocks; none of the answer's


@pytest.mark.parametrize("mode", ["full", "pruned"])
def test_one_model_modes_share_the_answers_blocks_next_turn(width_pair, mode):
    """One model computes both the prompt and the answer: the KV it wrote while decoding is what its prefill
    of those tokens would compute, so the next turn shares the answer's blocks too (in OverFill mode it
    cannot: the test above)."""
    on, off = _llm(width_pair, True), _llm(width_pair, False)
    turn1 = SYSTEM + [5, 6, 7, 8, 9]  # 28 tokens
    answer = _run(on, [turn1], mode)[0].token_ids
    assert answer == _run(off, [turn1], mode)[0].token_ids
    turn2 = turn1 + answer + [60, 61, 62]
    got, want = _run(on, [turn2], mode)[0], _run(off, [turn2], mode)[0]
    assert got.token_ids == want.token_ids
    # Every block whose KV was written: the last answer token's never was (it was sampled, not fed back).
    assert got.num_cached_tokens == (len(turn1) + len(answer) - 1) // BS * BS == 32


def test_the_students_blocks_are_never_offered_to_the_teacher(width_pair):
    llm = _llm(width_pair, True)
    prompt = [SYSTEM + [1, 2, 3]]
    assert _run(llm, prompt, "pruned")[0].num_cached_tokens == 0  # the student prefills, its blocks cached
    assert _run(llm, prompt, "overfill")[0].num_cached_tokens == 0  # the teacher finds none of its own
    assert _run(llm, prompt, "pruned")[0].num_cached_tokens == 24
    assert _run(llm, prompt, "full")[0].num_cached_tokens == 24  # the teacher's own, cached by overfill
    engine = llm.core.prefill["teacher"]
    assert (engine.prefix_queries, engine.prefix_hits) == (2 * 26, 24)


def test_scored_prompts_compute_every_token_and_leave_their_blocks_cached(width_pair):
    llm = _llm(width_pair, True)
    prompt = [SYSTEM + [1, 2, 3]]
    scored = SamplingParams(max_tokens=0, prompt_logprobs=0)
    assert _run(llm, prompt, "overfill", scored)[0].num_cached_tokens == 0
    again = _run(llm, prompt, "overfill", scored)[0]
    assert again.num_cached_tokens == 0 and len(again.prompt_logprobs) == 26  # scored in full again
    assert _run(llm, prompt, "overfill")[0].num_cached_tokens == 24


@pytest.mark.parametrize("mode", ["overfill", "full"])  # full: the answers' blocks are indexed too
@pytest.mark.parametrize("swap", [0, 64], ids=["re-prefill", "swap"])
def test_outputs_hold_under_preemption_and_eviction(width_pair, swap, mode):
    """A pool too small for the batch: decodes are preempted (re-prefilled or swapped) and cached blocks are
    evicted for new ones; outputs equal caching off and every block comes back."""
    prompts = [SYSTEM[: 8 + i] + q for i, q in enumerate(QUESTIONS * 3)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    small = dict(num_kv_blocks=40, num_swap_blocks=swap)
    want = [o.token_ids for o in _run(_llm(width_pair, False, **small), prompts, mode, params)]
    on = _llm(width_pair, True, **small)
    for _ in range(2):
        outs = _run(on, prompts, mode, params)
        assert [o.token_ids for o in outs] == want
        assert sum(o.metrics.num_preemptions for o in outs) > 0  # the pool really was too small
