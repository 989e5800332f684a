"""Which replica gets a request: prefill replicas by the prompt work they would have (queued prompt tokens, less
what their prefix cache likely holds of this prompt), decode replicas by free KV blocks (plus the blocks of
this request's prompt their prefix cache likely holds) and the requests they hold. The ranking is pure
(`rank_replicas`); `OverfillRequestRouter` plugs it into Ray Serve's request-router interface, reading the
`WorkerStats` each replica reports through `record_routing_stats`.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from overfill_serve.engine.config import EngineConfig
from overfill_serve.kv.block_hash import block_hashes
from overfill_serve.sampling_params import SamplingParams
from overfill_serve.worker.prefill_worker import TransferTicket
from overfill_serve.worker.worker_stats import WorkerStats

AFFINITY_BLOCKS = 1 << 18  # block hashes a router remembers (16 B each, and the replica id)


def load_score(role: str, stats: WorkerStats | None, cached_blocks: int = 0) -> tuple[float, ...]:
    """Lower is better. Replicas that have not reported yet rank after every replica that has. A prefill
    replica's work is its queued prompt tokens plus this prompt's, less what its cache likely holds of it: a
    hot prefix goes where it is cached until that replica's queue outweighs the saving. A decode replica's
    room is its free blocks plus the cached ones this request would share (it needs no new blocks for those,
    and they need not travel), so the prefix wins until another replica has that much more free KV."""
    if stats is None:
        return (1.0, 0.0, 0.0)
    if role == "prefill":
        work = stats.queued_prompt_tokens - cached_blocks * stats.block_size
        return (0.0, float(work), float(stats.waiting))
    return (0.0, -(stats.free_blocks + cached_blocks) / stats.total_blocks, float(stats.num_requests))


def rank_replicas(
    role: str, stats: Sequence[WorkerStats | None], cached_blocks: Sequence[int] | None = None
) -> list[int]:
    """Indices of the replicas, best first. Ties break at random: stats refresh once a second, and equal
    replicas (a fresh one and an idle one) must share the requests that arrive in between, not herd."""
    cached = cached_blocks or [0] * len(stats)
    keys = [(load_score(role, s, c), random.random()) for s, c in zip(stats, cached)]
    return sorted(range(len(stats)), key=keys.__getitem__)


class PrefixAffinity:
    """Which replica was last sent each prompt block (by its `block_hash`, as the model that computes it names
    it): the replica whose prefix cache most likely holds it. Bounded: the blocks routed longest ago are
    forgotten first."""

    def __init__(self, block_size: int, model: str, capacity: int = AFFINITY_BLOCKS) -> None:
        self.block_size, self.model, self.capacity = block_size, model, capacity
        self._owner: OrderedDict[bytes, str] = OrderedDict()

    def hashes(self, prompt: Sequence[int]) -> list[bytes]:
        return block_hashes(prompt, self.block_size, self.model)

    def cached_blocks(self, hashes: Sequence[bytes], replica: str) -> int:
        """Blocks of the longest prefix of the prompt last routed to `replica`."""
        n = 0
        while n < len(hashes) and self._owner.get(hashes[n]) == replica:
            n += 1
        return n

    def record(self, hashes: Sequence[bytes], replica: str) -> None:
        for h in hashes:
            self._owner[h] = replica
            self._owner.move_to_end(h)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)


class OverfillRequestRouter(RequestRouter):
    """Set `request_router_kwargs: {role: prefill|decode}` in the deployment's request_router_config; a pool
    with prefix caching also names its `block_size`."""

    def initialize_state(self, role: str = "decode", block_size: int | None = None, **kwargs: Any) -> None:
        self.role = role
        # The prompts this pool prefills itself are computed by its own model (the student's: the pruned mode
        # on a decode replica); the KV a decode replica receives is named by the handover's teacher hashes.
        model = "teacher" if role == "prefill" else "student"
        self.affinity = PrefixAffinity(block_size, model) if block_size else None

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        reported = [
            WorkerStats.from_dict(r.routing_stats) if r.routing_stats else None for r in candidate_replicas
        ]
        ids = [r.replica_id.unique_id for r in candidate_replicas]
        hashes = self._prompt_hashes(pending_request)
        affinity = self.affinity
        cached = [affinity.cached_blocks(hashes, i) for i in ids] if affinity and hashes else None
        order = rank_replicas(self.role, reported, cached)
        if affinity and hashes:
            affinity.record(hashes, ids[order[0]])
        # Best first; the rest as a fallback rank in case the best one is at capacity.
        ranked = [candidate_replicas[i] for i in order]
        return [ranked[:1], ranked[1:]] if len(ranked) > 1 else [ranked]

    def _prompt_hashes(self, pending: PendingRequest | None) -> list[bytes]:
        """The block hashes of the request's prompt when the replica's cache could serve it: a decode replica's
        `generate_from(ticket)` names them; `submit` / `generate` take the prompt's token ids and the
        sampling params first."""
        if self.affinity is None or pending is None or not pending.args:
            return []
        if isinstance(pending.args[0], TransferTicket):
            return list(pending.args[0].block_hashes)
        if len(pending.args) < 2:
            return []
        prompt, params = pending.args[0], pending.args[1]
        if not isinstance(prompt, list) or not isinstance(params, SamplingParams):
            return []
        if params.continuation_start is not None or params.prompt_logprobs is not None:
            return []  # computed in full whatever is cached
        return self.affinity.hashes(prompt)


def request_router_config(role: str, engine: EngineConfig) -> RequestRouterConfig:
    """Route a deployment's requests with `OverfillRequestRouter`, stats refreshed every second; prefix
    affinity where the pool's replicas cache prefixes."""
    kwargs: dict[str, Any] = {"role": role}
    if engine.enable_prefix_caching:
        kwargs["block_size"] = engine.block_size
    settings: dict[str, Any] = {
        "request_router_class": f"{__name__}:OverfillRequestRouter",
        "request_router_kwargs": kwargs,
        "request_routing_stats_period_s": 1.0,
        "request_routing_stats_timeout_s": 5.0,
    }
    return RequestRouterConfig(**settings)
