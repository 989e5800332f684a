"""Incremental detokenization for streaming, with stop strings.

Byte-level BPE (and byte-fallback) tokens can end in the middle of a UTF-8 character, and many tokenizers
decode a token differently depending on what precedes it (leading spaces). So instead of decoding tokens one
by one we re-decode a short window of recent token ids each step and emit only the part of it that is new and
final. A decoded string that ends in U+FFFD may be an incomplete character that the next token completes, so
the trailing replacement characters are held back until something else follows them (or the stream ends).

Stop strings are matched as text streams in (`StopMatcher`): a step costs the same at token 10 and at token
10,000. A request resumed on another worker after a migration is told how much of its text the client already
has, so text held back there (a possible stop-string prefix) is sent here and a stop string spanning the
migration is still found.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from overfill_serve.sampling_params import SamplingParams

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded in front of the output, so the first output token is spelt as in a full decode.
_PROMPT_CONTEXT = 5
# An incomplete UTF-8 character has at most 3 bytes; a byte-fallback decoder may render each as one U+FFFD.
# Anything before the last 3 trailing U+FFFD is final (a genuinely invalid byte the model produced).
_MAX_PENDING = 3
# The window is re-decoded every step; once it grows past _MAX_WINDOW tokens it is cut to _KEEP_WINDOW. The
# kept tokens cover any pending characters (<= 3, each at most 3 tokens), so the cut never splits them.
_MAX_WINDOW = 32
_KEEP_WINDOW = 16


@dataclass(frozen=True)
class DetokenizeStep:
    delta: str  # new text safe to stream to a client now
    stop_string: str | None  # the stop string that matched (the request must finish with reason "stop")


@functools.lru_cache(maxsize=4096)  # the same stop strings come back request after request
def _failure(stop: str) -> tuple[int, ...]:
    """fail[i]: the length of the longest proper prefix of stop[: i + 1] that is also its suffix."""
    fail = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = fail[k - 1]
        if stop[i] == stop[k]:
            k += 1
        fail[i] = k
    return tuple(fail)


class StopMatcher:
    """Finds stop strings in streamed text with one Knuth-Morris-Pratt automaton per string, whose state is the
    longest prefix of that string the text ends with. A new character costs O(1) amortized per stop string,
    whatever the length of the text so far; the largest state is how much of the text's end may still grow
    into a stop string (what a streaming client must not see yet)."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        assert all(stops), "stop strings are non-empty (SamplingParams checks)"
        self.stops = stops
        self._fail = [_failure(s) for s in stops]
        self._state = [0] * len(stops)

    @property
    def held(self) -> int:
        """Length of the longest suffix of the text so far that some stop string starts with."""
        return max(self._state, default=0)

    def feed(self, new: str) -> tuple[int, str] | None:
        """Advance over `new`. Of the matches ending inside `new`, the one that starts first (the earlier stop
        string on a tie), as (its start relative to the start of `new`, negative when it began before, the
        stop string); None when no stop string ends inside `new`."""
        best: tuple[int, str] | None = None
        for index, stop in enumerate(self.stops):
            k = self._state[index]
            if k == 0 and stop[0] not in new:
                continue  # the common case: nothing pending and nothing that could begin a match
            fail, first_end = self._fail[index], -1
            for i, c in enumerate(new):
                while k and stop[k] != c:
                    k = fail[k - 1]
                if stop[k] == c:
                    k += 1
                if k == len(stop):
                    first_end = i if first_end < 0 else first_end
                    k = fail[k - 1]
            self._state[index] = k
            start = first_end + 1 - len(stop)
            if first_end >= 0 and (best is None or start < best[0]):
                best = (start, stop)
        return best


