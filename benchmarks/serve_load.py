"""Serve load: an OpenAI-API load generator against the overfill-serve Ray Serve application, and the Serve path's
added latency over the offline engine.

Every request is `POST /v1/completions` with `stream: true`, a token-id prompt, `max_tokens` = its drawn
output length, `temperature: 0` and `ignore_eos: true`; TTFT and inter-token times are measured client-side
from the SSE chunks (loopback only).

Part 1 (load), for each mode in `--modes` (`overfill` = model "<pair>", `full` = "<pair>:full", `pruned` =
"<pair>:pruned"), the same seeded requests arrive either as a Poisson process at `--rate` req/s or from
`--concurrency` closed-loop clients; a comma-separated list of rates or concurrencies runs each level in turn
(a sweep). Printed per mode and level: TTFT, TPOT (mean gap between output tokens after the first:
(e2e - TTFT) / (tokens - 1)), ITL (gap between consecutive SSE chunks) and end-to-end latency
(mean/p50/p90/p99), request and output-token throughput, and goodput under an SLO (requests with
TTFT <= --slo-ttft and TPOT <= --slo-tpot). Plotted (PNG, in `--plot-dir`, default ./serve-load-plots; needs
matplotlib, the `bench` extra, else a one-line notice): TTFT / TPOT / e2e CDFs per mode and level
(`*-latency.png`) and output tokens/s against the level per mode (`*-throughput.png`). On a terminal a
progress bar counts each run's finished requests (on stderr).

Part 2 (Serve overhead): a handful of requests, one at a time, each through the app (HTTP, as in part 1) and
through an in-process `overfill_serve.LLM(...).generate` on the same model(s) and mode (e2e: the call's wall
time; TTFT: the engine's first-token stamp), interleaved so that load drift hits both; the median TTFT and e2e
of each and the difference (HTTP proxy + ingress + deployment-handle calls + KV channel + SSE). The offline
engine runs on `--offline-threads` torch threads (default: what Ray gives a replica with fractional num_cpus,
1), so the difference is the path, not the thread count. Also printed: the round trip of `GET /health` (proxy
+ ingress, no model) and, for an in-process app, of one deployment-handle call (`stats`).

Without `--url`, the script starts the app itself, as tests/serve_harness.py does (a local Ray with logical
CPUs, cluster/config.yaml's application args and deployment options, HTTP on a free loopback port), on the
embedded default model (`--pair default`: the same model on both stages) or on a pruned pair (`--pair
pruned`): the default model as teacher and a student made by `prune_model` (hidden 288, intermediate 768 by
default). The student is NOT distilled: its text is garbage, only its speed means anything. After the run it
checks the replicas' KV pools are whole again (free_blocks == total_blocks, no open transfers).

    PYTHONPATH=. python benchmarks/serve_load.py --pair pruned --concurrency 4 --num-requests 24 \\
        --prompt-len 32:128 --output-len 16:64
    PYTHONPATH=. python benchmarks/serve_load.py --pair pruned --concurrency 1,2,4,8 --modes overfill,full
    PYTHONPATH=. python benchmarks/serve_load.py --quick
    PYTHONPATH=. python benchmarks/serve_load.py --url http://127.0.0.1:8000 --rate 1 --num-requests 32

A first token whose text the detokenizer holds back (a partial UTF-8 character) is seen with the next
chunk, so TTFT can include one extra decode step on rare prompts; token counts come from the final usage
chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_common import (
    Req,
    command_line,
    corpus_token_ids,
    load_average,
    make_workload,
    parse_range,
    utc_date,
)
from load_client import http_rtt, run_load
from load_report import LoadResult, print_latency, print_ratios, print_throughput, write_plots
from serve_app import (
    MODE_SUFFIX,
    handle_rtt,
    kv_check,
    machine_line,
    make_pair,
    replica_threads,
    start_app,
)
from serve_overhead import overhead, print_overhead


# ----------------------------------------------------------------------------------------------------------
def parse_levels(kind: type) -> Callable[[str], list]:
    """An argparse type: a comma-separated list of positive numbers ("1,2,4")."""

    def parse(text: str) -> list:
        try:
            values = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            values = []
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"{text!r}: want positive numbers, comma-separated")
        return values

    return parse


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running app (e.g. http://127.0.0.1:8000); default: start one in-process")
    ap.add_argument("--model", help="the pair's model name (default: the app's; with --url, from /v1/models)")
    ap.add_argument(
        "--pair",
        choices=["default", "pruned", "tiny"],
        default="default",
        help="in-process app: the embedded model on both stages, it + a pruned student, or a tiny random pair",
    )
    ap.add_argument("--prune-hidden", type=int, default=288)
    ap.add_argument("--prune-intermediate", type=int, default=768)
    ap.add_argument("--prefill-model", type=Path, help="with --url: model dirs for the offline comparison")
    ap.add_argument("--decode-model", type=Path)
    ap.add_argument("--modes", default="overfill,full", help="comma-separated: overfill, full, pruned")
    ap.add_argument("--rate", type=parse_levels(float), help="Poisson arrivals, req/s; a list sweeps (1,2,4)")
    ap.add_argument(
        "--concurrency",
        type=parse_levels(int),
        help="closed-loop clients (default 4), a list sweeps (1,2,4,8); with --rate, one cap",
    )
    ap.add_argument("--num-requests", type=int, help="per mode and level (default 32; --quick 6)")
    ap.add_argument("--prompt-len", type=parse_range, help="LO:HI tokens, uniform (default 32:256)")
    ap.add_argument("--output-len", type=parse_range, help="LO:HI tokens, uniform (default 16:128)")
    ap.add_argument("--slo-ttft", type=float, default=2.0, help="seconds")
    ap.add_argument("--slo-tpot", type=float, default=0.2, help="seconds")
    ap.add_argument("--overhead-requests", type=int, help="part 2, per mode (default 5; --quick 2; 0: skip)")
    ap.add_argument(
        "--offline-threads", type=int, help="torch threads of the offline engine (default: a replica's)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    ap.add_argument("--max-duration", type=float, default=300.0, help="per mode and level's run, seconds")
    ap.add_argument("--plot-dir", type=Path, default=Path("serve-load-plots"), help="PNG plots go here")
    ap.add_argument("--no-plots", action="store_true", help="tables only")
    ap.add_argument("--quick", action="store_true", help="smoke run: few, short requests")
    args = ap.parse_args()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in args.modes:
        if m not in MODE_SUFFIX:
            ap.error(f"unknown mode {m!r}; use {sorted(MODE_SUFFIX)}")
    if args.rate and args.concurrency and len(args.concurrency) > 1:
        ap.error("with --rate (the swept level), --concurrency is one cap, not a list")
    return args


@dataclass
class App:
    url: str
    pair: str
    prefill_dir: Path
    decode_dir: Path
    config: Any = None  # the in-process app's AppConfig; None for --url


def own_app(args: argparse.Namespace, tmp: Path) -> App:
    prefill_dir, decode_dir, desc = make_pair(args.pair, tmp, args.prune_hidden, args.prune_intermediate)
    t = time.perf_counter()
    url, app_config = start_app(prefill_dir, decode_dir)
    prefill, decode = app_config.prefill, app_config.decode
    print(f"pair {desc}")
    print(
        f"app: in-process Serve app on {url} (cluster/config.yaml args: block_size "
        f"{prefill.block_size}, kv blocks {prefill.num_kv_blocks}/{decode.num_kv_blocks}, "
        f"max_num_seqs {decode.max_num_seqs}, transfer "
        f"{app_config.transfer.get('backend', 'grpc')}; 1 PrefillServer + 1 DecodeServer + "
        f"1 Ingress replica, torch threads per replica {replica_threads()}), started in "
        f"{time.perf_counter() - t:.1f} s"
    )
    return App(url, args.model or app_config.pair_name, prefill_dir, decode_dir, app_config)


def remote_app(args: argparse.Namespace) -> App:
    import urllib.request

    from overfill_serve.tools.default_model import default_model_dir

    url = args.url.rstrip("/")
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as r:
        listing = json.loads(r.read())
    ids = [m["id"] for m in listing["data"]]
    pair = args.model or next(i for i in ids if ":" not in i)
    ext = next((m.get("overfill", {}) for m in listing["data"] if m["id"] == pair), {})
    print(f"app: {url}, models {ids}; {pair}: {ext}")
    prefill_dir = args.prefill_model or default_model_dir()
    return App(url, pair, prefill_dir, args.decode_model or prefill_dir)


def run_part1(args: argparse.Namespace, app: App, reqs: list[Req]) -> tuple[list[LoadResult], str]:
    """Each mode at each load level; a progress bar per run on a terminal. Returns the results and the
    level's name ("conc" or "req/s")."""
    from overfill_serve.tools.progress import bar

    levels = args.rate or args.concurrency or [4]
    level_name = "req/s" if args.rate else "conc"
    cap = args.concurrency[0] if args.rate and args.concurrency else None
    results = []
    for mode in args.modes:
        model = app.pair + MODE_SUFFIX[mode]
        warm, _ = asyncio.run(
            run_load(app.url, model, [Req(reqs[0].prompt[:16], 4)] * 2, None, 2, 0, args.timeout, 60)
        )
        if not all(o.ok for o in warm):
            print(f"warm-up of {model} failed: {[o.error for o in warm]}")
        for level in levels:
            rate, conc = (level, cap) if args.rate else (None, int(level))
            with bar(len(reqs), f"{mode} at {level:g} {level_name}", "req") as progress:
                step = lambda _outcome, p=progress: p.update(1)  # noqa: E731
                run = run_load(
                    app.url, model, reqs, rate, conc, args.seed, args.timeout, args.max_duration, step
                )
                outcomes, wall = asyncio.run(run)
            results.append(LoadResult(mode, level, outcomes, wall))
            print(f"  {mode} at {level:g} {level_name}: {wall:.1f} s, load {load_average()}", file=sys.stderr)
    return results, level_name


