"""vLLM's sampling extras in the engine: `logit_bias` (added to the logits before sampling) and `min_tokens`
(eos and the stop token ids are neither sampled nor stop the request, and stop strings do not end it, until
that many tokens are out), each checked against logits edited by hand, down to an independent transformers
reference of the OverFill pair."""

from __future__ import annotations

import pytest
import torch
from reference import load_hf, overfill_greedy

from overfill_serve import LLM
from overfill_serve.detokenizer import IncrementalDetokenizer
from overfill_serve.engine.output_processor import OutputProcessor
from overfill_serve.engine.sampler import Sampler
from overfill_serve.errors import InvalidRequestError
from overfill_serve.model.random_model import make_tokenizer
from overfill_serve.request import Request
from overfill_serve.sampling_params import MAX_LOGIT_BIAS, SamplingParams

EOS = 0


def biased(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    out = logits.clone()
    for token, value in bias.items():
        out[token] += value
    return out


def test_logit_bias_equals_logits_biased_by_hand() -> None:
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0))
    top = logits.argmax(-1).tolist()
    biases = [{top[0]: -100.0}, {7: 100.0}, {top[2]: -3.5, 11: 2.0, 250: 1.25}, {}]
    greedy = [
        Request(f"g{i}", [1], SamplingParams(temperature=0, logit_bias=b)) for i, b in enumerate(biases)
    ]
    out = Sampler()(logits, greedy)
    expected = [int(biased(logits[i], b).argmax()) for i, b in enumerate(biases)]
    assert [s.token_id for s in out] == expected
    assert out[0].token_id != top[0] and out[1].token_id == 7
    # Sampled with a seed: the same draws as sampling the hand-biased logits without a bias.
    for i, bias in enumerate(biases):
        params = SamplingParams(temperature=0.8, top_p=0.9, seed=3, logit_bias=bias)
        plain = SamplingParams(temperature=0.8, top_p=0.9, seed=3)
        for step in range(5):
            history = list(range(step))
            ours = Sampler()(logits[i : i + 1], [Request("s", [1], params, output_token_ids=history)])
            by_hand = biased(logits[i], bias).unsqueeze(0)
            ref = Sampler()(by_hand, [Request("s", [1], plain, output_token_ids=history)])
            assert ours[0].token_id == ref[0].token_id


def test_logit_bias_leaves_logprobs_raw_and_the_input_alone() -> None:
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1))
    before = logits.clone()
    params = SamplingParams(temperature=0, logprobs=1, logit_bias={3: 100.0})
    (out,) = Sampler()(logits, [Request("a", [1], params)])
    assert out.token_id == 3 and torch.equal(logits, before)
    assert out.logprob is not None
    assert out.logprob.logprob == pytest.approx(float(torch.log_softmax(logits[0], -1)[3]), abs=1e-5)


def test_min_tokens_masks_eos_and_stop_token_ids_until_reached() -> None:
    logits = torch.zeros(1, 20)
    logits[0, EOS], logits[0, 5], logits[0, 9] = 9.0, 8.0, 7.0
    sampler = Sampler(eos_token_ids=(EOS,))
    params = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=(5,))

    def pick(p: SamplingParams, generated: int) -> int:
        return sampler(logits, [Request("r", [1], p, output_token_ids=[12] * generated)])[0].token_id

    assert [pick(params, g) for g in range(5)] == [9, 9, 9, EOS, EOS]
    ignoring = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=(5,), ignore_eos=True)
    assert pick(ignoring, 0) == EOS  # eos does not stop this request: it is not masked
    assert pick(SamplingParams(temperature=0), 0) == EOS


def test_sampling_params_check_min_tokens_logit_bias_and_stop_ids() -> None:
    assert SamplingParams(logit_bias={9: 1, 2: -1.5}).logit_bias == ((2, -1.5), (9, 1))
    cases = [
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 17, "max_tokens": 16}, "min_tokens"),
        ({"stop_token_ids": (-1,)}, "stop_token_ids"),
        ({"logit_bias": {3: 100.5}}, "logit_bias"),
        ({"logit_bias": {3: float("nan")}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": ((3, 1.0), (3, 2.0))}, "logit_bias"),
        ({"logit_bias": {i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)}}, "logit_bias"),
    ]
    for kwargs, field in cases:
        with pytest.raises(InvalidRequestError) as e:
            SamplingParams(**kwargs)
        assert e.value.field == field, kwargs
    SamplingParams(min_tokens=16, logit_bias={i: -100.0 for i in range(MAX_LOGIT_BIAS)})


