"""Incremental detokenization for streaming, with stop strings.

Byte-level BPE (and byte-fallback) tokens can end in the middle of a UTF-8 character, and many tokenizers
decode a token differently depending on what precedes it (leading spaces). So instead of decoding tokens one
by one we re-decode a short window of recent token ids each step and emit only the part of it that is new and
final. A decoded string that ends in U+FFFD may be an incomplete character that the next token completes, so
the trailing replacement characters are held back until something else follows them (or the stream ends).
"""

from __future__ import annotations

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


class IncrementalDetokenizer:
    """Turns one request's generated token ids into streamed text deltas.

    Invariant: the concatenation of every `step().delta` and `finish()` equals `text`, which equals the
    tokenizer's decode of the output tokens unless a stop string truncated it. `tokenizer` is any transformers
    tokenizer (only `decode(ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)` is used).
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._tokenizer = tokenizer
        self._skip_special = params.skip_special_tokens
        self._stops = params.stop
        self._max_stop = max((len(s) for s in params.stop), default=0)
        self._include_stop = params.include_stop_str_in_output
        # The decode window: ids[_start:] is re-decoded each step; its first `_consumed` characters are
        # already accounted for (prompt context, or output appended to `text`).
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._start = 0
        context = self._decode(self._ids)
        # Trailing U+FFFD are bytes of a character not finished yet (a request resumed mid-character on
        # another worker after a preemption or migration): they are emitted once the character completes.
        pending = len(context) - len(context.rstrip(_REPLACEMENT))
        self._consumed = len(context) - min(pending, _MAX_PENDING)
        self.text = ""  # full output text so far, after stop-string truncation
        self._sent = 0  # characters of `text` already returned to the caller
        self.stop_string: str | None = None  # the stop string that ended the stream, if any
        self._finished = False

    @property
    def stopped(self) -> bool:
        return self.stop_string is not None

    def step(self, token_id: int) -> DetokenizeStep:
        """Add one generated token. After a stop string (or finish()) further tokens are ignored."""
        if self._finished or self.stopped:
            return DetokenizeStep("", None)
        self._ids.append(token_id)
        window = self._decode(self._ids[self._start :])
        trailing = len(window) - len(window.rstrip(_REPLACEMENT))
        end = len(window) - min(trailing, _MAX_PENDING)
        if end > self._consumed:
            new = window[self._consumed : end]
            self._consumed = end
            stop = self._append(new)
            if stop is not None:
                return DetokenizeStep(self._release(len(self.text)), stop)
        if len(self._ids) - self._start > _MAX_WINDOW:
            self._shrink_window(len(window))
        return DetokenizeStep(self._release(len(self.text) - self._held_stop_prefix()), None)

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
        return self._release(len(self.text))

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
        old_len = len(self.text)
        self.text += new
        if not self._stops:
            return None
        # A match must end inside `new`, so it starts at most max_stop - 1 characters before it.
        begin = max(0, old_len - self._max_stop + 1)
        best: tuple[int, str] | None = None
        for stop in self._stops:
            at = self.text.find(stop, begin)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return None
        at, stop = best
        self.text = self.text[: at + len(stop) if self._include_stop else at]
        self.stop_string = stop
        return stop

    def _held_stop_prefix(self) -> int:
        """Length of the longest suffix of `text` that some stop string starts with (it may yet complete)."""
        for n in range(min(self._max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(stop.startswith(tail) for stop in self._stops):
                return n
        return 0

    def _release(self, upto: int) -> str:
        if upto <= self._sent:
            return ""
        delta = self.text[self._sent : upto]
        self._sent = upto
        return delta
