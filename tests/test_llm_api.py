"""The offline API's request-level behaviour: seeds, stops, max_tokens, chat, streaming via step()."""

from __future__ import annotations

import pytest

from overfill_serve import LLM, SamplingParams

PROMPT = list(range(20, 45))


@pytest.fixture(scope="module")
def llm(width_pair):
    return LLM(width_pair.teacher, width_pair.student, num_kv_blocks=128, block_size=4)


def test_seeded_sampling_reproducible(llm):
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    first = llm.generate(PROMPT, params)[0].token_ids
    # Same seed, other requests in the batch: the same tokens.
    noisy = [SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True)] * 3
    batch = llm.generate([PROMPT] * 4, [params, *noisy])
    assert batch[0].token_ids == first
    other = llm.generate(PROMPT, SamplingParams(max_tokens=20, temperature=1.0, seed=99, ignore_eos=True))
    assert other[0].token_ids != first


def test_max_tokens_exact(llm):
    for n in (1, 2, 7, 30):
        out = llm.generate(PROMPT, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0]
        assert len(out.token_ids) == n and out.finish_reason == "length"
    assert llm.core.pool.num_free == llm.core.pool.num_blocks


def test_stop_token_ids(llm):
    greedy = llm.generate(PROMPT, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0].token_ids
    stop_at = greedy[5]
    cut = greedy.index(stop_at)
    out = llm.generate(
        PROMPT, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop_token_ids=[stop_at])
    )[0]
    assert out.token_ids == greedy[: cut + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at


def test_eos_stops_unless_ignored(llm):
    greedy = llm.generate(PROMPT, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0].token_ids
    # Make the fourth greedy token the end of sequence by declaring it an eos id.
    llm.core.output.eos_token_ids = frozenset({greedy[3]})
    try:
        out = llm.generate(PROMPT, SamplingParams(max_tokens=20, temperature=0))[0]
        assert out.token_ids == greedy[: greedy.index(greedy[3]) + 1] and out.finish_reason == "stop"
        out = llm.generate(PROMPT, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
        assert out.token_ids == greedy
    finally:
        llm.core.output.eos_token_ids = frozenset(llm.pair.layout.eos_token_ids)


def test_stop_strings(llm):
    full = llm.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    text = full.text
    # A stop string taken from the middle of the greedy text (spanning tokens is allowed).
    start = len(text) // 2
    stop = text[start : start + 3]
    assert stop.strip(), "random model produced blank text; choose another prompt"
    out = llm.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    assert len(out.token_ids) < len(full.token_ids)
    kept = llm.generate(
        PROMPT,
        SamplingParams(
            max_tokens=24, temperature=0, ignore_eos=True, stop=[stop], include_stop_str_in_output=True
        ),
    )[0]
    assert kept.text == text[: text.index(stop) + len(stop)]


def test_streamed_text_equals_final_text(llm):
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    rid = llm.add_request("The quick brown fox", params)
    pieces, tokens = [], []
    while llm.has_unfinished():
        for out in llm.step():
            assert out.request_id == rid
            pieces.append(out.text)
            tokens += out.token_ids
    assert tokens == llm.generate("The quick brown fox", params)[0].token_ids
    assert "".join(pieces) == llm.tokenizer.decode(tokens, skip_special_tokens=True)


def test_chat_uses_template(llm):
    messages = [{"role": "user", "content": "hello there"}]
    out = llm.chat(messages, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    expected = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert llm.tokenizer.decode(out.prompt_token_ids) == expected
    assert len(out.token_ids) == 4


def test_timings_recorded(llm):
    out = llm.generate(PROMPT, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    m = out.metrics
    assert m.ttft is not None and 0 < m.ttft <= m.e2e and m.tpot is not None and m.tpot > 0
