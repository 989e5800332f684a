"""`PoolMonitor`: the ingress's view of the prefill and decode pools — replicas running against the target, and
for a pool short of replicas, whether any alive node could host one (placement.py).

A pool that cannot be placed is logged once as a warning naming what is missing, shows in `/health`, and
requests that need it end at once with 503 / UNAVAILABLE saying why, while modes served by the other pool
keep working (`:full` needs only prefill replicas, `:pruned` only decode replicas). A pool with no running
replica yet (start-up, or its replicas being replaced) refuses the same way at once, with a short Retry-After,
instead of letting requests wait in Serve's router; a pool scaling from N to N+1, or scaled to zero (Serve
starts one for a waiting request), takes requests. The first read happens as the monitor starts, and while
a pool has no replica the monitor re-reads every `FAST_PERIOD_S`; a request that finds a pool without a
replica re-reads it first (rate-limited), so one that came up since is used at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from overfill_serve.errors import PoolStartingError, PoolUnavailableError
from overfill_serve.request import Mode
from overfill_serve.serve.placement import NodeInfo, placement_problem

log = logging.getLogger(__name__)

DEPLOYMENTS = {"prefill": "PrefillServer", "decode": "DecodeServer"}
READ_TIMEOUT_S = 10.0  # a busy controller must not stall the monitor forever
FAST_PERIOD_S = 0.5  # re-read period while a pool has no running replica
RECHECK_S = 0.25  # at most one re-read this often for requests that find a pool without a replica
POOL_OF_MODEL = {"teacher": "prefill", "student": "decode"}  # where each model is served


@dataclass(frozen=True)
class PoolStatus:
    role: str
    deployment: str
    running: int
    target: int
    problem: str | None = None  # why a missing replica cannot be placed; None: it can (or none is missing)
    actors: tuple[str, ...] = field(default=(), compare=False)  # Ray actor names of the running replicas

    def check(self) -> None:
        """Raise `PoolUnavailableError` (no replica, none can be placed) or `PoolStartingError` (no replica
        running yet, one is starting) if requests for this pool cannot be served now."""
        if self.running > 0:
            return
        if self.problem is not None:
            raise PoolUnavailableError(
                f"the {self.role} pool ({self.deployment}) has no replica and cannot get one: {self.problem}"
            )
        if self.target > 0:  # target 0: scaled to zero, and a waiting request makes Serve start one
            raise PoolStartingError(
                f"the {self.role} pool ({self.deployment}) has no running replica yet "
                f"(0 of {self.target} started)"
            )

    def public(self) -> dict[str, Any]:
        """For `/health`."""
        fields = asdict(self)
        del fields["actors"]
        return fields


def read_pools(app_name: str) -> dict[str, PoolStatus]:
    """The pools of one Serve application, from the Serve controller and Ray's node table."""
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    assert client is not None  # typed Optional; inside a replica of a running app there is always one
    controller = client._controller
    details = ray.get(controller.get_serve_instance_details.remote(), timeout=READ_TIMEOUT_S)
    deployments = details["applications"][app_name]["deployments"]
    nodes = [NodeInfo.from_ray(n) for n in ray.nodes() if n.get("Alive")]
    pools = {}
    for role, name in DEPLOYMENTS.items():
        dep = deployments[name]
        actors = tuple(r["actor_name"] for r in dep["replicas"] if r["state"] == "RUNNING")
        running = len(actors)
        target = int(dep["target_num_replicas"])
        problem = None
        if running < target:
            options = dep["deployment_config"].get("ray_actor_options") or {}
            problem = placement_problem(
                dep.get("required_resources") or {}, options.get("label_selector") or {}, nodes
            )
        pools[role] = PoolStatus(role, name, running, target, problem, actors)
    return pools


class PoolMonitor:
    def __init__(
        self, app_name: str, period_s: float, read: Callable[[str], dict[str, PoolStatus]] = read_pools
    ) -> None:
        self.app_name, self.period_s, self._read = app_name, period_s, read
        self.pools: dict[str, PoolStatus] = {}  # replaced whole by the monitor thread, read by the ingress
        self._stop = threading.Event()
        self._recheck_lock, self._rechecked_at = threading.Lock(), float("-inf")
        self._thread = threading.Thread(target=self._run, name="pool-monitor", daemon=True)

    def start(self) -> PoolMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def refresh(self) -> None:
        try:
            pools = self._read(self.app_name)
        except Exception as e:  # the controller restarting, a node table mid-update: try again next period
            log.debug("pool status not read: %s", e)
            return
        for role, status in pools.items():
            before = self.pools.get(role)
            if status.problem is not None and (before is None or before.problem != status.problem):
                log.warning(
                    "%s pool (%s): %d of %d replicas running; a replica cannot be placed: %s",
                    role, status.deployment, status.running, status.target, status.problem,
                )  # fmt: skip
            elif status.problem is None and before is not None and before.problem is not None:
                log.info("%s pool (%s): placement problem gone", role, status.deployment)
        self.pools = pools

    def check(self, mode: Mode) -> None:
        """Raise `PoolUnavailableError` / `PoolStartingError` if a pool this mode needs cannot serve now. A
        pool seen without a replica is re-read first (at most once per `RECHECK_S` for all requests): a
        replica that came up since the last read serves the request instead of it being refused."""
        try:
            self._check(mode)
        except PoolStartingError:
            if not self._recheck_due():
                raise
            self.refresh()
            self._check(mode)

    def _recheck_due(self) -> bool:
        with self._recheck_lock:
            now = time.monotonic()
            if now - self._rechecked_at < RECHECK_S:
                return False
            self._rechecked_at = now
            return True

    def _check(self, mode: Mode) -> None:
        pools = self.pools
        for role in dict.fromkeys(POOL_OF_MODEL[m] for m in mode.models):
            status = pools.get(role)
            if status is None:
                raise PoolStartingError(f"the {role} pool's replicas are not known yet (starting)")
            status.check()

    def report(self) -> dict[str, Any]:
        """For `/health`: "ok" while every pool has a replica, "starting" until the pools are first read,
        else "degraded"; and each pool's state."""
        pools = self.pools
        status = (
            "starting" if not pools else "ok" if all(p.running > 0 for p in pools.values()) else "degraded"
        )
        return {"status": status, "pools": {r: p.public() for r, p in pools.items()}}

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            complete = bool(self.pools) and all(p.running > 0 for p in self.pools.values())
            self._stop.wait(self.period_s if complete else min(self.period_s, FAST_PERIOD_S))