def test_stop_rule_and_stop_strings_wait_for_min_tokens() -> None:
    tok = make_tokenizer()
    params = SamplingParams(min_tokens=3, stop_token_ids=(5,), stop=["b"])
    rule = OutputProcessor(tok, (EOS,), 100)
    assert [
        rule.stops_on(t, params, generated=g) for t, g in [(EOS, 2), (5, 2), (EOS, 3), (5, 3), (6, 3)]
    ] == [
        False,
        False,
        True,
        True,
        False,
    ]
    ids = [tok.convert_tokens_to_ids(c) for c in "abcab"]
    detok = IncrementalDetokenizer(tok, [], params)
    stops = [detok.step(t).stop_string for t in ids]
    assert stops == [None, None, None, None, "b"]  # the "b" at token 2 came before min_tokens
    assert detok.text == "abca"


@pytest.fixture(scope="module")
def pair_and_llm(width_pair):
    llm = LLM(width_pair.teacher, width_pair.student, num_kv_blocks=64, block_size=4)
    return width_pair, llm, load_hf(width_pair.teacher), load_hf(width_pair.student)


PROMPT = list(range(40, 60))


def test_the_offline_llm_checks_token_ids_against_the_vocabulary(pair_and_llm) -> None:
    _, llm, _, _ = pair_and_llm
    vocab = llm.prompts.vocab_size
    for params, field in [
        (SamplingParams(logit_bias={vocab: 1.0}), "logit_bias"),
        (SamplingParams(stop_token_ids=(vocab + 5,)), "stop_token_ids"),
    ]:
        with pytest.raises(InvalidRequestError) as e:
            llm.generate(PROMPT, params)
        assert e.value.field == field


def test_logit_bias_through_the_pair_matches_a_hand_biased_reference(pair_and_llm) -> None:
    _, llm, teacher, student = pair_and_llm
    plain, _ = overfill_greedy(teacher, student, PROMPT, 8)
    bias = {plain[0]: -100.0, plain[3]: -100.0, 77: 4.0}
    expected, _ = overfill_greedy(teacher, student, PROMPT, 8, edit=lambda i, lg: biased(lg, bias))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logit_bias=bias)
    (out,) = llm.generate(PROMPT, params, mode="overfill")
    assert out.token_ids == expected and expected != plain


def test_min_tokens_through_the_pair_matches_a_masked_reference(pair_and_llm) -> None:
    _, llm, teacher, student = pair_and_llm
    plain, _ = overfill_greedy(teacher, student, PROMPT, 8)
    stop = plain[1]  # without min_tokens the request ends on its second token
    params = SamplingParams(max_tokens=8, temperature=0, stop_token_ids=(stop,))
    assert llm.generate(PROMPT, params)[0].token_ids == plain[:2]

    def mask(i: int, lg: torch.Tensor) -> torch.Tensor:
        return biased(lg, {stop: float("-inf"), EOS: float("-inf")}) if i < 5 else lg

    expected, _ = overfill_greedy(teacher, student, PROMPT, 8, edit=mask)
    ends = [i for i, t in enumerate(expected) if i >= 4 and t in (stop, EOS)]
    expected = expected[: ends[0] + 1] if ends else expected
    (out,) = llm.generate(
        PROMPT, SamplingParams(max_tokens=8, temperature=0, stop_token_ids=(stop,), min_tokens=5)
    )
    assert out.token_ids == expected and len(out.token_ids) >= 5


def test_grpc_options_carry_min_tokens_and_logit_bias_with_the_same_checks() -> None:
    from overfill_serve.serve import grpc_requests
    from overfill_serve.serve.grpc_requests import pb

    options = pb.SamplingOptions(min_tokens=3, max_tokens=8, logit_bias={7: 5.0, 2: -100.0})
    params = grpc_requests.params_from_proto(options)
    assert (params.min_tokens, params.logit_bias) == (3, ((2, -100.0), (7, 5.0)))
    assert grpc_requests.params_from_proto(pb.SamplingOptions()).min_tokens == 0
    for bad, field in [
        (pb.SamplingOptions(min_tokens=20), "min_tokens"),
        (pb.SamplingOptions(logit_bias={1: 101.0}), "logit_bias"),
        (pb.SamplingOptions(logit_bias={-1: 1.0}), "logit_bias"),
        (pb.SamplingOptions(stop_token_ids=[-1]), "stop_token_ids"),
    ]:
        with pytest.raises(InvalidRequestError) as e:
            grpc_requests.params_from_proto(bad)
        assert e.value.field == field
