"""Prometheus metrics: one definition of each series (`SERIES`), exported two ways.

- `GET /metrics` on the HTTP port (what Prometheus and load tools scrape, as with vLLM): the ingress's own
  request series (TTFT, time per output token, end to end, token and request counts, by pair and mode) from
  a `prometheus_client` registry, and each running model replica's KV, queue and transfer series, built at
  scrape time from the stats the replica reports (`replica_families`, read by `app_metrics.py`).
- Ray's metrics agent (`ray.init(_metrics_export_port=...)`), like every Ray Serve metric: the same names with
  Ray's `ray_` prefix, and Ray's own deployment / replica labels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from overfill_serve.transfer.channel import TransferStats
from overfill_serve.worker.worker_stats import WorkerStats

LATENCY_BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
REQUEST_LABELS = ("pair", "mode")
REPLICA_LABELS = ("pair", "role")  # /metrics adds "replica"; Ray adds its own replica label


@dataclass(frozen=True)
class Series:
    name: str
    kind: str  # "counter" (exposed with `_total`), "gauge" or "histogram" (LATENCY_BOUNDS)
    help: str
    labels: tuple[str, ...]


def _series(*specs: tuple[str, str, str, tuple[str, ...]]) -> dict[str, Series]:
    return {name: Series(f"overfill_{name}", kind, text, labels) for name, kind, text, labels in specs}


SERIES = _series(
    ("ttft_seconds", "histogram", "time to first token", REQUEST_LABELS),
    ("tpot_seconds", "histogram", "time per output token after the first", REQUEST_LABELS),
    ("e2e_seconds", "histogram", "end-to-end request latency", REQUEST_LABELS),
    ("prompt_tokens", "counter", "prompt tokens", REQUEST_LABELS),
    ("generation_tokens", "counter", "generated tokens", REQUEST_LABELS),
    ("requests", "counter", "finished requests", (*REQUEST_LABELS, "finish_reason")),
    ("kv_blocks_used", "gauge", "KV blocks in use", REPLICA_LABELS),
    ("kv_blocks_free", "gauge", "KV blocks free", REPLICA_LABELS),
    ("kv_usage_ratio", "gauge", "fraction of the KV blocks in use (0-1)", REPLICA_LABELS),
    ("queue_depth", "gauge", "requests waiting in the engine", REPLICA_LABELS),
    ("running_requests", "gauge", "requests running in the engine", REPLICA_LABELS),
    ("swapped_requests", "gauge", "preempted requests whose KV waits in host memory", REPLICA_LABELS),
    ("prefix_cache_queries", "counter", "prompt tokens looked up in the prefix cache", REPLICA_LABELS),
    ("prefix_cache_hits", "counter", "prompt tokens found in the prefix cache", REPLICA_LABELS),
    ("prefill_tokens", "counter", "prompt tokens the replica's prefill computed", REPLICA_LABELS),
    ("kv_transfer_bytes", "counter", "KV bytes received", (*REPLICA_LABELS, "backend")),
    (
        "kv_transfer_saved_bytes",
        "counter",
        "KV bytes not transferred: the decode replica's prefix cache held them",
        (*REPLICA_LABELS, "backend"),
    ),
    ("kv_transfer_seconds", "histogram", "KV transfer time", (*REPLICA_LABELS, "backend")),
)

REQUEST_SERIES = [name for name, series in SERIES.items() if "mode" in series.labels]  # the ingress's
REPLICA_SERIES = [name for name, series in SERIES.items() if "role" in series.labels]  # a model replica's


def _ray_metric(series: Series, **default_tags: str) -> Any:
    from ray.serve import metrics

    metric: Any
    if series.kind == "histogram":
        metric = metrics.Histogram(
            series.name, series.help, boundaries=LATENCY_BOUNDS, tag_keys=series.labels
        )
    else:
        cls = metrics.Counter if series.kind == "counter" else metrics.Gauge
        metric = cls(series.name, series.help, tag_keys=series.labels)
    metric.set_default_tags(default_tags)
    return metric


def _prometheus_metric(series: Series, registry: CollectorRegistry) -> Any:
    if series.kind == "histogram":
        return Histogram(series.name, series.help, series.labels, registry=registry, buckets=LATENCY_BOUNDS)
    cls = Counter if series.kind == "counter" else Gauge
    return cls(series.name, series.help, series.labels, registry=registry)


@dataclass
class TransferTotals:
    """One backend's KV transfers into a replica since it started, as a Prometheus histogram counts them."""

    nbytes: int = 0
    saved_bytes: int = 0
    seconds: float = 0.0
    counts: list[int] = field(
        default_factory=lambda: [0] * (len(LATENCY_BOUNDS) + 1)
    )  # per bucket, +Inf last

    def add(self, stats: TransferStats) -> None:
        self.nbytes += stats.nbytes
        self.saved_bytes += stats.saved_bytes
        self.seconds += stats.seconds
        self.counts[sum(1 for bound in LATENCY_BOUNDS if bound < stats.seconds)] += 1

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs."""
        total, out = 0, []
        for bound, count in zip([*map(str, LATENCY_BOUNDS), "+Inf"], self.counts):
            total += count
            out.append((bound, float(total)))
        return out


class ReplicaMetrics:
    """A model replica's series: exported through Ray, and reported in its stats for `/metrics`."""

    def __init__(self, role: str, pair_name: str) -> None:
        self.ray = {name: _ray_metric(SERIES[name], role=role, pair=pair_name) for name in REPLICA_SERIES}
        self.transfers: dict[str, TransferTotals] = {}
        self._counted: dict[str, float] = {}  # the stats' running totals as last exported to Ray

    def observe(self, stats: WorkerStats) -> None:
        for name, value in _replica_gauges(stats).items():
            self.ray[name].set(value)
        for name, total in _replica_counters(stats).items():
            if total > self._counted.get(name, 0.0):  # Ray counters take increments (and refuse inc(0))
                self.ray[name].inc(total - self._counted.get(name, 0.0))
                self._counted[name] = total

    def observe_transfer(self, stats: TransferStats) -> None:
        tags = {"backend": stats.backend}
        if stats.nbytes:  # none when the request ended on its first token; Ray refuses inc(0)
            self.ray["kv_transfer_bytes"].inc(stats.nbytes, tags)
        if stats.saved_bytes:
            self.ray["kv_transfer_saved_bytes"].inc(stats.saved_bytes, tags)
        self.ray["kv_transfer_seconds"].observe(stats.seconds, tags)
        self.transfers.setdefault(stats.backend, TransferTotals()).add(stats)

    def report(self) -> dict[str, Any]:
        """What the replica's stats carry for `/metrics` (read with `TransferTotals(**...)`)."""
        return {"kv_transfers": {backend: asdict(t) for backend, t in list(self.transfers.items())}}


