"""Soak (issue 11): N closed-loop streaming clients for M minutes over every mode ("<pair>", "<pair>:full",
"<pair>:pruned") of the overfill-serve Ray Serve app, started in this process (serve_app.start_app).

Clients cycle through fixed token-id prompts per mode (`ignore_eos`, fixed `max_tokens`; even prompts greedy,
odd ones sampled with a fixed seed unless `--greedy-only`), streaming `/v1/completions` over HTTP; every
`--grpc-every`-th client streams gRPC `GenerateStream` (GRPCClient) instead. A warm-up phase, then the load
phase; each ends when its last request does. Exit code 1 unless all of these hold:
- no errors (by kind) and no hangs (no event for `--stall` s, or not done within `--deadline` s);
- determinism: each result equals the first of its (mode, prompt), and the first `--reference-prompts`
  prompts per mode equal an in-process `overfill_serve.LLM` on the same models (run after the load);
- KV whole on every prefill and decode replica after each phase (free == total blocks, no open transfers);
- RSS of every replica process (`ServeReplica:<app>:`), idle after the warm-up vs idle at the end, < +5 %.
Also printed: output tok/s and TTFT/TPOT p50/p90 per mode and API, and the over-time ratio: the load's
last window (a minute, or a third of a short run) over its first, in output tok/s and TTFT p50.

    PYTHONPATH=. python benchmarks/soak.py                                 # 64 clients x 10 min
    PYTHONPATH=. python benchmarks/soak.py --clients 8 --minutes 0.5       # quick
    PYTHONPATH=. python benchmarks/soak.py --pair tiny --clients 8 --minutes 1

`--pair default`: the embedded model on both stages; `tiny`: a random-weight teacher and a pruned student
(little compute, many requests); `pruned`: the embedded teacher and a pruned student.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import re
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import serve_app
from bench_common import (
    MiB,
    Req,
    command_line,
    corpus_token_ids,
    load_average,
    make_workload,
    parse_range,
    pct,
    print_head,
    utc_date,
)
from load_client import Outcome, grpc_stream, new_session, stream_completion
from serve_app import APP_NAME, MODE_SUFFIX

SEEDED = {"temperature": 0.8, "top_p": 0.95}
RSS_LIMIT = 0.05  # growth of a replica's RSS from idle after warm-up to idle at the end
RAMP_S = 0.1  # client i starts i * RAMP_S seconds into a phase


# ----------------------------------------------------------------------------------------------------------
# the request rotation and the clients
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One fixed request of the rotation: a mode, a prompt (by index) and its sampling ({}: greedy)."""

    mode: str
    index: int
    req: Req
    sampling: dict[str, Any]

    @property
    def kind(self) -> str:
        return "seeded" if self.sampling else "greedy"

    @property
    def key(self) -> tuple[str, int]:
        return self.mode, self.index


@dataclass
class Record:
    job: Job
    api: str  # "http" | "grpc"
    phase: str  # "warm-up" | "load"
    out: Outcome


@dataclass
class Ctx:
    """What every client of a run shares."""

    url: str
    pair: str
    jobs: list[Job]
    deadline: float
    stall: float
    grpc: Any = None  # a GRPCClient, shared (one channel) by the gRPC clients' threads
    pool: ThreadPoolExecutor | None = None


def make_jobs(corpus: list[int], args: argparse.Namespace) -> list[Job]:
    reqs = make_workload(corpus, args.prompts, args.prompt_len, args.output_len, args.seed)
    jobs = []
    for i, req in enumerate(reqs):
        sampling = {**SEEDED, "seed": 1000 + i} if i % 2 and not args.greedy_only else {}
        jobs += [Job(mode, i, req, sampling) for mode in args.modes]
    return jobs


async def client_loop(ctx: Ctx, session: Any, cid: int, api: str, phase: str, end: float) -> list[Record]:
    """One closed-loop client: the rotation from its own offset, one request at a time, until `end`."""
    await asyncio.sleep(cid * RAMP_S)
    records, i = [], cid * 7
    while time.perf_counter() < end:
        job = ctx.jobs[i % len(ctx.jobs)]
        i += 1
        model = ctx.pair + MODE_SUFFIX[job.mode]
        limits = (ctx.deadline, ctx.stall, job.sampling)
        if api == "grpc":
            loop = asyncio.get_running_loop()
            out = await loop.run_in_executor(ctx.pool, grpc_stream, ctx.grpc, model, job.req, *limits)
        else:
            out = await stream_completion(session, ctx.url, model, job.req, *limits)
        records.append(Record(job, api, phase, out))
    return records


