"""`WorkerStats`: one worker's load, as the replica router, the autoscaler and the metrics read it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class WorkerStats:
    free_blocks: int
    total_blocks: int
    waiting: int  # requests queued for a batch, swapped-out ones included
    running: int  # requests in the running batches
    swapped: int  # preempted requests whose KV waits in host memory (also counted in `waiting`)
    queued_prompt_tokens: int  # prompt tokens not prefilled yet
    finished: int  # requests this worker ran to the end
    tpot_s: float  # recent time between decode steps (0 when idle)
    ttft_s: float = 0.0  # prefill workers: recent submit -> first token and KV ready
    prefilled: int = 0  # prefill workers: prefills handed over to decode workers
    open_transfers: int = 0  # prefill workers: KV offered and not yet released
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache, since the worker started
    prefix_hits: int = 0  # ... and found there
    prefill_tokens: int = 0  # prompt tokens the prefill engines computed, since the worker started
    block_size: int = 0  # tokens per KV block

    @property
    def num_requests(self) -> int:
        return self.waiting + self.running

    @property
    def kv_utilization(self) -> float:
        return 1.0 - self.free_blocks / self.total_blocks

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerStats:
        """From `to_dict`'s output, extra keys ignored (a replica adds where it runs)."""
        return cls(**{f.name: data[f.name] for f in fields(cls)})