# The replica counters WorkerStats carries as running totals: series -> field.
_STATS_COUNTERS = {
    "prefix_cache_queries": "prefix_queries",
    "prefix_cache_hits": "prefix_hits",
    "prefill_tokens": "prefill_tokens",
}


def _replica_counters(stats: WorkerStats) -> dict[str, float]:
    return {name: getattr(stats, field_name) for name, field_name in _STATS_COUNTERS.items()}


def _replica_gauges(stats: WorkerStats) -> dict[str, float]:
    return {
        "kv_blocks_used": stats.total_blocks - stats.free_blocks,
        "kv_blocks_free": stats.free_blocks,
        "kv_usage_ratio": stats.kv_utilization,
        "queue_depth": stats.waiting,
        "running_requests": stats.running,
        "swapped_requests": stats.swapped,
    }


def replica_families(pair_name: str, replicas: Sequence[tuple[str, dict[str, Any]]]) -> Iterator[Metric]:
    """The replica series of `/metrics`, from each running replica's (role, reported stats)."""
    labels = [*REPLICA_LABELS, "replica"]
    gauges = {
        name: GaugeMetricFamily(SERIES[name].name, SERIES[name].help, labels=labels)
        for name in REPLICA_SERIES
        if SERIES[name].kind == "gauge"
    }
    counters = {
        name: CounterMetricFamily(SERIES[name].name, SERIES[name].help, labels=labels)
        for name in _STATS_COUNTERS
    }
    nbytes, saved, seconds = (SERIES[f"kv_transfer_{s}"] for s in ("bytes", "saved_bytes", "seconds"))
    bytes_family = CounterMetricFamily(nbytes.name, nbytes.help, labels=[*labels, "backend"])
    saved_family = CounterMetricFamily(saved.name, saved.help, labels=[*labels, "backend"])
    seconds_family = HistogramMetricFamily(seconds.name, seconds.help, labels=[*labels, "backend"])
    for role, report in replicas:
        values = [pair_name, role, str(report.get("replica_id", ""))]
        stats = WorkerStats.from_dict(report)
        for name, value in _replica_gauges(stats).items():
            gauges[name].add_metric(values, value)
        for name, value in _replica_counters(stats).items():
            counters[name].add_metric(values, value)
        for backend, data in (report.get("kv_transfers") or {}).items():
            totals = TransferTotals(**data)
            bytes_family.add_metric([*values, backend], totals.nbytes)
            saved_family.add_metric([*values, backend], totals.saved_bytes)
            seconds_family.add_metric([*values, backend], totals.buckets(), totals.seconds)
    yield from gauges.values()
    yield from counters.values()
    yield bytes_family
    yield saved_family
    yield seconds_family