def client_apis(n: int, grpc_every: int) -> list[str]:
    return ["grpc" if grpc_every and cid % grpc_every == grpc_every - 1 else "http" for cid in range(n)]


async def run_phase(
    ctx: Ctx, phase: str, seconds: float, apis: list[str]
) -> tuple[list[Record], float, float]:
    """(records, start, end of sending): every client runs until start + seconds, then finishes its request."""
    t0 = time.perf_counter()
    async with new_session() as session:
        lists = await asyncio.gather(
            *(client_loop(ctx, session, cid, api, phase, t0 + seconds) for cid, api in enumerate(apis))
        )
    done = time.perf_counter()
    print(f"  {phase}: {sum(map(len, lists))} requests in {done - t0:.0f} s, load average {load_average()}")
    return [r for rs in lists for r in rs], t0, t0 + seconds


# ----------------------------------------------------------------------------------------------------------
# checks and figures
# ----------------------------------------------------------------------------------------------------------
def error_kinds(records: list[Record]) -> Counter[str]:
    """Errors by kind: API, mode, and the message with its numbers blanked."""
    return Counter(
        f"{r.api} {r.job.mode}: {re.sub(r'[0-9]+', 'N', r.out.error)[:160]}" for r in records if r.out.error
    )


def mismatches(records: list[Record], refs: dict[tuple[str, int], str]) -> tuple[list[str], Counter[str]]:
    """(mismatch descriptions, results compared by kind): each completed result against the first completed
    result of its (mode, prompt), and those first results against the offline references."""
    first: dict[tuple[str, int], str] = {}
    bad, compared = [], Counter[str]()
    for r in sorted(records, key=lambda r: r.out.start):
        if not r.out.ok:
            continue
        want = first.setdefault(r.job.key, r.out.text)
        compared[r.job.kind] += 1
        if r.out.text != want:
            bad.append(
                f"{r.phase} {r.api} {r.job.key} {r.job.kind}: {r.out.text[:80]!r} != first {want[:80]!r}"
            )
    for key, ref in sorted(refs.items()):
        compared["offline"] += 1
        if key in first and first[key] != ref:
            bad.append(f"offline LLM {key}: served {first[key][:80]!r} != LLM {ref[:80]!r}")
    return bad, compared


def offline_refs(prefill_dir: Path, decode_dir: Path, app_config: Any, jobs: list[Job], n: int) -> dict:
    """The texts an in-process LLM on the same models gives for the first `n` prompts of every mode."""
    import torch

    from overfill_serve import LLM, SamplingParams

    torch.set_num_threads(serve_app.replica_threads())
    decode = app_config.decode
    llm = LLM(prefill_dir, decode_dir, block_size=decode.block_size, num_kv_blocks=decode.num_kv_blocks)
    refs = {}
    for job in (j for j in jobs if j.index < n):
        params = SamplingParams(
            max_tokens=job.req.max_tokens, ignore_eos=True, **{"temperature": 0.0, **job.sampling}
        )
        (out,) = llm.generate([job.req.prompt], params, mode=job.mode)
        refs[job.key] = out.text
    return refs


def window(records: list[Record], t0: float, t1: float) -> tuple[float, float]:
    """(output tok/s, TTFT p50) in [t0, t1): tokens counted when their chunk arrived, TTFT of the requests
    sent in it."""
    tokens, ttfts = 0.0, []
    for o in (r.out for r in records if r.out.ok and r.out.chunk_times):
        tokens += o.tokens / len(o.chunk_times) * sum(t0 <= t < t1 for t in o.chunk_times)
        if t0 <= o.start < t1 and o.ttft is not None:
            ttfts.append(o.ttft)
    return tokens / (t1 - t0), pct(ttfts, 0.5)


def print_latency(records: list[Record], wall: float) -> None:
    head = (
        f"{'mode':<9} {'api':<5} {'done':>6} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p90':>9} "
        f"{'TPOT p50':>9} {'TPOT p90':>9}"
    )
    print_head(head)
    groups: dict[tuple[str, str], list[Outcome]] = {}
    for r in sorted(records, key=lambda r: (list(MODE_SUFFIX).index(r.job.mode), r.api != "http")):
        groups.setdefault((r.job.mode, r.api), []).append(r.out)
    groups["all", "both"] = [r.out for r in records]
    for (mode, api), outs in groups.items():
        ok = [o for o in outs if o.ok]
        ttft = [o.ttft for o in ok if o.ttft is not None]
        tpot = [1000 * o.tpot for o in ok if o.tpot is not None]
        print(
            f"{mode:<9} {api:<5} {len(ok):>6} {sum(o.tokens for o in ok) / wall:10.1f} {pct(ttft, 0.5):8.3f}s "
            f"{pct(ttft, 0.9):8.3f}s {pct(tpot, 0.5):7.1f}ms {pct(tpot, 0.9):7.1f}ms"
        )


