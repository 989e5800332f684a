"""`PoolMonitor`: the ingress's view of the prefill and decode pools — replicas running against the target, and
for a pool short of replicas, whether any alive node could host one (placement.py).

A pool that cannot be placed is logged once as a warning naming what is missing, shows in `/health`, and
requests that need it end at once with 503 / UNAVAILABLE saying why, while modes served by the other pool
keep working (`:full` needs only prefill replicas, `:pruned` only decode replicas).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from overfill_serve.errors import PoolUnavailableError
from overfill_serve.request import Mode
from overfill_serve.serve.placement import NodeInfo, placement_problem

log = logging.getLogger(__name__)

DEPLOYMENTS = {"prefill": "PrefillServer", "decode": "DecodeServer"}
READ_TIMEOUT_S = 10.0  # a busy controller must not stall the monitor forever
POOL_OF_MODEL = {"teacher": "prefill", "student": "decode"}  # where each model is served


@dataclass(frozen=True)
class PoolStatus:
    role: str
    deployment: str
    running: int
    target: int
    problem: str | None = None  # why a missing replica cannot be placed; None: it can (or none is missing)

    @property
    def unavailable(self) -> str | None:
        """Why requests for this pool cannot be served now, if they cannot."""
        if self.running == 0 and self.problem is not None:
            return (
                f"the {self.role} pool ({self.deployment}) has no replica and cannot get one: {self.problem}"
            )
        return None


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
        running = sum(1 for r in dep["replicas"] if r["state"] == "RUNNING")
        target = int(dep["target_num_replicas"])
        problem = None
        if running < target:
            options = dep["deployment_config"].get("ray_actor_options") or {}
            problem = placement_problem(
                dep.get("required_resources") or {}, options.get("label_selector") or {}, nodes
            )
        pools[role] = PoolStatus(role, name, running, target, problem)
    return pools


class PoolMonitor:
    def __init__(
        self, app_name: str, period_s: float, read: Callable[[str], dict[str, PoolStatus]] = read_pools
    ) -> None:
        self.app_name, self.period_s, self._read = app_name, period_s, read
        self.pools: dict[str, PoolStatus] = {}  # replaced whole by the monitor thread, read by the ingress
        self._stop = threading.Event()
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
        """Raise `PoolUnavailableError` if a pool this mode needs cannot serve."""
        pools = self.pools
        for role in dict.fromkeys(POOL_OF_MODEL[m] for m in mode.models):
            status = pools.get(role)
            why = status.unavailable if status is not None else None
            if why is not None:
                raise PoolUnavailableError(why)

    def report(self) -> dict[str, Any]:
        """For `/health`: "ok" while every pool has a replica, "starting" until the pools are first read,
        else "degraded"; and each pool's state."""
        pools = self.pools
        status = (
            "starting" if not pools else "ok" if all(p.running > 0 for p in pools.values()) else "degraded"
        )
        return {"status": status, "pools": {r: asdict(p) for r, p in pools.items()}}

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.period_s)
