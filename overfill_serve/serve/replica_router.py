"""Which replica gets a request: prefill replicas by queued prompt tokens, decode replicas by free KV blocks and
running sequences. The ranking is pure (`rank_replicas`); `OverfillRequestRouter` plugs it into Ray Serve's
request-router interface, reading the stats each replica reports through `record_routing_stats`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def load_score(role: str, stats: dict[str, Any] | None) -> tuple[float, ...]:
    """Lower is better. Replicas that have not reported yet rank after every replica that has."""
    if not stats:
        return (1.0, 0.0, 0.0)
    if role == "prefill":
        return (0.0, float(stats.get("queued_prompt_tokens", 0)), float(stats.get("waiting", 0)))
    free = stats.get("free_blocks", 0) / max(stats.get("total_blocks", 1), 1)
    return (0.0, -free, float(stats.get("running", 0) + stats.get("waiting", 0)))


def rank_replicas(role: str, stats: Sequence[dict[str, Any] | None]) -> list[int]:
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
        order = rank_replicas(self.role, [r.routing_stats for r in candidate_replicas])
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