def print_over_time(load: list[Record], start: float, end: float) -> None:
    """The ratio line: the load's last window against its first (after the clients' ramp)."""
    w = min(60.0, (end - start) / 3)
    (tps0, ttft0), (tps1, ttft1) = window(load, start, start + w), window(load, end - w, end)
    print(
        f"over time, last {w:.0f} s / first {w:.0f} s of the load: output tok/s {tps1:.1f} / {tps0:.1f} = "
        f"{tps1 / tps0 if tps0 else float('nan'):.2f}x, TTFT p50 {ttft1:.3f} / {ttft0:.3f} s = "
        f"{ttft1 / ttft0 if ttft0 else float('nan'):.2f}x"
    )


def print_rss(before: dict[str, int], after: dict[str, int]) -> float:
    """The RSS table; returns the largest growth (inf when a replica process went or came, or none was seen)."""
    print_head(f"{'replica process':<28} {'after warm-up MiB':>18} {'at end MiB':>11} {'growth':>8}")
    growths = [float("inf")] if not before else []
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name, 0), after.get(name, 0)
        growths.append((b - a) / a if a and b else float("inf"))
        print(f"{name:<28} {a / MiB:18.1f} {b / MiB:11.1f} {growths[-1]:+8.1%}")
    return max(growths)


# ----------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Soak:
    records: list[Record] = field(default_factory=list)
    load_start: float = 0.0
    load_end: float = 0.0  # when the clients stopped sending
    kv_ok: list[bool] = field(default_factory=list)
    rss: list[dict[str, int]] = field(default_factory=list)
    refs: dict[tuple[str, int], str] = field(default_factory=dict)


def idle_checks(soak: Soak, phase: str) -> None:
    """Once a phase's requests are all done: KV whole on every replica, then each replica's RSS."""
    print(f"\nafter the {phase}:")
    soak.kv_ok.append(serve_app.kv_check(wait_s=30.0))
    soak.rss.append(serve_app.replica_rss())


def run_soak(ctx: Ctx, args: argparse.Namespace) -> Soak:
    soak = Soak()
    apis = client_apis(args.clients, args.grpc_every)
    pool_size = max(apis.count("grpc"), 1)
    with ThreadPoolExecutor(pool_size, thread_name_prefix="grpc-client") as ctx.pool:
        records, _, _ = asyncio.run(run_phase(ctx, "warm-up", args.warmup, apis))
        soak.records += records
        idle_checks(soak, "warm-up")
        records, soak.load_start, soak.load_end = asyncio.run(run_phase(ctx, "load", args.minutes * 60, apis))
        soak.records += records
        idle_checks(soak, "load")
    return soak


def report(soak: Soak, args: argparse.Namespace) -> list[str]:
    """Print the figures; returns what failed (empty: a clean soak)."""
    recs, load = soak.records, [r for r in soak.records if r.phase == "load"]
    print("\n## Figures")
    print(
        f"requests: {len(recs)} sent, {sum(r.out.ok for r in recs)} completed ({len(load)} in the load phase)"
    )
    errors = error_kinds(recs)
    hangs = sum(r.out.hang for r in recs)
    print(
        f"errors: {sum(errors.values())} ({hangs} of them hangs: no event for {args.stall:g} s or not done in "
        f"{args.deadline:g} s)"
    )
    for kind, n in errors.most_common(20):
        print(f"  {n} x {kind}")
    bad, compared = mismatches(recs, soak.refs)
    print(
        f"determinism: {compared['greedy']} greedy and {compared['seeded']} seeded results compared with the "
        f"first of their (mode, prompt), {compared['offline']} first results with an offline LLM: "
        f"{len(bad)} mismatches"
    )
    for line in bad[:10]:
        print(f"  {line}")
    print("\nRSS of the replica processes (idle after the warm-up vs idle at the end):")
    worst = print_rss(soak.rss[0], soak.rss[-1])
    wall = soak.load_end - soak.load_start
    print(f"\nload phase ({wall:.0f} s of sending):")
    print_latency(load, wall)
    print_over_time(load, soak.load_start + args.clients * RAMP_S, soak.load_end)
    failures = [f"{sum(errors.values())} errors"] if errors else []
    failures += [f"{hangs} hangs"] if hangs else []
    failures += [f"{len(bad)} mismatches"] if bad else []
    failures += ["KV not whole"] if not all(soak.kv_ok) else []
    failures += [f"RSS growth {worst:+.1%} >= {RSS_LIMIT:.0%}"] if worst >= RSS_LIMIT else []
    return failures


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64, help="concurrent streaming clients")
    ap.add_argument("--minutes", type=float, default=10.0, help="the load phase, after the warm-up")
    ap.add_argument(
        "--warmup",
        type=float,
        default=60.0,
        help="seconds; shorter: RSS may still climb to its high-water mark",
    )
    ap.add_argument("--pair", choices=["default", "pruned", "tiny"], default="default")
    ap.add_argument("--prune-hidden", type=int, default=288, help="--pair pruned: the student's hidden size")
    ap.add_argument("--prune-intermediate", type=int, default=768)
    ap.add_argument("--modes", default="overfill,full,pruned", help="comma-separated: overfill, full, pruned")
    ap.add_argument("--grpc-every", type=int, default=4, help="every k-th client uses gRPC (0: none)")
    ap.add_argument("--greedy-only", action="store_true", help="no seeded sampled requests")
    ap.add_argument("--prompts", type=int, default=8, help="fixed prompts per mode")
    ap.add_argument("--prompt-len", type=parse_range, default=(16, 128), help="LO:HI tokens")
    ap.add_argument("--output-len", type=parse_range, default=(8, 48), help="LO:HI tokens")
    ap.add_argument("--reference-prompts", type=int, default=2, help="per mode, checked against offline LLM")
    ap.add_argument("--stall", type=float, default=60.0, help="seconds without an event: a hang")
    ap.add_argument("--deadline", type=float, default=300.0, help="seconds for a request: else a hang")
    ap.add_argument("--http-port", type=int, default=38000)
    ap.add_argument("--grpc-port", type=int, default=39000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in MODE_SUFFIX for m in args.modes):
        ap.error(f"--modes: choose from {sorted(MODE_SUFFIX)}")
    return args


