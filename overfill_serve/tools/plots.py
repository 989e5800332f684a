"""PNG plots for benchmark and evaluation results, where people look rather than read.

matplotlib is optional (the extra `bench`: `pip install 'overfill-serve[bench]'`); `available()` says whether
it is installed and `MISSING` is the message to print when it is not. The functions take plain numbers, not
benchmark objects, so any script can use them:

- `latency_plot`: one panel per metric (TTFT, TPOT, e2e, ...), one empirical CDF per series (a mode, or a
  mode at one load level), p50 and p99 marked on each.
- `throughput_plot`: one line per series, y against x (output tokens/s against concurrency or request rate).
- `grouped_bars`: one group per category, one bar per series (scores per task and mode).

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch, no display
needed) and saved as PNG; each function returns the path it wrote.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MISSING = "matplotlib is not installed, so no plots were written (pip install 'overfill-serve[bench]')"
DPI = 110


def available() -> bool:
    """Whether matplotlib can be imported (checked without importing it)."""
    return importlib.util.find_spec("matplotlib") is not None


def _figure(ncols: int, width: float = 4.6, height: float = 3.6) -> tuple[Any, list[Any]]:
    """A headless Figure with `ncols` axes side by side, and the axes."""
    if not available():
        raise ImportError(MISSING)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig: Any, path: str | Path, title: str | None) -> Path:
    if title:
        fig.suptitle(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    k = (len(sorted_values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def latency_plot(
    path: str | Path, metrics: Mapping[str, Mapping[str, Sequence[float]]], title: str | None = None
) -> Path:
    """Empirical CDFs: `metrics` maps a panel's name ("TTFT (s)") to {series label: values}.

    A series keeps its colour in every panel; its p50 is marked with a dot and its p99 with a cross; one
    legend below the panels. Non-finite values are dropped; a series with none left is drawn as nothing."""
    names = list(metrics) or ["(no metrics)"]
    series = list(dict.fromkeys(label for panel in metrics.values() for label in panel))
    colors = {label: f"C{i % 10}" for i, label in enumerate(series)}
    fig, axes = _figure(len(names), height=3.4 + 0.22 * ((len(series) + 3) // 4))
    for ax, name in zip(axes, names):
        for label, values in metrics.get(name, {}).items():
            xs = sorted(v for v in values if math.isfinite(v))
            if not xs:
                continue
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", color=colors[label])
            ax.plot([_quantile(xs, 0.5)], [0.5], "o", color=colors[label])
            ax.plot([_quantile(xs, 0.99)], [0.99], "x", color=colors[label])
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[label], label=label) for label in series]
    handles += [
        Line2D([], [], marker="o", linestyle="", color="gray", label="p50"),
        Line2D([], [], marker="x", linestyle="", color="gray", label="p99"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize="small")
    return _save(fig, path, title)


def throughput_plot(
    path: str | Path,
    curves: Mapping[str, Sequence[tuple[float, float]]],
    xlabel: str,
    ylabel: str,
    title: str | None = None,
) -> Path:
    """Lines with markers: `curves` maps a series label to its (x, y) points (sorted by x here)."""
    fig, (ax,) = _figure(1, width=5.6, height=4.0)
    xs_seen: set[float] = set()
    for label, points in curves.items():
        pts = sorted((x, y) for x, y in points if math.isfinite(x) and math.isfinite(y))
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
        xs_seen.update(x for x, _ in pts)
    if 0 < len(xs_seen) <= 12:
        ax.set_xticks(sorted(xs_seen), [f"{x:g}" for x in sorted(xs_seen)])  # the levels measured
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize="small")
    return _save(fig, path, title)


def grouped_bars(
    path: str | Path,
    values: Mapping[str, Mapping[str, float]],
    ylabel: str,
    title: str | None = None,
) -> Path:
    """Bars: `values` maps a category (a task) to {series label (a mode): value}; missing bars are gaps."""
    categories = list(values)
    series = list(dict.fromkeys(s for by_series in values.values() for s in by_series))
    fig, (ax,) = _figure(1, width=max(5.0, 1.2 * len(categories) * max(1, len(series)) / 2), height=4.0)
    width = 0.8 / max(1, len(series))
    for j, label in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(categories))]
        ys = [values[c].get(label, math.nan) for c in categories]
        bars = ax.bar(xs, ys, width=width, label=label)
        ax.bar_label(bars, fmt="%.3g", fontsize="x-small")
    ax.set_xticks(range(len(categories)), categories)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if series:
        ax.legend(fontsize="small")
    return _save(fig, path, title)
