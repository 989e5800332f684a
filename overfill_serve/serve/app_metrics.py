"""`AppMetrics`: the text of `GET /metrics`, the whole application's series in Prometheus format.

The request series are this ingress replica's (`RequestMetrics`) summed with every other running ingress
replica's (each reports its own through `record_routing_stats`); the model replicas' series are built from the
stats each running replica reports (`record_routing_stats`: `WorkerStats` plus its KV-transfer totals). Every
replica is asked directly, by actor (a handle call would reach only the replica the request router picks).
Nothing depends on Ray's metrics agent being reachable, so it works the same under `serve run` on one machine
and on a multi-node cluster, and the values are as fresh as the scrape (Ray's agent exports every few
seconds).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.core import Metric

from overfill_serve.serve.metrics import RequestMetrics, Sample, merged_request_families, replica_families
from overfill_serve.serve.pool_monitor import READ_TIMEOUT_S, PoolMonitor

log = logging.getLogger(__name__)
STATS_TIMEOUT_S = 5.0  # a replica busy past this is left out of one scrape, not allowed to stall it
SERVE_NAMESPACE = "serve"
INGRESS = "Ingress"  # the deployment whose replicas each keep part of the request series


class _Families:
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def exposition(
    requests: RequestMetrics,
    replicas: list[tuple[str, dict[str, Any]]],
    other_ingresses: Sequence[Sequence[Sample]] = (),
) -> bytes:
    """Prometheus text: the request series (this ingress replica's and the others', summed), then each model
    replica's (role, stats) series."""
    request_families = merged_request_families([requests.samples(), *other_ingresses])
    families = [*request_families, *replica_families(requests.pair_name, replicas)]
    return generate_latest(_Families(families))


class AppMetrics:
    def __init__(self, requests: RequestMetrics, pools: PoolMonitor) -> None:
        self.requests, self.pools = requests, pools
        self._actors: dict[str, Any] = {}  # actor name -> handle, for replicas seen running

    async def text(self) -> bytes:
        running = [(role, name) for role, status in self.pools.pools.items() for name in status.actors]
        ingresses = await self._other_ingresses()
        for name in set(self._actors) - {name for _, name in running} - set(ingresses):
            del self._actors[name]
        reports = await asyncio.gather(*(self._stats(name) for _, name in running))
        replicas = [(role, r) for (role, _), r in zip(running, reports) if r is not None]
        others = await asyncio.gather(*(self._stats(name) for name in ingresses))
        samples = [[(n, labels, v) for n, labels, v in r["request_samples"]] for r in others if r is not None]
        return exposition(self.requests, replicas, samples)

    async def _other_ingresses(self) -> list[str]:
        """Actor names of the app's other running ingress replicas (each reports its request series)."""
        try:
            return await asyncio.to_thread(_running_ingresses, self.pools.app_name)
        except Exception as e:  # the controller busy or restarting: this scrape has this replica's only
            log.debug("ingress replicas not read: %s", e)
            return []

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


def _running_ingresses(app_name: str) -> list[str]:
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    assert client is not None  # inside a replica of a running app there is always one
    details = ray.get(client._controller.get_serve_instance_details.remote(), timeout=READ_TIMEOUT_S)
    me = serve.get_replica_context().replica_id.unique_id
    replicas = details["applications"][app_name]["deployments"][INGRESS]["replicas"]
    return [r["actor_name"] for r in replicas if r["state"] == "RUNNING" and r["replica_id"] != me]
