"""Which replica gets a request: prefill replicas by queued prompt tokens, decode replicas by free KV blocks and
the requests they hold. The ranking is pure (`rank_replicas`); `OverfillRequestRouter` plugs it into Ray
Serve's request-router interface, reading the `WorkerStats` each replica reports through
`record_routing_stats`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from overfill_serve.worker.worker_stats import WorkerStats


def load_score(role: str, stats: WorkerStats | None) -> tuple[float, ...]:
    """Lower is better. Replicas that have not reported yet rank after every replica that has."""
    if stats is None:
        return (1.0, 0.0, 0.0)
    if role == "prefill":
        return (0.0, float(stats.queued_prompt_tokens), float(stats.waiting))
    return (0.0, -stats.free_blocks / stats.total_blocks, float(stats.num_requests))


def rank_replicas(role: str, stats: Sequence[WorkerStats | None]) -> list[int]:
    """Indices of the replicas, best first. Ties break at random: stats refresh once a second, and equal
    replicas (a fresh one and an idle one) must share the requests that arrive in between, not herd."""
    keys = [(load_score(role, s), random.random()) for s in stats]
    return sorted(range(len(stats)), key=keys.__getitem__)


class OverfillRequestRouter(RequestRouter):
    """Set `request_router_kwargs: {role: prefill|decode}` in the deployment's request_router_config."""

    def initialize_state(self, role: str = "decode", **kwargs: Any) -> None:
        self.role = role

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        reported = [
            WorkerStats.from_dict(r.routing_stats) if r.routing_stats else None for r in candidate_replicas
        ]
        order = rank_replicas(self.role, reported)
        # Best first; the rest as a fallback rank in case the best one is at capacity.
        ranked = [candidate_replicas[i] for i in order]
        return [ranked[:1], ranked[1:]] if len(ranked) > 1 else [ranked]


def request_router_config(role: str) -> RequestRouterConfig:
    """Route a deployment's requests with `OverfillRequestRouter`, stats refreshed every second."""
    settings: dict[str, Any] = {
        "request_router_class": f"{__name__}:OverfillRequestRouter",
        "request_router_kwargs": {"role": role},
        "request_routing_stats_period_s": 1.0,
        "request_routing_stats_timeout_s": 5.0,
    }
    return RequestRouterConfig(**settings)
