"""`Batch`: one engine step's input, built by a scheduler (plain Python) and consumed by a runner (tensors)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScheduledSeq:
    """One request's share of a step: `token_ids` are new tokens at positions start, start+1, …"""

    request_id: str
    token_ids: tuple[int, ...]
    start: int
    block_table: tuple[int, ...]
    needs_logits: bool  # sample after this step (a prompt's last chunk, or a decode step)
    all_logits: bool = False  # a logits row for every token (prompt logprobs), not only for the last

    @property
    def num_logits(self) -> int:
        """Logits rows this sequence gets: the last of them is the sampling row when `needs_logits`."""
        return len(self.token_ids) if self.all_logits else int(self.needs_logits)

    @property
    def context_len(self) -> int:
        return self.start + len(self.token_ids)


@dataclass(frozen=True)
class Batch:
    seqs: tuple[ScheduledSeq, ...]

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    @property
    def sampled(self) -> tuple[ScheduledSeq, ...]:
        """The sequences that sample, in row order."""
        return tuple(s for s in self.seqs if s.needs_logits)

    def __bool__(self) -> bool:
        return bool(self.seqs)
