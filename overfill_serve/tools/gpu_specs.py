"""Per-GPU-type figures for capacity planning (`overfill-serve plan`), and the loader for a user's own table.

Bandwidth and dense bf16 tensor throughput are the vendors' datasheet peaks (no sparsity); the planner scales
them by MFU / MBU. Prices are illustrative round per-GPU on-demand rental rates (2025–26); they vary 2–4x
between providers and commitments, so pass `--gpu-specs` with your own before trusting a $ figure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from overfill_serve.errors import ModelConfigError


@dataclass(frozen=True)
class GpuSpec:
    """One GPU type. Units: GB/s (1e9 bytes), TFLOP/s (1e12), GB (1e9 bytes), US$ per GPU-hour."""

    name: str
    mem_bw_gbps: float
    bf16_tflops: float
    memory_gb: float
    usd_per_hour: float

    def __post_init__(self) -> None:
        for f in fields(self)[1:]:
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ModelConfigError(
                    f"GPU {self.name!r}: {f.name} must be a positive number, got {value!r}"
                )


BUILTIN_GPUS: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        GpuSpec("H200", mem_bw_gbps=4800, bf16_tflops=989, memory_gb=141, usd_per_hour=3.50),
        GpuSpec("H100", mem_bw_gbps=3350, bf16_tflops=989, memory_gb=80, usd_per_hour=2.70),  # SXM
        GpuSpec("A100-80G", mem_bw_gbps=2039, bf16_tflops=312, memory_gb=80, usd_per_hour=1.60),  # SXM
        GpuSpec("L40S", mem_bw_gbps=864, bf16_tflops=362, memory_gb=48, usd_per_hour=1.00),
        GpuSpec("L4", mem_bw_gbps=300, bf16_tflops=121, memory_gb=24, usd_per_hour=0.60),
        GpuSpec("A10G", mem_bw_gbps=600, bf16_tflops=70, memory_gb=24, usd_per_hour=1.00),  # AWS g5 only
    )
}

_KEYS = tuple(f.name for f in fields(GpuSpec))[1:]


def load_gpu_specs(path: str | Path | None = None) -> dict[str, GpuSpec]:
    """The built-in table, with the entries of `path` (TOML or JSON) added or replacing same-named ones.

    File shape: one table per GPU, e.g. TOML `[H100]` / JSON `{"H100": {...}}`, with the keys
    mem_bw_gbps, bf16_tflops, memory_gb, usd_per_hour (all required: a half-overridden row is a typo).
    """
    table = dict(BUILTIN_GPUS)
    if path is None:
        return table
    p = Path(path)
    try:
        text = p.read_text()
        raw: Any = json.loads(text) if p.suffix == ".json" else _toml().loads(text)
    except (OSError, ValueError) as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ModelConfigError(f"--gpu-specs {path}: cannot read: {e}") from e
    if not isinstance(raw, dict):
        raise ModelConfigError(f"--gpu-specs {path}: expected a table of GPU types")
    for name, row in raw.items():
        if not isinstance(row, dict):
            raise ModelConfigError(f"--gpu-specs {path}: [{name}] must be a table of {', '.join(_KEYS)}")
        missing, unknown = set(_KEYS) - set(row), set(row) - set(_KEYS)
        if missing or unknown:
            raise ModelConfigError(
                f"--gpu-specs {path}: [{name}] missing {sorted(missing)}, unknown {sorted(unknown)}; "
                f"keys are {', '.join(_KEYS)}"
            )
        key = _canonical(name, table) or name
        table[key] = GpuSpec(key, **row)
    return table


def _toml() -> Any:
    try:
        import tomllib  # Python 3.11+
    except ImportError:  # pragma: no cover - 3.10
        raise ModelConfigError("--gpu-specs: TOML needs Python 3.11+; pass a .json file instead") from None
    return tomllib


def _canonical(name: str, table: dict[str, GpuSpec]) -> str | None:
    # GPU names are matched case-insensitively ("h100" is "H100").
    return next((k for k in table if k.lower() == name.lower()), None)


def gpu_spec(name: str, table: dict[str, GpuSpec], arg: str = "gpu") -> GpuSpec:
    """Look up `name` (case-insensitive); `arg` names the option in the error."""
    key = _canonical(name, table)
    if key is None:
        raise ModelConfigError(f"{arg}: unknown GPU type {name!r}; known: {', '.join(table)}")
    return table[key]


def format_gpu_table(table: dict[str, GpuSpec]) -> str:
    rows = [f"{'GPU':<9} {'GB/s':>5}  {'bf16 TFLOP/s':>12}  {'memory GB':>9}  $/h"]
    rows += [
        f"{g.name:<9} {g.mem_bw_gbps:>5g}  {g.bf16_tflops:>12g}  {g.memory_gb:>9g}  {g.usd_per_hour:.2f}"
        for g in table.values()
    ]
    return "\n".join(rows)