def report_part1(args: argparse.Namespace, app: App, results: list[LoadResult], level_name: str) -> None:
    print()
    print_latency(results, level_name)
    print()
    print_throughput(results, level_name, args.slo_ttft, args.slo_tpot)
    print_ratios(results, level_name)
    if args.no_plots:
        return
    from overfill_serve.tools import plots

    if not plots.available():
        print(f"plots: {plots.MISSING}")
        return
    arrivals = "Poisson arrivals" if args.rate else "closed loop"
    title = f"serve_load: {app.pair}, {arrivals}, {len(results[0].outcomes)} requests per run"
    paths = write_plots(results, args.plot_dir, level_name, title)
    print("plots: " + ", ".join(str(p) for p in paths))


def run_part2(args: argparse.Namespace, app: App, reqs: list[Req], n_over: int) -> None:
    import torch

    from overfill_serve import LLM

    own = app.config is not None
    threads = args.offline_threads or (replica_threads() if own else 1)
    torch.set_num_threads(threads)
    blocks = app.config.decode.num_kv_blocks if own else 512
    llm = LLM(app.prefill_dir, app.decode_dir, num_kv_blocks=blocks, max_num_seqs=32)
    over_reqs = reqs[:n_over]
    print("\n## Part 2: Serve path vs offline engine, one request at a time")
    print(
        f"{n_over} requests per mode (the first of part 1: prompt "
        f"{', '.join(str(len(r.prompt)) for r in over_reqs)} tokens, output "
        f"{', '.join(str(r.max_tokens) for r in over_reqs)} tokens), interleaved; Serve = streamed "
        f"HTTP to the app, LLM = in-process overfill_serve.LLM(same models, {blocks} KV blocks)"
        f".generate on {threads} torch thread(s) like a replica (TTFT: its first-token stamp); medians"
    )
    rows = overhead(app.url, app.pair, args.modes, over_reqs, llm, args.timeout)
    print()
    print_overhead(rows)
    health = asyncio.run(http_rtt(app.url, 20))
    line = f"round trips (median of 20): GET /health (HTTP proxy + ingress, no model) {1000 * health:.1f} ms"
    if own:
        line += f"; one DecodeServer handle call from the driver (stats) {1000 * handle_rtt():.1f} ms"
    print(line)


