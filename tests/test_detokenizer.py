"""Incremental detokenization against a real byte-level BPE tokenizer trained here (no downloads)."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from overfill_serve.detokenizer import IncrementalDetokenizer
from overfill_serve.sampling_params import SamplingParams

MULTIBYTE = [
    "héllo wörld 日本語 😀",
    "naïve café — déjà vu: 東京タワー, 서울, Привет мир! 🎉🚀 ñandú",
    "emoji run 😀😃😄😁 and CJK 漢字かなカナ mixed with ascii",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))[:200_000]
    corpus = [text[i : i + 4096] for i in range(0, len(text), 4096)] + MULTIBYTE * 50
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", additional_special_tokens=["<|im_end|>"]
    )


def stream(
    tokenizer, ids: list[int], prompt: list[int] | None = None, **params
) -> tuple[list[str], str, str]:
    """(deltas from step(), finish() output, text); stops feeding tokens once a stop string fires."""
    detok = IncrementalDetokenizer(tokenizer, prompt or [], SamplingParams(**params))
    deltas = []
    for token in ids:
        step = detok.step(token)
        deltas.append(step.delta)
        if step.stop_string is not None:
            break
    return deltas, detok.finish(), detok.text


def test_multibyte_tokens_split_characters(tokenizer) -> None:
    # The premise of the other tests: some tokens end in the middle of a UTF-8 character.
    ids = tokenizer.encode(MULTIBYTE[1])
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)


@pytest.mark.parametrize("text", [*MULTIBYTE, "plain ascii: def f(x):\n    return x + 1\n"])
@pytest.mark.parametrize("prompt", ["", "Translate this, please:", "日本"])
def test_deltas_concatenate_to_the_full_decode(tokenizer, text: str, prompt: str) -> None:
    ids = tokenizer.encode(text)
    deltas, tail, full = stream(tokenizer, ids, tokenizer.encode(prompt))
    assert "".join(deltas) + tail == full == tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_long_random_token_stream_matches_full_decode(tokenizer) -> None:
    # Random ids include lone continuation bytes (genuine U+FFFD in the decode) and run past the window cut.
    rng = random.Random(0)
    for _ in range(5):
        ids = [rng.randrange(len(tokenizer)) for _ in range(400)]
        for skip in (True, False):
            deltas, tail, full = stream(tokenizer, ids, tokenizer.encode("Hi."), skip_special_tokens=skip)
            assert "".join(deltas) + tail == full == tokenizer.decode(ids, skip_special_tokens=skip)


def test_partial_character_is_held_until_completed(tokenizer) -> None:
    ids = tokenizer.encode("a😀")
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    deltas = [detok.step(t).delta for t in ids]
    assert deltas[-1].endswith("😀") and "".join(deltas) == "a😀"
    assert detok.finish() == ""


def test_unfinished_character_is_flushed_by_finish(tokenizer) -> None:
    emoji = [t for t in tokenizer.encode("😀")]
    assert len(emoji) > 1
    deltas, tail, full = stream(tokenizer, tokenizer.encode("ok ") + emoji[:-1])
    assert "".join(deltas) == "ok "
    assert tail == full[len("ok ") :] and tail.endswith("\ufffd")


def test_stop_string_spanning_tokens_truncates_and_is_reported(tokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog"
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=("fox jumps",)))
    deltas, stop = [], None
    for t in ids:
        step = detok.step(t)
        deltas.append(step.delta)
        if step.stop_string is not None:
            stop = step.stop_string
            break
    assert stop == "fox jumps"
    assert "".join(deltas) == detok.text == "The quick brown "
    assert detok.finish() == ""
    assert detok.step(ids[-1]).delta == ""  # tokens after the stop are ignored


def test_include_stop_str_in_output(tokenizer) -> None:
    text = "alpha beta gamma delta"
    deltas, tail, full = stream(
        tokenizer, tokenizer.encode(text), stop=["gamma"], include_stop_str_in_output=True
    )
    assert "".join(deltas) + tail == full == "alpha beta gamma"


def test_earliest_of_several_stop_strings_wins(tokenizer) -> None:
    deltas, tail, full = stream(tokenizer, tokenizer.encode("one two three four"), stop=["four", "two t"])
    assert "".join(deltas) + tail == full == "one "


def test_multibyte_stop_string(tokenizer) -> None:
    deltas, tail, full = stream(tokenizer, tokenizer.encode(MULTIBYTE[0]), stop=["本語"])
    assert "".join(deltas) + tail == full == "héllo wörld 日"


def test_stop_string_prefix_is_held_back_and_released_by_finish(tokenizer) -> None:
    ids = tokenizer.encode("hello wor")
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=("world!",)))
    streamed = "".join(detok.step(t).delta for t in ids)
    assert streamed == "hello "  # a client never sees the start of a stop string that may complete
    assert detok.text == "hello wor"
    assert detok.finish() == "wor"
    assert detok.stop_string is None


def test_held_prefix_is_released_when_the_text_diverges(tokenizer) -> None:
    deltas, tail, full = stream(tokenizer, tokenizer.encode("a world apart"), stop=["world!"])
    assert full == "a world apart" and "".join(deltas) + tail == full
    assert "".join(deltas).startswith("a world ")


def test_skip_special_tokens(tokenizer) -> None:
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer.encode("first part") + [end] + tokenizer.encode(" second")
    skipped = stream(tokenizer, ids)
    assert "".join(skipped[0]) + skipped[1] == skipped[2] == "first part second"
    kept = stream(tokenizer, ids, skip_special_tokens=False)
    assert "".join(kept[0]) + kept[1] == kept[2] == "first part<|im_end|> second"


def test_stop_string_across_special_token_boundary(tokenizer) -> None:
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer.encode("answer") + [end] + tokenizer.encode("more")
    _, _, full = stream(tokenizer, ids, skip_special_tokens=False, stop=["<|im_end|>"])
    assert full == "answer"


def test_resumed_mid_character_emits_the_held_back_bytes(tokenizer) -> None:
    """A request resumed on another worker (preemption, migration) after tokens that end inside a character:
    the first worker never streamed those bytes, so the new detokenizer must emit the whole character."""
    emoji = tokenizer.encode("😀")
    ids = tokenizer.encode("ok ") + emoji + tokenizer.encode(" done")
    cut = len(ids) - len(tokenizer.encode(" done")) - 1  # after all but the emoji's last token
    assert tokenizer.decode(ids[:cut]).endswith("\ufffd")
    first, _, _ = stream(tokenizer, ids[:cut])  # the first worker: stops mid-character, holds it back
    resumed = IncrementalDetokenizer(tokenizer, ids[:cut], SamplingParams())  # context: everything so far
    rest = [resumed.step(t).delta for t in ids[cut:]] + [resumed.finish()]
    assert "".join(first) + "".join(rest) == "ok 😀 done"
