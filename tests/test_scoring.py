"""Scoring through the engine — prompt logprobs, max_tokens=0 and the OverFill split (continuation_start) —
equals an independent computation on transformers' own models, for every pair kind and both engine paths."""

from __future__ import annotations

import pytest
import torch
from conftest import ENGINES, PAIR_KINDS
from reference import load_hf, overfill_prompt_scores

from overfill_serve import LLM, SamplingParams
from overfill_serve.errors import InvalidRequestError

# (prompt, continuation start): a split right after the first token, mid-prompt, at the last token, and
# longer prompts the gpu path's 16-token budget prefills in chunks on both sides of the split.
CASES = [
    (list(range(40, 70)), 11),
    ([5, 17, 33, 101, 7, 9, 200, 3], 1),
    ([5, 17, 33, 101, 7, 9, 200, 3], 7),
    ([11, 12], 2),
    (list(range(100, 140)), 23),
]
TOP = 3


def _check_scores(out, ref_logp: torch.Tensor, prompt: list[int]) -> None:
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    ours = out.prompt_logprobs[1:]
    assert [lp.token_id for lp in ours] == prompt[1:]
    expected = ref_logp.gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(torch.tensor([lp.logprob for lp in ours]), expected, atol=1e-4, rtol=0)
    ranks = (ref_logp > expected.unsqueeze(1)).sum(dim=1) + 1
    assert [lp.rank for lp in ours] == ranks.tolist()
    values, ids = ref_logp.topk(TOP, dim=-1)
    for lp, v, i in zip(ours, values, ids):
        assert [t for t, _ in lp.top] == i.tolist()
        torch.testing.assert_close(torch.tensor([x for _, x in lp.top]), v, atol=1e-4, rtol=0)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", PAIR_KINDS)
def test_scores_match_transformers_reference(pairs, kind, engine):
    pair = pairs[kind]
    llm = LLM(pair.teacher, pair.student, num_kv_blocks=128, block_size=4, **ENGINES[engine])
    teacher, student = load_hf(pair.teacher), load_hf(pair.student)
    all_teacher = list(range(teacher.config.num_hidden_layers))
    prompts = [p for p, _ in CASES]

    def run(mode: str, splits: list[int | None], max_tokens: int = 0) -> list:
        params = [
            SamplingParams(max_tokens=max_tokens, temperature=0, prompt_logprobs=TOP, continuation_start=c)
            for c in splits
        ]
        outs = llm.generate(prompts, params, mode=mode)
        assert llm.core.pool.num_free == llm.core.pool.num_blocks  # every block back, none leaked
        return outs

    splits = [c for _, c in CASES]
    no_split: list[int | None] = [None] * len(CASES)
    references = {
        # the OverFill split: teacher up to the continuation start, student (on the teacher's KV) after it
        ("overfill", "split"): [
            overfill_prompt_scores(teacher, student, p, c, pair.kept_layers) for p, c in CASES
        ],
        # plain echo in OverFill mode: the teacher scores the whole prompt
        ("overfill", "none"): [overfill_prompt_scores(teacher, student, p, len(p)) for p in prompts],
        # one model scores everything, split or not
        ("full", "split"): [overfill_prompt_scores(teacher, teacher, p, c, all_teacher) for p, c in CASES],
        ("pruned", "split"): [overfill_prompt_scores(student, student, p, len(p)) for p in prompts],
    }
    for (mode, split), refs in references.items():
        outs = run(mode, splits if split == "split" else no_split)
        for out, (ref_logp, _), prompt in zip(outs, refs, prompts):
            assert out.token_ids == [] and out.finish_reason == "length"
            _check_scores(out, ref_logp, prompt)

    # Generating after a scored prompt: past the split, the student picks the next token.
    outs = run("overfill", splits, max_tokens=1)
    for out, (ref_logp, ref_last), prompt in zip(outs, references[("overfill", "split")], prompts):
        assert out.token_ids == [int(ref_last.argmax())]
        _check_scores(out, ref_logp, prompt)


def test_split_is_checked_against_the_prompt(width_pair):
    llm = LLM(width_pair.teacher, width_pair.student, num_kv_blocks=32, block_size=4)
    with pytest.raises(InvalidRequestError, match="continuation_start 9 is past the prompt's 8 tokens"):
        llm.generate([list(range(8))], SamplingParams(max_tokens=0, prompt_logprobs=0, continuation_start=9))
    with pytest.raises(InvalidRequestError, match="continuation_start") as e:
        SamplingParams(continuation_start=0)
    assert e.value.field == "continuation_start"
    with pytest.raises(InvalidRequestError, match="prompt_logprobs must be in"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(InvalidRequestError, match="0 only to score the prompt"):
        SamplingParams(max_tokens=0)  # nothing to return
    assert llm.core.pool.num_free == llm.core.pool.num_blocks


@pytest.mark.timeout(60)  # a stall loops forever
def test_scoring_a_pool_of_split_prompts_never_stalls(width_pair):
    """Many split prompts on a pool that holds a few of them at once: a prompt's continuation never waits for
    blocks the next prompts' teacher stages took (the core holds the whole prompt from the start)."""
    llm = LLM(width_pair.teacher, width_pair.student, num_kv_blocks=24, block_size=4)
    prompts = [list(range(10 + i, 50 + i)) for i in range(12)]  # 10 blocks each: two fit at a time
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=0, continuation_start=20)
    outs = llm.generate(prompts, params)
    assert all(len(o.token_ids) == 2 and len(o.prompt_logprobs) == 40 for o in outs)
    assert llm.core.pool.num_free == llm.core.pool.num_blocks