def start(args: argparse.Namespace, tmp: Path) -> tuple[Ctx, Path, Path, Any]:
    """Make the pair, start the app, build the rotation; print what runs. Returns (ctx without its gRPC
    client, prefill dir, decode dir, the app's ServeConfig)."""
    t = time.perf_counter()
    prefill_dir, decode_dir, desc = serve_app.make_pair(
        args.pair, tmp, args.prune_hidden, args.prune_intermediate
    )
    url, app_config = serve_app.start_app(prefill_dir, decode_dir, args.http_port, args.grpc_port)
    print(f"pair {desc}")
    print(
        f"app: {url}, gRPC 127.0.0.1:{args.grpc_port} (cluster/config.yaml: 1 PrefillServer, 1 DecodeServer, "
        f"1 Ingress; kv blocks {app_config.prefill.num_kv_blocks}/{app_config.decode.num_kv_blocks}), "
        f"started in {time.perf_counter() - t:.0f} s"
    )
    from overfill_serve.tokenizer import load_tokenizer

    jobs = make_jobs(corpus_token_ids(load_tokenizer(prefill_dir)), args)
    print(
        f"rotation: {args.prompts} prompts x modes {', '.join(args.modes)}; prompt tokens "
        f"{sorted({len(j.req.prompt) for j in jobs})}, output tokens {sorted({j.req.max_tokens for j in jobs})}"
    )
    print(
        f"{args.clients} clients ({client_apis(args.clients, args.grpc_every).count('grpc')} over gRPC), "
        f"warm-up {args.warmup:.0f} s, load {args.minutes:g} min"
    )
    return (
        Ctx(url, app_config.pair_name, jobs, args.deadline, args.stall),
        prefill_dir,
        decode_dir,
        app_config,
    )


def main() -> int:
    args = parse_args()
    print(f"# overfill-serve soak\ndate: {utc_date()}\ncommand: {command_line('benchmarks/soak.py')}")
    print(serve_app.machine_line())
    t_start = time.perf_counter()
    import ray
    from ray import serve

    from overfill_serve.tools.client import GRPCClient

    with tempfile.TemporaryDirectory(prefix="overfill-serve-soak-") as tmp:
        try:
            ctx, prefill_dir, decode_dir, app_config = start(args, Path(tmp))
            with GRPCClient(f"127.0.0.1:{args.grpc_port}", APP_NAME, timeout=args.deadline) as ctx.grpc:
                soak = run_soak(ctx, args)
            soak.refs = offline_refs(prefill_dir, decode_dir, app_config, ctx.jobs, args.reference_prompts)
            failures = report(soak, args)
        finally:
            with contextlib.redirect_stdout(io.StringIO()):  # Ray's shutdown chatter
                serve.shutdown()
                ray.shutdown()
    print(f"\ntotal runtime {time.perf_counter() - t_start:.0f} s, load average at end {load_average()}")
    print("verdict: " + ("PASS" if not failures else "FAIL: " + "; ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
