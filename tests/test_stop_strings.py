"""Stop strings: bounded per request, matched as text streams in (the same result as searching the whole
decoded text after every token), and carried across a migration to another worker."""

from __future__ import annotations

import random

import pytest

from overfill_serve.detokenizer import IncrementalDetokenizer
from overfill_serve.errors import InvalidRequestError
from overfill_serve.model.random_model import make_tokenizer
from overfill_serve.sampling_params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, SamplingParams


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.mark.parametrize(
    "stop, why",
    [
        (["x"] * (MAX_STOP_STRINGS + 1), "at most"),
        (["y" * (MAX_STOP_STRING_CHARS + 1)], "at most"),
        (["ok", ""], "non-empty"),
        (["ok", 7], "non-empty strings"),
    ],
)
def test_stop_strings_are_bounded(stop, why) -> None:
    with pytest.raises(InvalidRequestError, match=why) as e:
        SamplingParams(stop=stop)
    assert e.value.field == "stop"
    SamplingParams(stop=["x"] * MAX_STOP_STRINGS)  # the limits themselves are allowed
    SamplingParams(stop=["y" * MAX_STOP_STRING_CHARS])


def reference(tokenizer, ids: list[int], stops: list[str], include: bool) -> tuple[str, str | None]:
    """Brute force: after each token, search the whole final text decoded so far; the first token whose text
    holds a stop string ends the output at the match that starts first (the earlier stop string on a tie)."""
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k], clean_up_tokenization_spaces=False).rstrip("\ufffd")
        found = [(text.find(s), i, s) for i, s in enumerate(stops) if s in text]
        if found:
            at, _, stop = min(found)
            return text[: at + len(stop) if include else at], stop
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False), None


def run(tokenizer, ids: list[int], params: SamplingParams) -> tuple[list[str], str | None]:
    detok = IncrementalDetokenizer(tokenizer, [], params)
    deltas: list[str] = []
    for token in ids:
        step = detok.step(token)
        deltas.append(step.delta)
        if step.stop_string is not None:
            return deltas, step.stop_string
    return [*deltas, detok.finish()], None


@pytest.mark.parametrize("include", [False, True])
def test_streamed_stops_equal_a_whole_text_search(tokenizer, include: bool) -> None:
    # A two-letter alphabet makes overlapping, repeated and nested partial matches common.
    rng = random.Random(7)
    for _ in range(150):
        text = "".join(rng.choice("ab ") for _ in range(60))
        stops = [
            "".join(rng.choice("ab ") for _ in range(rng.randint(1, 7))) for _ in range(rng.randint(1, 4))
        ]
        ids = tokenizer.encode(text)
        deltas, stop = run(tokenizer, ids, SamplingParams(stop=stops, include_stop_str_in_output=include))
        assert ("".join(deltas), stop) == reference(tokenizer, ids, stops, include), (text, stops)


def test_a_stop_prefix_is_never_streamed_before_it_is_decided(tokenizer) -> None:
    ids = tokenizer.encode("one two three four")
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["three fou", "two thx"]))
    streamed = ""
    for token in ids:
        step = detok.step(token)
        streamed += step.delta
        assert "one two three four".startswith(streamed)
        assert not streamed.endswith(("t", "th", "thr", "three", "two", "two t"))  # held while undecided
        if step.stop_string:
            break
    assert streamed == "one two " and step.stop_string == "three fou"


def migrate(tokenizer, prompt: list[int], ids: list[int], cut: int, params: SamplingParams):
    """Stream ids[:cut] on one detokenizer, then resume on a new one told what the client received."""
    first = IncrementalDetokenizer(tokenizer, prompt, params)
    sent = ""
    for token in ids[:cut]:
        step = first.step(token)
        sent += step.delta
        if step.stop_string is not None:  # it ended before the cut: nothing to migrate
            return sent, step.stop_string
    resumed = IncrementalDetokenizer(tokenizer, prompt, params, ids[:cut], emitted_chars=len(sent))
    for token in ids[cut:]:
        step = resumed.step(token)
        sent += step.delta
        if step.stop_string is not None:
            return sent, step.stop_string
    return sent + resumed.finish(), None


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("stop", ["jumps over", "the lazy cat"])  # found; held back, then released
def test_resume_sends_the_held_back_text_and_finds_a_stop_across_the_cut(tokenizer, include, stop) -> None:
    text = "The quick brown fox jumps over the lazy dog, twice: the quick brown fox."
    ids, prompt = tokenizer.encode(text), tokenizer.encode("Say it:")
    params = SamplingParams(stop=[stop], include_stop_str_in_output=include)
    whole = run(tokenizer, ids, params)
    assert whole[1] == (stop if stop in text else None)
    for cut in range(1, len(ids)):
        assert migrate(tokenizer, prompt, ids, cut, params) == ("".join(whole[0]), whole[1]), cut


def test_resume_without_stops_equals_an_unbroken_stream(tokenizer) -> None:
    rng = random.Random(3)
    ids = [rng.randrange(3, len(tokenizer)) for _ in range(120)]  # mid-character cuts included
    whole = "".join(run(tokenizer, ids, SamplingParams())[0])
    for cut in (1, 2, 17, 33, 60, 119):
        assert migrate(tokenizer, [5, 6], ids, cut, SamplingParams()) == (whole, None), cut
