"""What serve_load.py reports about a load run: the latency and throughput tables, the overfill / full ratios
and the PNG plots (overfill_serve.tools.plots: latency CDFs per mode and load level, output tokens/s against
the load level). One `LoadResult` is one mode at one load level (a concurrency or a Poisson rate)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from bench_common import pct, print_head
from load_client import Outcome


@dataclass
class LoadResult:
    mode: str
    level: float  # closed-loop clients, or offered requests/s with --rate
    outcomes: list[Outcome]
    wall: float

    @property
    def ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.ok]

    def output_tps(self) -> float:
        return sum(o.tokens for o in self.ok) / self.wall

    def median(self, key: str) -> float:
        vals = [getattr(o, key) for o in self.ok if getattr(o, key) is not None]
        return statistics.median(vals) if vals else float("nan")


def metrics(r: LoadResult) -> list[tuple[str, list[float]]]:
    """(name, values) per latency metric, in the units the tables and plots show."""
    return [
        ("TTFT s", [o.ttft for o in r.ok if o.ttft is not None]),
        ("TPOT ms", [1000 * o.tpot for o in r.ok if o.tpot is not None]),
        ("ITL ms", [1000 * g for o in r.ok for g in o.itl]),
        ("e2e s", [o.e2e for o in r.ok if o.e2e is not None]),
    ]


def print_latency(results: list[LoadResult], level_name: str) -> None:
    print_head(f"{'mode':<9} {level_name:>6} {'metric':<9} {'mean':>8} {'p50':>8} {'p90':>8} {'p99':>8}")
    for r in results:
        for name, vals in metrics(r):
            if not vals:
                print(f"{r.mode:<9} {r.level:6g} {name:<9} {'-':>8}")
                continue
            f = "{:8.1f}" if "ms" in name else "{:8.3f}"
            cells = " ".join(
                f.format(v) for v in (statistics.mean(vals), pct(vals, 0.5), pct(vals, 0.9), pct(vals, 0.99))
            )
            print(f"{r.mode:<9} {r.level:6g} {name:<9} {cells}")


def print_throughput(results: list[LoadResult], level_name: str, slo_ttft: float, slo_tpot: float) -> None:
    print_head(
        f"{'mode':<9} {level_name:>6} {'ok/sent':>8} {'wall s':>7} {'req/s':>6} {'out tok/s':>10} "
        f"{'goodput':>8} {'good req/s':>11}"
    )
    for r in results:
        good = [
            o
            for o in r.ok
            if o.ttft is not None and o.ttft <= slo_ttft and (o.tpot is None or o.tpot <= slo_tpot)
        ]
        n = len(r.outcomes)
        print(
            f"{r.mode:<9} {r.level:6g} {f'{len(r.ok)}/{n}':>8} {r.wall:7.1f} {len(r.ok) / r.wall:6.2f} "
            f"{r.output_tps():10.1f} {len(good) / n:8.0%} {len(good) / r.wall:11.2f}"
        )
    print(f"goodput: requests with TTFT <= {slo_ttft:g} s and TPOT <= {slo_tpot:g} s (fraction of all sent)")
    for r in results:
        counts: dict[str, int] = {}
        for o in r.outcomes:
            if o.error:
                counts[o.error] = counts.get(o.error, 0) + 1
        for e, c in sorted(counts.items(), key=lambda kv: -kv[1]):
            print(f"ERRORS {r.mode} at {r.level:g}: {c} x {e}")


def print_ratios(results: list[LoadResult], level_name: str) -> None:
    """overfill / full at each load level both were run at."""
    by = {(r.mode, r.level): r for r in results}
    for level in dict.fromkeys(r.level for r in results):
        o, f = by.get(("overfill", level)), by.get(("full", level))
        if o is None or f is None:
            continue
        print(
            f"overfill / full at {level_name} {level:g}: output tok/s {o.output_tps() / f.output_tps():.2f}x, "
            f"median TPOT {o.median('tpot') / f.median('tpot'):.2f}x, median TTFT "
            f"{o.median('ttft') / f.median('ttft'):.2f}x, median e2e {o.median('e2e') / f.median('e2e'):.2f}x"
        )


def write_plots(results: list[LoadResult], plot_dir: Path, level_name: str, title: str) -> list[Path]:
    """latency.png (TTFT / TPOT / e2e CDFs, a curve per mode, per level when there are several) and
    throughput.png (output tok/s against the level, a line per mode), under a time-stamped prefix."""
    from overfill_serve.tools import plots

    several = len({r.level for r in results}) > 1
    panels: dict[str, dict[str, list[float]]] = {"TTFT (s)": {}, "TPOT (ms)": {}, "e2e (s)": {}}
    for r in results:
        label = f"{r.mode} {level_name} {r.level:g}" if several else r.mode
        values = dict(metrics(r))
        panels["TTFT (s)"][label] = values["TTFT s"]
        panels["TPOT (ms)"][label] = values["TPOT ms"]
        panels["e2e (s)"][label] = values["e2e s"]
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        curves.setdefault(r.mode, []).append((r.level, r.output_tps()))
    stem = plot_dir / f"serve_load-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    x_label = "closed-loop clients" if level_name == "conc" else "offered load (requests/s)"
    return [
        plots.latency_plot(f"{stem}-latency.png", panels, title=title),
        plots.throughput_plot(f"{stem}-throughput.png", curves, x_label, "output tokens/s", title=title),
    ]
