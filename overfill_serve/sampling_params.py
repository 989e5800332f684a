"""Per-request sampling and stopping parameters (the OpenAI / vLLM vocabulary)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from overfill_serve.errors import InvalidRequestError

FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)
# Stop strings are matched on the engine thread for every generated token: bound what one request may ask for.
MAX_STOP_STRINGS = 32
MAX_STOP_STRING_CHARS = 256
MAX_LOGPROBS = 20  # alternatives per token, as vLLM bounds them
# logit_bias as OpenAI bounds it: at most 300 tokens, each biased by a value in [-100, 100].
MAX_LOGIT_BIAS = 300
LOGIT_BIAS_RANGE = 100.0


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops. Validated on construction.

        temperature 0 means greedy. top_k 0 or -1 disables top-k. logprobs=None returns no log-probabilities;
        logprobs=k returns the chosen token's log-probability plus the k most likely alternatives.
        min_tokens: until that many tokens are generated, eos and the stop token ids are never sampled and stop
        strings do not end the request. logit_bias: (token id, bias) pairs added to the logits before sampling
        (a mapping is accepted and stored sorted).

        Scoring: prompt_logprobs=k returns the log-probability of every prompt token after the first (with the k
        most likely alternatives); max_tokens=0 then scores without generating (without prompt_logprobs it is an
    error: there would be nothing to return). continuation_start=c is the
        OverFill split for scoring a continuation: the prefill model (the teacher) computes the prompt up to token
        c and scores tokens 1..c, the decode model (the student) computes and scores the rest on that KV, as
        OverFill generates them. Without it the prefill model computes (and scores) the whole prompt.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    prompt_logprobs: int | None = None
    continuation_start: int | None = None

    def __post_init__(self) -> None:
        # Tuples keep the dataclass hashable; lists (or one string) given by callers are converted.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple((t, b) for t, b in bias))
        self._validate()
        object.__setattr__(self, "logit_bias", tuple(sorted(self.logit_bias)))  # one spelling per bias

    def _validate(self) -> None:
        def bad(name: str, why: str) -> InvalidRequestError:
            return InvalidRequestError(f"{name} {why}, got {getattr(self, name)!r}", field=name)

        for name in FLOAT_FIELDS:  # NaN passes every comparison below
            if not math.isfinite(getattr(self, name)):
                raise bad(name, "must be a finite number")
        if not isinstance(self.max_tokens, int) or self.max_tokens < (self.prompt_logprobs is None):
            raise bad(
                "max_tokens", "must be a positive integer (0 only to score the prompt: with prompt_logprobs)"
            )
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k < -1:
            raise bad("top_k", "must be -1, 0 (disabled) or positive")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) <= MAX_LOGPROBS:
                raise bad(name, f"must be in [0, {MAX_LOGPROBS}]")
        if self.continuation_start is not None and self.continuation_start < 1:
            raise bad(
                "continuation_start", "must be a token index >= 1 (the teacher computes the token before it)"
            )
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", f"must be an integer in [0, max_tokens={self.max_tokens}]")
        if any(t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be token ids (>= 0)")
        self._validate_stop()
        self._validate_logit_bias()

    def _validate_stop(self) -> None:
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(
                f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed", field="stop"
            )
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError(f"stop strings must be non-empty strings, got {s!r}", field="stop")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise InvalidRequestError(
                    f"a stop string has {len(s)} characters; at most {MAX_STOP_STRING_CHARS} are allowed",
                    field="stop",
                )

    def _validate_logit_bias(self) -> None:
        def bad(why: str) -> InvalidRequestError:
            return InvalidRequestError(f"logit_bias {why}", field="logit_bias")

        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise bad(f"has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS} are allowed")
        ids = [t for t, _ in self.logit_bias]
        if len(set(ids)) != len(ids):
            raise bad("names a token id twice")
        for token, bias in self.logit_bias:
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise bad(f"keys must be token ids (>= 0), got {token!r}")
            if not (isinstance(bias, (int, float)) and math.isfinite(bias)) or abs(bias) > LOGIT_BIAS_RANGE:
                raise bad(f"values must be numbers in [-100, 100], got {bias!r} for token {token}")

    def check_prompt(self, num_prompt_tokens: int) -> None:
        """The parameters that depend on the prompt's length: `InvalidRequestError` if they do not fit it."""
        if self.continuation_start is not None and self.continuation_start > num_prompt_tokens:
            raise InvalidRequestError(
                f"continuation_start {self.continuation_start} is past the prompt's {num_prompt_tokens} tokens",
                field="continuation_start",
            )

    def prefill_stop(self, num_computed_tokens: int, num_prompt_tokens: int) -> int:
        """Where the prefill that has computed `num_computed_tokens` stops: at the continuation start (the
        prefill model hands the prompt over to the decode model there) until that is reached, then at the
        end of the prompt."""
        split = self.continuation_start
        return split if split is not None and num_computed_tokens < split else num_prompt_tokens

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