Sample = tuple[str, dict[str, str], float]  # (sample name, labels, value): one line of the text format


def merged_request_families(replicas: Sequence[Sequence[Sample]]) -> Iterator[Metric]:
    """The request series of several ingress replicas (each one's `RequestMetrics.samples()`), summed: a
    scrape reaches one ingress replica, and it answers for all of them."""
    totals: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for samples in replicas:
        for name, labels_of, value in samples:
            key = (name, tuple(sorted(labels_of.items())))
            totals[key] = totals.get(key, 0.0) + value
    for series in (SERIES[name] for name in REQUEST_SERIES):
        family = Metric(series.name, series.help, series.kind)
        names = {series.name + suffix for suffix in ("", "_total", "_bucket", "_count", "_sum")}
        for (name, label_items), value in totals.items():
            if name in names:
                family.add_sample(name, dict(label_items), value)
        yield family


class RequestMetrics:
    """The ingress's request series: exported through Ray, and kept in `registry` for `/metrics`."""

    def __init__(self, pair_name: str) -> None:
        self.pair_name = pair_name
        self.registry = CollectorRegistry(auto_describe=True)
        self.ray = {name: _ray_metric(SERIES[name], pair=pair_name) for name in REQUEST_SERIES}
        self.local = {name: _prometheus_metric(SERIES[name], self.registry) for name in REQUEST_SERIES}

    def observe(
        self,
        mode: str,
        prompt_tokens: int,
        output_tokens: int,
        ttft: float | None,
        e2e: float,
        finish_reason: str,
    ) -> None:
        if ttft is not None:
            self._add("ttft_seconds", ttft, mode)
            if output_tokens > 1:
                self._add("tpot_seconds", (e2e - ttft) / (output_tokens - 1), mode)
        self._add("e2e_seconds", e2e, mode)
        self._add("prompt_tokens", prompt_tokens, mode)
        self._add("generation_tokens", output_tokens, mode)
        self._add("requests", 1, mode, finish_reason=finish_reason)

    def samples(self) -> list[Sample]:
        """This replica's request series (creation times left out), for `merged_request_families`."""
        return [
            (sample.name, dict(sample.labels), sample.value)
            for family in self.registry.collect()
            for sample in family.samples
            if not sample.name.endswith("_created")
        ]

    def _add(self, name: str, value: float, mode: str, **extra: str) -> None:
        """One observation, in both exports."""
        series, tags = SERIES[name], {"mode": mode, **extra}
        local = self.local[name].labels(pair=self.pair_name, **tags)
        if series.kind == "histogram":
            self.ray[name].observe(value, tags)
            local.observe(value)
            return
        local.inc(value)  # a zero still creates the series: a request that failed early counts its mode
        if value:  # Ray's counters refuse inc(0)
            self.ray[name].inc(value, tags)
