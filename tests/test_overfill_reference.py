"""OverFill outputs equal an independent reference built on transformers' own models, pair by pair."""

from __future__ import annotations

import pytest
import torch
from conftest import ENGINES, PAIR_KINDS
from reference import load_hf, overfill_greedy

from overfill_serve import LLM, SamplingParams

PROMPTS = [
    [5, 17, 33, 101, 7, 9, 200],
    list(range(40, 90)),
    [300],
    [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22],
]
MAX_TOKENS = 12


def _check(outputs, references, kept=None):
    for out, (ref_tokens, ref_logits) in zip(outputs, references):
        assert out.token_ids == ref_tokens
        ref_logprobs = torch.stack([torch.log_softmax(lg, -1)[t] for lg, t in zip(ref_logits, ref_tokens)])
        ours = torch.tensor([lp.logprob for lp in out.logprobs])
        torch.testing.assert_close(ours, ref_logprobs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", PAIR_KINDS)
def test_modes_match_transformers_reference(pairs, kind, engine):
    pair = pairs[kind]
    llm = LLM(pair.teacher, pair.student, num_kv_blocks=128, block_size=4, **ENGINES[engine])
    teacher, student = load_hf(pair.teacher), load_hf(pair.student)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=0)
    kept = pair.kept_layers
    all_teacher = list(range(teacher.config.num_hidden_layers))

    # overfill: teacher prefill + first token, student decode on the teacher's KV of its kept layers
    _check(
        llm.generate(PROMPTS, params, mode="overfill"),
        [overfill_greedy(teacher, student, p, MAX_TOKENS, kept) for p in PROMPTS],
    )
    # full: the teacher alone
    _check(
        llm.generate(PROMPTS, params, mode="full"),
        [overfill_greedy(teacher, teacher, p, MAX_TOKENS, all_teacher) for p in PROMPTS],
    )
    # pruned: the student alone (its own prefill)
    student_layers = list(range(student.config.num_hidden_layers))
    _check(
        llm.generate(PROMPTS, params, mode="pruned"),
        [overfill_greedy(student, student, p, MAX_TOKENS, student_layers) for p in PROMPTS],
    )
    assert llm.core.pool.num_free == llm.core.pool.num_blocks


def test_overfill_differs_from_both_single_model_modes(width_pair):
    """Guards against a mode running the wrong model: the three modes give three different outputs."""
    llm = LLM(width_pair.teacher, width_pair.student, num_kv_blocks=64, block_size=4)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    tokens = {
        mode: llm.generate(PROMPTS[1], params, mode=mode)[0].token_ids
        for mode in ("overfill", "full", "pruned")
    }
    assert tokens["overfill"][0] == tokens["full"][0]  # the first token always comes from the teacher
    assert tokens["overfill"] != tokens["full"] and tokens["overfill"] != tokens["pruned"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_close_to_fp32(width_pair, dtype):
    """bf16/fp16 weights and KV run and mostly agree with fp32 greedy (exact equality is not expected)."""
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ref = LLM(width_pair.teacher, width_pair.student, num_kv_blocks=64).generate(PROMPTS, params)
    low = LLM(width_pair.teacher, width_pair.student, dtype=dtype, num_kv_blocks=64)
    assert low.core.cache.tensor.dtype == getattr(torch, dtype)
    out = low.generate(PROMPTS, params)
    first_agree = sum(a.token_ids[0] == b.token_ids[0] for a, b in zip(ref, out))
    assert first_agree >= len(PROMPTS) - 1
