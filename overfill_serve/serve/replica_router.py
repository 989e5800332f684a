"""Which replica gets a request: prefill replicas by the prompt work they would have (queued prompt tokens, less
what their prefix cache likely holds of this prompt), decode replicas by free KV blocks and the requests they
hold. The ranking is pure (`rank_replicas`); `OverfillRequestRouter` plugs it into Ray Serve's request-router
interface, reading the `WorkerStats` each replica reports through `record_routing_stats`.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from overfill_serve.kv.block_hash import block_hashes
from overfill_serve.sampling_params import SamplingParams
from overfill_serve.worker.worker_stats import WorkerStats

AFFINITY_BLOCKS = 1 << 18  # block hashes a router remembers (16 B each, and the replica id)


def load_score(role: str, stats: WorkerStats | None, cached_tokens: int = 0) -> tuple[float, ...]:
    """Lower is better. Replicas that have not reported yet rank after every replica that has. A prefill
    replica's work is its queued prompt tokens plus this prompt's, less what its cache likely holds of it: a
    hot prefix goes where it is cached until that replica's queue outweighs the saving."""
    if stats is None:
        return (1.0, 0.0, 0.0)
    if role == "prefill":
        return (0.0, float(stats.queued_prompt_tokens - cached_tokens), float(stats.waiting))
    return (0.0, -stats.free_blocks / stats.total_blocks, float(stats.num_requests))


def rank_replicas(
    role: str, stats: Sequence[WorkerStats | None], cached_tokens: Sequence[int] | None = None
) -> list[int]:
    """Indices of the replicas, best first. Ties break at random: stats refresh once a second, and equal
    replicas (a fresh one and an idle one) must share the requests that arrive in between, not herd."""
    cached = cached_tokens or [0] * len(stats)
    keys = [(load_score(role, s, c), random.random()) for s, c in zip(stats, cached)]
    return sorted(range(len(stats)), key=keys.__getitem__)


class PrefixAffinity:
    """Which prefill replica was last sent each prompt block (by its `block_hash`, as the teacher's prefill
    names it): the replica whose prefix cache most likely holds it. Bounded: the blocks routed longest ago
    are forgotten first."""

    def __init__(self, block_size: int, model: str = "teacher", capacity: int = AFFINITY_BLOCKS) -> None:
        self.block_size, self.model, self.capacity = block_size, model, capacity
        self._owner: OrderedDict[bytes, str] = OrderedDict()

    def hashes(self, prompt: Sequence[int]) -> list[bytes]:
        return block_hashes(prompt, self.block_size, self.model)

    def cached_tokens(self, hashes: Sequence[bytes], replica: str) -> int:
        """Tokens of the longest prefix of the prompt last routed to `replica`."""
        n = 0
        while n < len(hashes) and self._owner.get(hashes[n]) == replica:
            n += 1
        return n * self.block_size

    def record(self, hashes: Sequence[bytes], replica: str) -> None:
        for h in hashes:
            self._owner[h] = replica
            self._owner.move_to_end(h)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)


class OverfillRequestRouter(RequestRouter):
    """Set `request_router_kwargs: {role: prefill|decode}` in the deployment's request_router_config; a prefill
    pool with prefix caching also names its `block_size`."""

    def initialize_state(self, role: str = "decode", block_size: int | None = None, **kwargs: Any) -> None:
        self.role = role
        self.affinity = PrefixAffinity(block_size) if role == "prefill" and block_size else None

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        reported = [
            WorkerStats.from_dict(r.routing_stats) if r.routing_stats else None for r in candidate_replicas
        ]
        ids = [r.replica_id.unique_id for r in candidate_replicas]
        hashes = self._prompt_hashes(pending_request)
        affinity = self.affinity
        cached = [affinity.cached_tokens(hashes, i) for i in ids] if affinity and hashes else None
        order = rank_replicas(self.role, reported, cached)
        if affinity and hashes:
            affinity.record(hashes, ids[order[0]])
        # Best first; the rest as a fallback rank in case the best one is at capacity.
        ranked = [candidate_replicas[i] for i in order]
        return [ranked[:1], ranked[1:]] if len(ranked) > 1 else [ranked]

    def _prompt_hashes(self, pending: PendingRequest | None) -> list[bytes]:
        """The block hashes of a prefill request's prompt (`submit` / `generate` take the prompt's token ids
        and the sampling params first), when the replica's cache could serve it."""
        if self.affinity is None or pending is None or len(pending.args) < 2:
            return []
        prompt, params = pending.args[0], pending.args[1]
        if not isinstance(prompt, list) or not isinstance(params, SamplingParams):
            return []
        if params.continuation_start is not None or params.prompt_logprobs is not None:
            return []  # computed in full whatever is cached
        return self.affinity.hashes(prompt)


def request_router_config(role: str, block_size: int | None = None) -> RequestRouterConfig:
    """Route a deployment's requests with `OverfillRequestRouter`, stats refreshed every second; a prefill
    pool whose replicas cache prefixes passes its `block_size` (prefix affinity)."""
    kwargs: dict[str, Any] = {"role": role} | ({"block_size": block_size} if block_size else {})
    settings: dict[str, Any] = {
        "request_router_class": f"{__name__}:OverfillRequestRouter",
        "request_router_kwargs": kwargs,
        "request_routing_stats_period_s": 1.0,
        "request_routing_stats_timeout_s": 5.0,
    }
    return RequestRouterConfig(**settings)