def main() -> int:
    args = parse_args()
    q = args.quick
    n = args.num_requests or (6 if q else 32)
    prompt_range = args.prompt_len or ((16, 48) if q else (32, 256))
    output_range = args.output_len or ((8, 16) if q else (16, 128))
    n_over = args.overhead_requests if args.overhead_requests is not None else (2 if q else 5)
    print("# overfill-serve Serve load benchmark")
    print(f"date: {utc_date()}\ncommand: {command_line('benchmarks/serve_load.py')}\n{machine_line()}")

    t_start = time.perf_counter()
    leak_ok = True
    with tempfile.TemporaryDirectory(prefix="overfill-serve-load-") as tmp:
        app = remote_app(args) if args.url else own_app(args, Path(tmp))
        from overfill_serve.tokenizer import load_tokenizer

        reqs = make_workload(
            corpus_token_ids(load_tokenizer(app.prefill_dir)), n, prompt_range, output_range, args.seed
        )
        print(f"\n## Part 1: load ({arrival(args)})")
        print(
            f"workload: {n} requests per mode and level, prompt {prompt_range[0]}-{prompt_range[1]} tokens "
            f"(total {sum(len(r.prompt) for r in reqs)}), output {output_range[0]}-{output_range[1]} tokens "
            f"(total {sum(r.max_tokens for r in reqs)}), seed {args.seed}, token-id prompts, temperature 0, "
            "ignore_eos, streamed /v1/completions"
        )
        report_part1(args, app, *run_part1(args, app, reqs))
        if app.config is not None:
            print()
            leak_ok = kv_check()
        if n_over > 0:
            run_part2(args, app, reqs, n_over)
            if app.config is not None:
                print()
                leak_ok = kv_check() and leak_ok
        if app.config is not None:
            shutdown()
    print(f"\ntotal runtime {time.perf_counter() - t_start:.0f} s, load average at end {load_average()}")
    return 0 if leak_ok else 1


def arrival(args: argparse.Namespace) -> str:
    if args.rate:
        cap = f", at most {args.concurrency[0]} in flight" if args.concurrency else ""
        return f"Poisson {', '.join(f'{r:g}' for r in args.rate)} req/s{cap}"
    return f"closed loop, concurrency {', '.join(str(c) for c in args.concurrency or [4])}"


def shutdown() -> None:
    import ray
    from ray import serve

    with contextlib.redirect_stdout(io.StringIO()):  # Ray's shutdown chatter
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
