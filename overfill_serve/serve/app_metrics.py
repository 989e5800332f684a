"""`AppMetrics`: the text of `GET /metrics`, the whole application's series in Prometheus format.

The ingress's request series come from its own registry (`RequestMetrics`); the model replicas' series are
built from the stats each running replica reports (`record_routing_stats`: `WorkerStats` plus its KV-transfer
totals), asked of every replica the pool monitor last saw running, directly by actor (a handle call would
reach only the replica the request router picks). Nothing depends on Ray's metrics agent being reachable,
so it works the same under `serve run` on one machine and on a multi-node cluster, and the values are as
fresh as the scrape (Ray's agent exports every few seconds).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.core import Metric

from overfill_serve.serve.metrics import RequestMetrics, replica_families
from overfill_serve.serve.pool_monitor import PoolMonitor

log = logging.getLogger(__name__)
STATS_TIMEOUT_S = 5.0  # a replica busy past this is left out of one scrape, not allowed to stall it
SERVE_NAMESPACE = "serve"


class _Families:
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def exposition(requests: RequestMetrics, replicas: list[tuple[str, dict[str, Any]]]) -> bytes:
    """Prometheus text: the request series, then each replica's (role, stats) series."""
    families = [*requests.registry.collect(), *replica_families(requests.pair_name, replicas)]
    return generate_latest(_Families(families))


class AppMetrics:
    def __init__(self, requests: RequestMetrics, pools: PoolMonitor) -> None:
        self.requests, self.pools = requests, pools
        self._actors: dict[str, Any] = {}  # actor name -> handle, for replicas seen running

    async def text(self) -> bytes:
        running = [(role, name) for role, status in self.pools.pools.items() for name in status.actors]
        for name in set(self._actors) - {name for _, name in running}:
            del self._actors[name]
        reports = await asyncio.gather(*(self._stats(name) for _, name in running))
        replicas = [(role, r) for (role, _), r in zip(running, reports) if r is not None]
        return exposition(self.requests, replicas)

    async def _stats(self, actor_name: str) -> dict[str, Any] | None:
        """A replica's reported stats, or None if it is gone or too slow (it is left out of this scrape)."""
        try:
            if actor_name not in self._actors:
                import ray

                self._actors[actor_name] = await asyncio.to_thread(
                    ray.get_actor, actor_name, namespace=SERVE_NAMESPACE
                )
            actor = self._actors[actor_name]
            return await asyncio.wait_for(_awaited(actor.record_routing_stats.remote()), STATS_TIMEOUT_S)
        except Exception as e:  # a replica that just died or is being replaced: skip it this time
            log.debug("stats of %s not read: %s", actor_name, e)
            self._actors.pop(actor_name, None)
            return None


async def _awaited(ref: Any) -> Any:
    return await ref