class IncrementalDetokenizer:
    """Turns one request's generated token ids into streamed text deltas.

    Invariant: the concatenation of every `step().delta` and `finish()` equals `text`, which equals the
    tokenizer's decode of the output tokens unless a stop string truncated it. `tokenizer` is any transformers
    tokenizer (only `decode(ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)` is used).

    A request resumed on another worker passes the tokens it generated so far (`output_token_ids`) and how
    many characters of their text the client has received (`emitted_chars`; None: all of it): the rest is
    sent with the next delta, and stop strings are matched across the boundary.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        output_token_ids: Sequence[int] = (),
        emitted_chars: int | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = params.skip_special_tokens
        self._matcher = StopMatcher(params.stop) if params.stop else None
        self._include_stop = params.include_stop_str_in_output
        # Stop strings end the request only once min_tokens are generated (a match before is ignored).
        self._min_tokens, self._generated = params.min_tokens, len(output_token_ids)
        # The decode window: ids[_start:] is re-decoded each step; its first `_consumed` characters are
        # already accounted for (prompt context, or output appended to the text).
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._start = 0
        context = self._decode(self._ids)
        # Trailing U+FFFD are bytes of a character not finished yet (a request resumed mid-character on
        # another worker after a preemption or migration): they are emitted once the character completes.
        pending = len(context) - len(context.rstrip(_REPLACEMENT))
        self._consumed = len(context) - min(pending, _MAX_PENDING)
        self._sent = io.StringIO()  # the text already returned to the caller (appends are amortized O(1))
        self._unsent = ""  # the text after it: at most a possible stop-string prefix between steps
        self.stop_string: str | None = None  # the stop string that ended the stream, if any
        self._finished = False
        if output_token_ids:
            self._resume(list(output_token_ids), emitted_chars)

    @property
    def text(self) -> str:
        """The full output text so far, after stop-string truncation."""
        return self._sent.getvalue() + self._unsent

    @property
    def stopped(self) -> bool:
        return self.stop_string is not None

    def step(self, token_id: int) -> DetokenizeStep:
        """Add one generated token. After a stop string (or finish()) further tokens are ignored."""
        if self._finished or self.stopped:
            return DetokenizeStep("", None)
        self._ids.append(token_id)
        self._generated += 1
        window = self._decode(self._ids[self._start :])
        trailing = len(window) - len(window.rstrip(_REPLACEMENT))
        end = len(window) - min(trailing, _MAX_PENDING)
        if end > self._consumed:
            new = window[self._consumed : end]
            self._consumed = end
            stop = self._append(new)
            if stop is not None:
                return DetokenizeStep(self._release(len(self._unsent)), stop)
        if len(self._ids) - self._start > _MAX_WINDOW:
            self._shrink_window(len(window))
        held = self._matcher.held if self._matcher is not None else 0
        return DetokenizeStep(self._release(len(self._unsent) - held), None)

    def finish(self) -> str:
        """End of stream: return whatever was held back (a partial character, a stop-string prefix)."""
        if self._finished:
            return ""
        self._finished = True
        if not self.stopped:
            window = self._decode(self._ids[self._start :])
            if len(window) > self._consumed:
                self._append(window[self._consumed :])
                self._consumed = len(window)
        return self._release(len(self._unsent))

    def _resume(self, output_token_ids: list[int], emitted_chars: int | None) -> None:
        """Take over the output so far: its final text, of which the client has `emitted_chars`."""
        self._ids += output_token_ids
        window = self._decode(self._ids)
        trailing = len(window) - len(window.rstrip(_REPLACEMENT))
        end = max(len(window) - min(trailing, _MAX_PENDING), self._consumed)
        so_far = window[self._consumed : end]
        self._consumed = end
        sent = len(so_far) if emitted_chars is None else min(emitted_chars, len(so_far))
        self._sent.write(so_far[:sent])
        self._unsent = so_far[sent:]
        if self._matcher is not None:  # its state depends only on the last len(stop) - 1 characters
            self._matcher.feed(so_far[-max(len(s) for s in self._matcher.stops) :])
        if len(self._ids) > _MAX_WINDOW:
            self._shrink_window(len(window))

    def _decode(self, ids: list[int]) -> str:
        # Cleanup of tokenization spaces is not prefix-stable (it looks at the next character), so it is off.
        text: str = self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False
        )
        return text

    def _shrink_window(self, window_len: int) -> None:
        # The pending (not yet consumed) characters are a suffix produced by the last few tokens; re-decoding
        # a shorter window reproduces that suffix, so the consumed count is re-derived from its length.
        pending = window_len - self._consumed
        self._start = len(self._ids) - _KEEP_WINDOW
        self._consumed = len(self._decode(self._ids[self._start :])) - pending

    def _append(self, new: str) -> str | None:
        """Append decoded text, and truncate it at the first stop string the new text completes."""
        self._unsent += new
        found = self._matcher.feed(new) if self._matcher is not None else None
        if found is None or self._generated < self._min_tokens:
            return None
        start, stop = found
        # A match begins inside the held-back text (it was a stop-string prefix); only a resume that was not
        # told what the client received (emitted_chars=None) can have sent its beginning already.
        at = max(0, len(self._unsent) - len(new) + start)
        self._unsent = self._unsent[: at + len(stop) if self._include_stop else at]
        self.stop_string = stop
        return stop

    def _release(self, upto: int) -> str:
        """Send the first `upto` characters of the unsent text."""
        if upto <= 0:
            return ""
        delta, self._unsent = self._unsent[:upto], self._unsent[upto:]
        self._sent.write(delta)
        return delta
