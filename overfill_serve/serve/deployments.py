"""The two model deployments: `PrefillServer` (full model) and `DecodeServer` (pruned model).

Each replica wraps a worker whose engine runs on its own thread; the async methods here only hand work over
and stream results back. A prefill replica's KV server listens on its node's IP, where decode replicas on
other nodes reach it directly.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

import ray
from ray import serve

from overfill_serve.engine.output_processor import StepOutput
from overfill_serve.errors import OverfillError
from overfill_serve.model.spec import ModelSpec
from overfill_serve.request import Resume
from overfill_serve.sampling_params import SamplingParams
from overfill_serve.serve.autoscaling import autoscaling_signals
from overfill_serve.serve.config import ServeConfig
from overfill_serve.serve.log_filter import quiet_client_errors
from overfill_serve.serve.metrics import ReplicaMetrics
from overfill_serve.worker.decode_worker import DecodeWorker
from overfill_serve.worker.model_worker import ModelWorker
from overfill_serve.worker.prefill_worker import PrefillWorker, TransferTicket

log = logging.getLogger(__name__)


class _ModelServer:
    """What both deployments share: local generation (both stages on this replica's model), stats, health."""

    worker: ModelWorker
    metrics: ReplicaMetrics

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[StepOutput]:
        async for out in self.worker.agenerate(prompt_token_ids, params, request_id):
            yield out

    def stats(self) -> dict:
        """The worker's `WorkerStats` as a dict, with its KV-transfer totals and where this replica runs; read
        by the replica router (`record_routing_stats`) to rank replicas, and by `/metrics` (app_metrics.py)."""
        stats = self.worker.stats()
        self.metrics.observe(stats)
        return {
            **asdict(stats),
            **self.metrics.report(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "replica_id": serve.get_replica_context().replica_id.unique_id,
        }

    record_routing_stats = stats

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Read by `RoleAutoscaler` (autoscaling.py): what limits this replica's pool."""
        return autoscaling_signals(self.worker.stats())

    def check_health(self) -> None:
        if self.worker.loop.error is not None:
            raise OverfillError(f"engine loop failed: {self.worker.loop.error}")

    def __del__(self) -> None:
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.stop()


# Defaults for both; the config file's `deployments:` section overrides them. Scale-down: Serve stops routing
# to a replica, waits for its requests, then calls `__del__`, all within graceful_shutdown_timeout_s. A
# prefill replica then serves its open KV transfers (up to a lease); a decode request still running at the
# deadline migrates to another replica (dispatcher.py).
def _model_deployment(graceful_shutdown_timeout_s: float) -> Any:
    return serve.deployment(
        ray_actor_options={"num_cpus": 0.5},
        max_ongoing_requests=256,
        health_check_period_s=5,
        graceful_shutdown_timeout_s=graceful_shutdown_timeout_s,
    )


@_model_deployment(graceful_shutdown_timeout_s=45)
class PrefillServer(_ModelServer):
    worker: PrefillWorker

    def __init__(self, config: ServeConfig) -> None:
        quiet_client_errors()
        teacher_dir, _ = config.model_dirs()
        transfer = config.transfer_config(ray.util.get_node_ip_address())
        self.worker = PrefillWorker(teacher_dir, transfer=transfer, **asdict(config.prefill))
        self.worker.start()
        self.metrics = ReplicaMetrics("prefill", config.pair_name)
        log.info("prefill replica ready: %s, KV server %s", teacher_dir, self.worker.address)

    async def submit(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        resume: Resume | None = None,
    ) -> TransferTicket:
        return await self.worker.asubmit(prompt_token_ids, params, request_id, resume)

    def __del__(self) -> None:
        # Serve calls this once the replica has no request in flight (scale-down, redeploy). KV it offered
        # may still be mid-pull: serve it until each transfer is released or its lease runs out.
        worker = getattr(self, "worker", None)
        if worker is not None and not worker.drain(timeout=worker.registry.lease_seconds + 1.0):
            log.warning("prefill replica shutting down with %d KV transfers open", worker.registry.num_open)
        super().__del__()


@_model_deployment(graceful_shutdown_timeout_s=60)
class DecodeServer(_ModelServer):
    worker: DecodeWorker

    def __init__(self, config: ServeConfig) -> None:
        quiet_client_errors()
        teacher_dir, student_dir = config.model_dirs()
        # The teacher's depth bounds a depth-pruned student's map; its directory may not be on this node.
        teacher_layers = ModelSpec.from_dir(teacher_dir).num_layers if teacher_dir.is_dir() else None
        self.worker = DecodeWorker(
            student_dir,
            transfer=config.transfer_config(ray.util.get_node_ip_address()),
            kept_layers=config.kept_layers,
            num_teacher_layers=teacher_layers,
            **asdict(config.decode),
        )
        self.worker.start()
        self.metrics = ReplicaMetrics("decode", config.pair_name)
        self.worker.on_transfer = self.metrics.observe_transfer
        log.info("decode replica ready: %s", student_dir)

    async def generate_from(self, ticket: TransferTicket) -> AsyncIterator[StepOutput]:
        async for out in self.worker.agenerate_from(ticket):
            yield out
