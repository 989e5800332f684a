"""Serve load: an OpenAI-API load generator against the overfill-serve Ray Serve application, and the Serve path's
added latency over the offline engine.

Every request is `POST /v1/completions` with `stream: true`, a token-id prompt, `max_tokens` = its drawn
output length, `temperature: 0` and `ignore_eos: true`; TTFT and inter-token times are measured client-side
from the SSE chunks (loopback only).

Part 1 (load), for each mode in `--modes` (`overfill` = model "<pair>", `full` = "<pair>:full", `pruned` =
"<pair>:pruned"), the same seeded requests arrive either as a Poisson process at `--rate` req/s or from
`--concurrency` closed-loop clients. Printed: TTFT, TPOT (mean gap between output tokens after the first:
(e2e - TTFT) / (tokens - 1)), ITL (gap between consecutive SSE chunks) and end-to-end latency
(mean/p50/p90/p99), request and output-token throughput, and goodput under an SLO (requests with
TTFT <= --slo-ttft and TPOT <= --slo-tpot).

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
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench_common import (
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
from load_client import Outcome, http_rtt, run_load
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
# part 1: load
# ----------------------------------------------------------------------------------------------------------
@dataclass
class LoadResult:
    mode: str
    outcomes: list[Outcome]
    wall: float


def print_load(results: list[LoadResult], slo_ttft: float, slo_tpot: float) -> None:
    head = f"{'mode':<9} {'metric':<9} {'mean':>8} {'p50':>8} {'p90':>8} {'p99':>8}"
    print_head(head)
    for r in results:
        ok = [o for o in r.outcomes if o.ok]
        rows = [
            ("TTFT s", [o.ttft for o in ok if o.ttft is not None]),
            ("TPOT ms", [1000 * o.tpot for o in ok if o.tpot is not None]),
            ("ITL ms", [1000 * g for o in ok for g in o.itl]),
            ("e2e s", [o.e2e for o in ok if o.e2e is not None]),
        ]
        for name, vals in rows:
            if not vals:
                print(f"{r.mode:<9} {name:<9} {'-':>8}")
                continue
            f = "{:8.1f}" if "ms" in name else "{:8.3f}"
            cells = " ".join(
                f.format(v) for v in (statistics.mean(vals), pct(vals, 0.5), pct(vals, 0.9), pct(vals, 0.99))
            )
            print(f"{r.mode:<9} {name:<9} {cells}")
    print()
    head = (
        f"{'mode':<9} {'ok/sent':>8} {'wall s':>7} {'req/s':>6} {'out tok/s':>10} "
        f"{'goodput':>8} {'good req/s':>11}"
    )
    print_head(head)
    for r in results:
        ok = [o for o in r.outcomes if o.ok]
        good = [
            o
            for o in ok
            if o.ttft is not None and o.ttft <= slo_ttft and (o.tpot is None or o.tpot <= slo_tpot)
        ]
        n = len(r.outcomes)
        print(
            f"{r.mode:<9} {f'{len(ok)}/{n}':>8} {r.wall:7.1f} {len(ok) / r.wall:6.2f} "
            f"{sum(o.tokens for o in ok) / r.wall:10.1f} {len(good) / n:8.0%} {len(good) / r.wall:11.2f}"
        )
    print(f"goodput: requests with TTFT <= {slo_ttft:g} s and TPOT <= {slo_tpot:g} s (fraction of all sent)")
    for r in results:
        errors = [o.error for o in r.outcomes if o.error]
        if errors:
            counts: dict[str, int] = {}
            for e in errors:
                counts[e] = counts.get(e, 0) + 1
            for e, c in sorted(counts.items(), key=lambda kv: -kv[1]):
                print(f"ERRORS {r.mode}: {c} x {e}")


# ----------------------------------------------------------------------------------------------------------
def main() -> int:
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
    ap.add_argument("--rate", type=float, help="Poisson arrivals, requests/s (default: closed loop)")
    ap.add_argument("--concurrency", type=int, help="closed-loop clients (default 4); with --rate, a cap")
    ap.add_argument("--num-requests", type=int, help="per mode (default 32; --quick 6)")
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
    ap.add_argument("--max-duration", type=float, default=300.0, help="per mode's load run, seconds")
    ap.add_argument("--quick", action="store_true", help="smoke run: few, short requests")
    args = ap.parse_args()

    q = args.quick
    n = args.num_requests or (6 if q else 32)
    prompt_range = args.prompt_len or ((16, 48) if q else (32, 256))
    output_range = args.output_len or ((8, 16) if q else (16, 128))
    n_over = args.overhead_requests if args.overhead_requests is not None else (2 if q else 5)
    concurrency = args.concurrency or (None if args.rate else 4)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODE_SUFFIX:
            ap.error(f"unknown mode {m!r}; use {sorted(MODE_SUFFIX)}")

    import ray
    import torch

    print("# overfill-serve Serve load benchmark")
    print(f"date: {utc_date()}")
    print(f"command: {command_line('benchmarks/serve_load.py')}")
    print(machine_line())

    t_start = time.perf_counter()
    leak_ok = True
    with tempfile.TemporaryDirectory(prefix="overfill-serve-load-") as tmp:
        own_app = args.url is None
        if own_app:
            prefill_dir, decode_dir, desc = make_pair(
                args.pair, Path(tmp), args.prune_hidden, args.prune_intermediate
            )
            t = time.perf_counter()
            url, app_config = start_app(prefill_dir, decode_dir)
            pair, prefill, decode = app_config.pair_name, app_config.prefill, app_config.decode
            print(f"pair {desc}")
            print(
                f"app: in-process Serve app on {url} (cluster/config.yaml args: block_size "
                f"{prefill.block_size}, kv blocks {prefill.num_kv_blocks}/{decode.num_kv_blocks}, "
                f"max_num_seqs {decode.max_num_seqs}, transfer "
                f"{app_config.transfer.get('backend', 'grpc')}; 1 PrefillServer + 1 DecodeServer + "
                f"1 Ingress replica, torch threads per replica {replica_threads()}), started in "
                f"{time.perf_counter() - t:.1f} s"
            )
        else:
            import urllib.request

            url = args.url.rstrip("/")
            with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as r:
                listing = json.loads(r.read())
            ids = [m["id"] for m in listing["data"]]
            pair = args.model or next(i for i in ids if ":" not in i)
            ext = next((m.get("overfill", {}) for m in listing["data"] if m["id"] == pair), {})
            print(f"app: {url}, models {ids}; {pair}: {ext}")
            from overfill_serve.tools.default_model import default_model_dir

            prefill_dir = args.prefill_model or default_model_dir()
            decode_dir = args.decode_model or prefill_dir
        pair = args.model or pair

        from overfill_serve.tokenizer import load_tokenizer

        corpus = corpus_token_ids(load_tokenizer(prefill_dir))
        reqs = make_workload(corpus, n, prompt_range, output_range, args.seed)
        arrival = (
            f"Poisson {args.rate:g} req/s" + (f", at most {concurrency} in flight" if concurrency else "")
            if args.rate
            else f"closed loop, concurrency {concurrency}"
        )
        print(f"\n## Part 1: load ({arrival})")
        print(
            f"workload: {n} requests per mode, prompt {prompt_range[0]}-{prompt_range[1]} tokens (total "
            f"{sum(len(r.prompt) for r in reqs)}), output {output_range[0]}-{output_range[1]} tokens (total "
            f"{sum(r.max_tokens for r in reqs)}), seed {args.seed}, token-id prompts, temperature 0, "
            "ignore_eos, streamed /v1/completions"
        )
        results = []
        for mode in modes:
            model = pair + MODE_SUFFIX[mode]
            warm, _ = asyncio.run(
                run_load(url, model, [Req(reqs[0].prompt[:16], 4)] * 2, None, 2, 0, args.timeout, 60)
            )
            if not all(o.ok for o in warm):
                print(f"warm-up of {model} failed: {[o.error for o in warm]}")
            outcomes, wall = asyncio.run(
                run_load(url, model, reqs, args.rate, concurrency, args.seed, args.timeout, args.max_duration)
            )
            results.append(LoadResult(mode, outcomes, wall))
            print(f"  {mode}: done in {wall:.1f} s, load average {load_average()}", file=sys.stderr)
        print()
        print_load(results, args.slo_ttft, args.slo_tpot)
        by = {r.mode: r for r in results}
        if "overfill" in by and "full" in by:
            o_, f_ = by["overfill"], by["full"]

            def tps(r: LoadResult) -> float:
                return sum(x.tokens for x in r.outcomes if x.ok) / r.wall

            def med(r: LoadResult, key: str) -> float:
                vals = [getattr(x, key) for x in r.outcomes if x.ok and getattr(x, key) is not None]
                return statistics.median(vals) if vals else float("nan")

            print(
                f"overfill / full: output tok/s {tps(o_) / tps(f_):.2f}x, median TPOT "
                f"{med(o_, 'tpot') / med(f_, 'tpot'):.2f}x, median TTFT {med(o_, 'ttft') / med(f_, 'ttft'):.2f}x, "
                f"median e2e {med(o_, 'e2e') / med(f_, 'e2e'):.2f}x"
            )

        if own_app:
            print()
            leak_ok = kv_check()

        if n_over > 0:
            from overfill_serve import LLM

            threads = args.offline_threads or (replica_threads() if own_app else 1)
            torch.set_num_threads(threads)
            blocks = app_config.decode.num_kv_blocks if own_app else 512
            llm = LLM(prefill_dir, decode_dir, num_kv_blocks=blocks, max_num_seqs=32)
            over_reqs = reqs[:n_over]
            print("\n## Part 2: Serve path vs offline engine, one request at a time")
            print(
                f"{n_over} requests per mode (the first of part 1: prompt "
                f"{', '.join(str(len(r.prompt)) for r in over_reqs)} tokens, output "
                f"{', '.join(str(r.max_tokens) for r in over_reqs)} tokens), interleaved; Serve = streamed "
                f"HTTP to the app, LLM = in-process overfill_serve.LLM(same models, {blocks} KV blocks)"
                f".generate on {threads} torch thread(s) like a replica (TTFT: its first-token stamp); medians"
            )
            rows = overhead(url, pair, modes, over_reqs, llm, args.timeout)
            print()
            print_overhead(rows)
            health = asyncio.run(http_rtt(url, 20))
            line = f"round trips (median of 20): GET /health (HTTP proxy + ingress, no model) {1000 * health:.1f} ms"
            if own_app:
                line += f"; one DecodeServer handle call from the driver (stats) {1000 * handle_rtt():.1f} ms"
            print(line)
            del llm
            if own_app:
                print()
                leak_ok = kv_check() and leak_ok

        if own_app:
            from ray import serve

            with contextlib.redirect_stdout(io.StringIO()):  # Ray's shutdown chatter
                serve.shutdown()
                ray.shutdown()
    print(f"\ntotal runtime {time.perf_counter() - t_start:.0f} s, load average at end {load_average()}")
    return 0 if leak_ok else 1


if __name__ == "__main__":
    sys.exit(main())
