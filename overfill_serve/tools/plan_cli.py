"""The `overfill-serve plan` command: parse the pair, workload and targets, run `plan()`, print the table."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from overfill_serve.errors import ModelConfigError
from overfill_serve.model.spec import ModelSpec
from overfill_serve.tools.gpu_specs import format_gpu_table, gpu_spec, load_gpu_specs
from overfill_serve.tools.plan import (
    DEPLOYMENTS,
    PRESETS,
    Assumptions,
    PlanRow,
    Targets,
    Workload,
    kv_bytes_per_token,
    plan,
    preset_pair,
)

_HEAD = ("deployment", "prefill GPUs", "decode GPUs", "batch avg/max", "TTFT", "TPOT", "$/h", "$/M out tok")


def format_table(rows: list[PlanRow]) -> str:
    """The rows as an aligned text table, then one line per unmet target."""
    lines: list[tuple[str, ...]] = [_HEAD]
    notes = []
    for r in rows:
        if not r.ok:
            decode = "(shared)" if r.deployment == DEPLOYMENTS[2] else r.decode_gpu
            lines.append((r.deployment, r.prefill_gpu, decode, *(["unmet"] * 5)))
            notes += [f"  {r.deployment}: {why}" for why in r.unmet]
            continue
        assert r.ttft_s is not None and r.tpot_s is not None and r.usd_per_hour is not None
        assert r.usd_per_m_tokens is not None and r.decode_batch is not None
        lines.append(
            (
                r.deployment,
                f"{r.prefill_gpu}x{r.prefill_replicas}",
                "(shared)" if r.deployment == DEPLOYMENTS[2] else f"{r.decode_gpu}x{r.decode_replicas}",
                f"{r.decode_batch:.1f}/{r.decode_batch_max}",
                f"{r.ttft_s * 1e3:.0f} ms",
                f"{r.tpot_s * 1e3:.1f} ms",
                f"{r.usd_per_hour:.2f}",
                f"{r.usd_per_m_tokens:.3f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(_HEAD))]
    text = [
        "  ".join(c.ljust(wd) if i < 3 else c.rjust(wd) for i, (c, wd) in enumerate(zip(ln, widths)))
        for ln in lines
    ]
    return "\n".join([*text, *(["targets not met:", *notes] if notes else [])])


def _summary(teacher: ModelSpec, student: ModelSpec, w: Workload, t: Targets, a: Assumptions) -> str:
    def size(m: ModelSpec) -> str:
        return f"{m.num_parameters() / 1e9:.2f}B params ({m.num_parameters() * a.dtype_bytes / 1e9:.1f} GB)"

    kv_t, kv_s = (kv_bytes_per_token(m, a.dtype_bytes) / 1024 for m in (teacher, student))
    return (
        f"teacher {size(teacher)}, KV {kv_t:.0f} KiB/token; student {size(student)}, KV {kv_s:.0f} KiB/token\n"
        f"workload {w.rate_rps:g} req/s, {w.prompt_tokens:g} prompt + {w.output_tokens:g} output tokens; "
        f"targets TTFT <= {t.ttft_s * 1e3:g} ms, TPOT <= {t.tpot_s * 1e3:g} ms\n"
        f"MFU {a.mfu:g}, MBU {a.mbu:g}, prefill util <= {a.max_prefill_util:g}, memory util {a.mem_util:g}, "
        f"KV link {a.link_gbps:g} GB/s, decode batch <= {a.max_decode_batch}"
    )


def run_plan(args: argparse.Namespace, out: TextIO = sys.stdout) -> list[PlanRow]:
    """The `plan` subcommand: print the summary and table, return the rows."""
    table = load_gpu_specs(args.gpu_specs)
    if args.list_gpus:
        print(format_gpu_table(table), file=out)
        return []
    if args.preset:
        if args.prefill_model or args.decode_model:
            raise ModelConfigError("--preset: give either a preset or model directories, not both")
        teacher, student = preset_pair(args.preset)
    elif args.prefill_model and args.decode_model:
        teacher, student = ModelSpec.from_dir(args.prefill_model), ModelSpec.from_dir(args.decode_model)
    else:
        raise ModelConfigError("--preset or both --prefill-model and --decode-model are required")
    if args.rate is None:
        raise ModelConfigError("--rate (requests/s) is required")
    workload = Workload(args.rate, args.prompt_tokens, args.output_tokens)
    targets = Targets(args.ttft_ms / 1e3, args.tpot_ms / 1e3)
    assumptions = Assumptions(**{k: getattr(args, k) for k in _ASSUMPTION_FLAGS})
    prefill_gpu = gpu_spec(args.prefill_gpu, table, "--prefill-gpu")
    decode_gpu = gpu_spec(args.decode_gpu, table, "--decode-gpu")
    rows = plan(teacher, student, prefill_gpu, decode_gpu, workload, targets, assumptions)
    print(_summary(teacher, student, workload, targets, assumptions), file=out)
    print(format_table(rows), file=out)
    return rows


_ASSUMPTION_FLAGS = ("mfu", "mbu", "max_prefill_util", "mem_util", "link_gbps", "max_decode_batch")


def add_plan_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register `overfill-serve plan` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "plan",
        help="estimate replicas and $/M tokens for OverFill vs full-model deployments (roofline model)",
        description="Roofline capacity plan; the model is described in docs/capacity_planning.md.",
    )
    p.add_argument("--preset", choices=list(PRESETS), help="built-in pair shapes (no checkpoints needed)")
    p.add_argument("--prefill-model", help="teacher model directory (config.json)")
    p.add_argument("--decode-model", help="student model directory (config.json)")
    p.add_argument("--prefill-gpu", default="H100", help="GPU type of the prefill (big) pool")
    p.add_argument("--decode-gpu", default="L4", help="GPU type of the decode (cheap) pool")
    p.add_argument("--gpu-specs", help="TOML or JSON table adding / replacing GPU types")
    p.add_argument("--list-gpus", action="store_true", help="print the GPU table and exit")
    p.add_argument("--rate", type=float, help="arrival rate, requests/s (required)")
    p.add_argument("--prompt-tokens", type=float, default=2000.0, help="mean prompt length")
    p.add_argument("--output-tokens", type=float, default=200.0, help="mean output length")
    p.add_argument("--ttft-ms", type=float, default=1000.0, help="mean time-to-first-token target")
    p.add_argument("--tpot-ms", type=float, default=50.0, help="mean time-per-output-token target")
    d = Assumptions()
    for flag, field, kind, what in (
        ("--mfu", "mfu", float, "model FLOP/s utilization"),
        ("--mbu", "mbu", float, "memory bandwidth utilization"),
        ("--max-util", "max_prefill_util", float, "prefill replica busy cap"),
        ("--mem-util", "mem_util", float, "GPU memory fraction for weights + KV"),
        ("--link-gbps", "link_gbps", float, "KV link bandwidth, GB/s (bytes)"),
        ("--max-batch", "max_decode_batch", int, "decode batch cap per replica"),
    ):
        p.add_argument(flag, type=kind, default=getattr(d, field), dest=field, help=what)
    p.set_defaults(func=run_plan)
    return p
