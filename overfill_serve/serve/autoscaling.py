"""Role-aware autoscaling: each pool scales on what limits it.

- prefill replicas on queued prompt tokens (compute-bound work waiting for the teacher), and optionally on
  recent TTFT against a target;
- decode replicas on KV-block utilisation and the requests they hold (memory-bound work on the student), and
  optionally on recent TPOT against a target.

`desired_replicas` is the pure decision; `RoleAutoscaler` adapts it to Ray Serve's custom autoscaling policy
interface (a class-callable policy, built once with `policy_kwargs`, called with an `AutoscalingContext`),
reading what each replica reports through `record_autoscaling_stats`. Scale-up is immediate; scale-down waits
`downscale_delay_s` of sustained low load (replicas leave gracefully; Serve drains their in-flight requests,
and a decode request cut short migrates, see dispatcher.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from overfill_serve.errors import ModelConfigError
from overfill_serve.worker.worker_stats import WorkerStats

ROLES = ("prefill", "decode")
DEFAULT_TARGETS = {"queued_prompt_tokens": 4096.0, "kv_utilization": 0.7, "requests": 32.0}  # per replica
LATENCY_TARGETS = ("ttft_s", "tpot_s")  # optional, in seconds


def autoscaling_signals(stats: WorkerStats) -> dict[str, float]:
    """What a replica reports through `record_autoscaling_stats`: every role's signals, by target name."""
    return {
        "queued_prompt_tokens": float(stats.queued_prompt_tokens),
        "kv_utilization": stats.kv_utilization,
        "requests": float(stats.num_requests),
        "ttft_s": stats.ttft_s,
        "tpot_s": stats.tpot_s,
    }


def replica_load(role: str, stats: Mapping[str, float], targets: Mapping[str, float]) -> float:
    """One replica's load in units of "a replica's worth of work" (1.0 = at target): the tightest of its
    role's signals. A latency over its target counts like work over target (latency x replicas / target is
    the usual proportional rule); latency targets are optional (absent from `targets`: not used)."""
    signals = (
        ("queued_prompt_tokens", "ttft_s") if role == "prefill" else ("kv_utilization", "requests", "tpot_s")
    )
    return max(stats.get(name, 0.0) / targets[name] for name in signals if name in targets)


def desired_replicas(
    role: str,
    per_replica: Sequence[Mapping[str, float]],
    targets: Mapping[str, float],
    min_replicas: int,
    max_replicas: int,
) -> int:
    """Enough replicas to bring the pool's total load to at most 1.0 per replica, within the bounds."""
    total = sum(replica_load(role, stats, targets) for stats in per_replica)
    return max(min_replicas, min(max_replicas, math.ceil(total - 1e-9)))


class RoleAutoscaler:
    """`autoscaling_config.policy: {policy_function: overfill_serve.serve.autoscaling:RoleAutoscaler,
    policy_kwargs: {role: decode, kv_utilization: 0.7, requests: 24, tpot_s: 0.05, downscale_delay_s: 30}}`.
    `requests`: requests a decode replica holds (running, waiting or swapped out). `ttft_s` (prefill) and
    `tpot_s` (decode) are optional latency targets in seconds."""

    def __init__(self, role: str, downscale_delay_s: float = 30.0, **targets: float) -> None:
        if role not in ROLES:
            raise ModelConfigError(f"autoscaling role {role!r} is not one of {ROLES}")
        unknown = sorted(set(targets) - set(DEFAULT_TARGETS) - set(LATENCY_TARGETS))
        if unknown:
            raise ModelConfigError(f"unknown autoscaling targets {unknown}")
        self.role = role
        self.targets = {**DEFAULT_TARGETS, **targets}
        if min(self.targets.values()) <= 0:
            raise ModelConfigError(f"autoscaling targets must be positive, got {self.targets}")
        self.downscale_delay_s = downscale_delay_s

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        replicas = set().union(*(m.keys() for m in metrics.values())) if metrics else set()
        per_replica = [{name: values[r] for name, values in metrics.items() if r in values} for r in replicas]
        want = desired_replicas(
            self.role,
            per_replica,
            self.targets,
            ctx.capacity_adjusted_min_replicas,
            ctx.capacity_adjusted_max_replicas,
        )
        return self.decide(
            want, ctx.current_num_replicas, dict(ctx.policy_state or {}), ctx.current_time or time.time()
        )

    def decide(
        self, want: int, current: int, state: dict[str, Any], now: float
    ) -> tuple[int, dict[str, Any]]:
        """Up at once; down only after `downscale_delay_s` of wanting fewer (no flapping on a short lull)."""
        if want >= current:
            state.pop("low_since", None)
            return want, state
        low_since = state.setdefault("low_since", now)
        return (want, {}) if now - low_since >= self.downscale_delay_s else (current, state)
