"""A request's life inside the engines: its tokens, KV blocks, state and timeline.

Lifecycle (every transition stamps `timeline`):
    received → routed → prefilling → kv_in_flight → decoding (⇄ swapped) → finished | aborted | failed
A decode-side preemption either swaps the request's KV out to host memory (`swapped`, back to `decoding`
once blocks free up) or sends it back to `routed` (re-prefill of the prompt on its prefill model, then the
decode model recomputes its own KV for the tokens generated so far); either way no output is lost.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from overfill_serve.errors import InvalidRequestError
from overfill_serve.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch


class Mode(str, enum.Enum):
    """Which model runs which stage: the A/B comparison of the paper on one set of loaded weights."""

    OVERFILL = "overfill"  # teacher prefill -> student decode
    FULL = "full"  # teacher both stages
    PRUNED = "pruned"  # student both stages

    @property
    def models(self) -> tuple[str, str]:
        """The model ("teacher" or "student") that runs the prefill, and the one that runs the decode."""
        return (
            "student" if self is Mode.PRUNED else "teacher",
            "teacher" if self is Mode.FULL else "student",
        )

    @classmethod
    def parse(cls, value: str | Mode) -> Mode:
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise InvalidRequestError(
                f"unknown mode {value!r}; expected one of {names}", field="mode"
            ) from None


class RequestStatus(str, enum.Enum):
    RECEIVED = "received"
    ROUTED = "routed"
    PREFILLING = "prefilling"
    KV_IN_FLIGHT = "kv_in_flight"
    DECODING = "decoding"
    SWAPPED = "swapped"  # preempted, its decode KV in host memory until blocks free up
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"

    @property
    def done(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.ABORTED, RequestStatus.FAILED)


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos, stop token id or stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of the chosen token and, when asked for, the top alternatives; its rank among all
    tokens (1: the most likely) where known."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None


@dataclass(frozen=True)
class Resume:
    """Where a request continues on another worker: the tokens generated so far (a re-prefill computes their
    KV and samples no new first token) and how many characters of their text the client has received
    (held-back text, such as a possible stop-string prefix, is then sent by the new worker; None: all)."""

    token_ids: tuple[int, ...]
    emitted_chars: int | None = None


@dataclass(eq=False)
class Request:
    """Mutable per-request state shared by the schedulers; tensors live in the runners, not here."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    mode: Mode = Mode.OVERFILL
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    # With params.prompt_logprobs: prompt tokens 1, 2, ... scored so far (token 0 has no context to score it).
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    # Prefix caching: the block hashes of its tokens (the prompt's; with its output's where one model computes
    # both) as `hashed_for`, the model that computes their KV, names them; and the prompt tokens whose KV came
    # from the cache rather than being computed for this request.
    block_hashes: list[bytes] = field(default_factory=list)
    hashed_for: str = ""
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Tokens whose KV is in `block_table` (prompt and generated tokens alike).
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.RECEIVED
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    error: str | None = None  # why it failed
    num_preemptions: int = 0
    # A request resumed on another worker: characters of its output text the client has already received
    # (held-back text, such as a possible stop-string prefix, is sent by the new worker). None: all of it.
    emitted_chars: int | None = None
    timeline: dict[str, float] = field(default_factory=dict)
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        self.params.check_prompt(self.num_prompt_tokens)
        self.mark(RequestStatus.RECEIVED)

    def mark(self, status: RequestStatus) -> None:
        self.status = status
        self.stamp(status.value)

    def fail(self, error: BaseException) -> None:
        self.error = f"{type(error).__name__}: {error}"
        self.mark(RequestStatus.FAILED)

    def stamp(self, event: str) -> None:
        """Record the first time `event` happened (a re-prefill keeps the original stamps)."""
        self.timeline.setdefault(event, time.perf_counter())

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def prefill_stop(self) -> int:
        """Where the prefill running now stops: `SamplingParams.prefill_stop`."""
        return self.params.prefill_stop(self.num_computed_tokens, self.num_prompt_tokens)

    @property
    def prompt_continues(self) -> bool:
        """The prompt's KV is computed up to its continuation start only: the decode model computes the rest."""
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.done
