"""Prometheus metrics of the deployments (exported by Ray's metrics agent, like every Ray Serve metric).

Replicas report KV-pool occupancy, queue depth, swapped-out requests and KV-transfer volume; the ingress
reports per-request latencies (TTFT, time per output token, end to end) and token counts, by mode and pair.
"""

from __future__ import annotations

from overfill_serve.transfer.channel import TransferStats
from overfill_serve.worker.worker_stats import WorkerStats

LATENCY_BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]


class ReplicaMetrics:
    def __init__(self, role: str) -> None:
        from ray.serve import metrics

        tags = ("role",)
        self.blocks_used = metrics.Gauge("overfill_kv_blocks_used", "KV blocks in use", tag_keys=tags)
        self.blocks_free = metrics.Gauge("overfill_kv_blocks_free", "KV blocks free", tag_keys=tags)
        self.waiting = metrics.Gauge("overfill_queue_depth", "requests waiting in the engine", tag_keys=tags)
        self.running = metrics.Gauge(
            "overfill_running_requests", "requests running in the engine", tag_keys=tags
        )
        self.swapped = metrics.Gauge(
            "overfill_swapped_requests", "preempted requests whose KV waits in host memory", tag_keys=tags
        )
        self.transfer_bytes = metrics.Counter(
            "overfill_kv_transfer_bytes", "KV bytes received", tag_keys=("role", "backend")
        )
        self.transfer_seconds = metrics.Histogram(
            "overfill_kv_transfer_seconds",
            "KV transfer time",
            boundaries=LATENCY_BOUNDS,
            tag_keys=("role", "backend"),
        )
        for metric in vars(self).values():
            metric.set_default_tags({"role": role})

    def observe(self, stats: WorkerStats) -> None:
        self.blocks_used.set(stats.total_blocks - stats.free_blocks)
        self.blocks_free.set(stats.free_blocks)
        self.waiting.set(stats.waiting)
        self.running.set(stats.running)
        self.swapped.set(stats.swapped)

    def observe_transfer(self, stats: TransferStats) -> None:
        tags = {"backend": stats.backend}
        self.transfer_bytes.inc(stats.nbytes, tags)
        self.transfer_seconds.observe(stats.seconds, tags)


class RequestMetrics:
    def __init__(self, pair_name: str) -> None:
        from ray.serve import metrics

        tags = ("pair", "mode")
        self.ttft = metrics.Histogram(
            "overfill_ttft_seconds", "time to first token", boundaries=LATENCY_BOUNDS, tag_keys=tags
        )
        self.tpot = metrics.Histogram(
            "overfill_tpot_seconds",
            "time per output token after the first",
            boundaries=LATENCY_BOUNDS,
            tag_keys=tags,
        )
        self.e2e = metrics.Histogram(
            "overfill_e2e_seconds", "end-to-end request latency", boundaries=LATENCY_BOUNDS, tag_keys=tags
        )
        self.prompt_tokens = metrics.Counter("overfill_prompt_tokens", "prompt tokens", tag_keys=tags)
        self.generation_tokens = metrics.Counter(
            "overfill_generation_tokens", "generated tokens", tag_keys=tags
        )
        self.requests = metrics.Counter(
            "overfill_requests", "finished requests", tag_keys=(*tags, "finish_reason")
        )
        for metric in vars(self).values():
            metric.set_default_tags({"pair": pair_name})

    def observe(
        self,
        mode: str,
        prompt_tokens: int,
        output_tokens: int,
        ttft: float | None,
        e2e: float,
        finish_reason: str,
    ) -> None:
        tags = {"mode": mode}
        if ttft is not None:
            self.ttft.observe(ttft, tags)
            if output_tokens > 1:
                self.tpot.observe((e2e - ttft) / (output_tokens - 1), tags)
        self.e2e.observe(e2e, tags)
        # Ray's counters refuse inc(0): a request that failed before its first token must still count.
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens, tags)
        if output_tokens:
            self.generation_tokens.inc(output_tokens, tags)
        self.requests.inc(1, {**tags, "finish_reason": finish_reason})
