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
of each and the difference (HTTP proxy + Router + deployment-handle calls + KV channel + SSE). The offline
engine runs on `--offline-threads` torch threads (default: what Ray gives a replica with fractional num_cpus,
1), so the difference is the path, not the thread count. Also printed: the round trip of `GET /health` (proxy
+ Router, no model) and, for an in-process app, of one deployment-handle call (`stats`).

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
import datetime
import io
import json
import os
import platform
import random
import shlex
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "cluster" / "config.yaml"
APP_NAME = "overfill-load"
MODE_SUFFIX = {"overfill": "", "full": ":full", "pruned": ":pruned"}


# ----------------------------------------------------------------------------------------------------------
# workload
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Req:
    prompt: list[int]
    max_tokens: int


def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    a, b = int(lo), int(hi or lo)
    if not 0 < a <= b:
        raise argparse.ArgumentTypeError(f"{text!r}: want LO:HI with 0 < LO <= HI")
    return a, b


def corpus_token_ids(model_dir: Path) -> list[int]:
    from pydoc_data.topics import topics

    from overfill_serve.tokenizer import load_tokenizer

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return list(load_tokenizer(model_dir)(text, add_special_tokens=False)["input_ids"])


def make_workload(
    corpus: list[int], n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], seed: int
) -> list[Req]:
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        p_len, o_len = rng.randint(*prompt_range), rng.randint(*output_range)
        start = rng.randrange(0, len(corpus) - p_len)
        reqs.append(Req(corpus[start : start + p_len], o_len))
    return reqs


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# ----------------------------------------------------------------------------------------------------------
# one streamed request over HTTP
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    req: Req
    start: float = 0.0  # perf_counter when the request was sent
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)  # arrival of every chunk with text
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2e is not None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.tokens < 2:
            return None
        return (self.chunk_times[-1] - self.start - self.ttft) / (self.tokens - 1)

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


async def stream_completion(session: Any, url: str, model: str, req: Req, timeout: float) -> Outcome:
    import aiohttp

    body = {
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    out = Outcome(req)
    out.start = time.perf_counter()
    try:
        async with session.post(
            f"{url}/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            if resp.status != 200:
                out.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return out
            done = False
            async for raw in resp.content:
                now = time.perf_counter()
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    done = True
                    out.e2e = now - out.start
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    out.error = f"stream error: {json.dumps(chunk['error'])[:200]}"
                    continue
                if chunk.get("usage"):
                    out.tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("text") for c in chunk.get("choices", [])):
                    if out.ttft is None:
                        out.ttft = now - out.start
                    out.chunk_times.append(now)
            if out.error is None and not done:
                out.error = "stream ended without [DONE]"
            elif out.error is None and out.tokens != req.max_tokens:
                out.error = f"{out.tokens} tokens, wanted {req.max_tokens} (ignore_eos)"
    except asyncio.TimeoutError:
        out.error = f"timed out after {timeout:.0f} s"
    except asyncio.CancelledError:
        out.error = "cancelled at the run's deadline"
    except Exception as e:  # connection refused / reset: counted, not fatal
        out.error = f"{type(e).__name__}: {e}"
    return out


def new_session() -> Any:
    import aiohttp

    # One connection per in-flight request; loopback only.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False))


# ----------------------------------------------------------------------------------------------------------
# part 1: load
# ----------------------------------------------------------------------------------------------------------
@dataclass
class LoadResult:
    mode: str
    outcomes: list[Outcome]
    wall: float


async def run_load(
    url: str,
    model: str,
    reqs: list[Req],
    rate: float | None,
    concurrency: int | None,
    seed: int,
    timeout: float,
    max_duration: float,
) -> tuple[list[Outcome], float]:
    async with new_session() as session:
        sem = asyncio.Semaphore(concurrency) if concurrency else None
        outcomes: list[Outcome | None] = [None] * len(reqs)
        t0 = time.perf_counter()

        async def one(i: int, at: float) -> None:
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if sem is None:
                outcomes[i] = await stream_completion(session, url, model, reqs[i], timeout)
                return
            async with sem:
                outcomes[i] = await stream_completion(session, url, model, reqs[i], timeout)

        if rate:
            rng, at, times = random.Random(seed + 7), 0.0, []
            for _ in reqs:
                times.append(at)
                at += rng.expovariate(rate)
        else:
            times = [0.0] * len(reqs)  # closed loop: the semaphore paces them
        tasks = [asyncio.create_task(one(i, at)) for i, at in enumerate(times)]
        _, pending = await asyncio.wait(tasks, timeout=max_duration)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - t0
    result = []
    for i, o in enumerate(outcomes):
        if o is None:
            o = Outcome(reqs[i], error="not sent before the run's deadline")
        result.append(o)
    return result, wall


def print_load(results: list[LoadResult], slo_ttft: float, slo_tpot: float) -> None:
    head = f"{'mode':<9} {'metric':<9} {'mean':>8} {'p50':>8} {'p90':>8} {'p99':>8}"
    print(head)
    print("-" * len(head))
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
    print(head)
    print("-" * len(head))
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
# part 2: Serve overhead vs the offline engine
# ----------------------------------------------------------------------------------------------------------
def offline_one(llm: Any, req: Req, mode: str) -> tuple[float, float]:
    """(TTFT, e2e) of one request run alone through `LLM.generate`. e2e is the wall time of the call; TTFT is
    the engine's own first-token stamp (from the request's creation inside the call): a client cannot see it
    sooner, because `LLM.step` returns the prefill's token only after the same step's decode pass."""
    from overfill_serve import SamplingParams

    params = SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    (out,) = llm.generate([req.prompt], params, mode=mode)
    e2e = time.perf_counter() - t0
    assert len(out.token_ids) == req.max_tokens, (len(out.token_ids), req.max_tokens)
    return out.metrics.ttft if out.metrics.ttft is not None else e2e, e2e


async def http_rtt(url: str, n: int) -> float:
    async with new_session() as session:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            async with session.get(f"{url}/health") as resp:
                await resp.read()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


async def serve_single(url: str, model: str, req: Req, timeout: float) -> Outcome:
    async with new_session() as session:
        return await stream_completion(session, url, model, req, timeout)


Timing = tuple[float, float]  # (TTFT, e2e) seconds


def overhead(
    url: str, pair: str, modes: list[str], reqs: list[Req], llm: Any, timeout: float
) -> list[tuple[str, list[tuple[Req, Timing, Timing]], list[str]]]:
    """Per mode: (mode, [(request, Serve timing, offline timing)] for the requests that succeeded, errors)."""
    rows = []
    for mode in modes:
        model = pair + MODE_SUFFIX[mode]
        errors: list[str] = []

        def serve_one(req: Req, model: str = model, errors: list[str] = errors) -> Timing | None:
            o = asyncio.run(serve_single(url, model, req, timeout))
            if o.ok and o.ttft is not None and o.e2e is not None:
                return o.ttft, o.e2e
            errors.append(str(o.error))
            return None

        warm = Req(reqs[0].prompt[:16], 4)
        serve_one(warm)
        offline_one(llm, warm, mode)
        pairs = []
        for i, req in enumerate(reqs):  # interleaved, order alternating, so drift in load hits both
            if i % 2 == 0:
                served = serve_one(req)
                offline = offline_one(llm, req, mode)
            else:
                offline = offline_one(llm, req, mode)
                served = serve_one(req)
            if served is not None:
                pairs.append((req, served, offline))
        rows.append((mode, pairs, errors))
    return rows


def print_overhead(rows: list[tuple[str, list[tuple[Req, Timing, Timing]], list[str]]]) -> None:
    head = (
        f"{'mode':<9} {'n':>3} {'Serve TTFT':>11} {'LLM TTFT':>9} {'+TTFT ms':>9} "
        f"{'Serve e2e':>10} {'LLM e2e':>8} {'+e2e ms':>8} {'paired +TTFT/+e2e ms':>21} {'+ms/token':>9}"
    )
    print(head)
    print("-" * len(head))
    for mode, pairs, errors in rows:
        if not pairs:
            print(f"{mode:<9} no successful Serve requests: {errors[:1]}")
            continue
        s_ttft, s_e2e = (
            statistics.median(s[0] for _, s, _ in pairs),
            statistics.median(s[1] for _, s, _ in pairs),
        )
        o_ttft, o_e2e = (
            statistics.median(o[0] for _, _, o in pairs),
            statistics.median(o[1] for _, _, o in pairs),
        )
        # Median of the per-request differences too: robust to one slow outlier on a shared box.
        d_ttft = statistics.median(s[0] - o[0] for _, s, o in pairs)
        d_e2e = statistics.median(s[1] - o[1] for _, s, o in pairs)
        paired = f"{1000 * d_ttft:+.1f} / {1000 * d_e2e:+.1f}"
        # What the Serve path adds to each later token: the (e2e - TTFT) difference over the tokens after the first.
        d_tok = statistics.median(
            ((s[1] - s[0]) - (o[1] - o[0])) / max(r.max_tokens - 1, 1) for r, s, o in pairs
        )
        print(
            f"{mode:<9} {len(pairs):>3} {s_ttft:10.3f}s {o_ttft:8.3f}s {1000 * (s_ttft - o_ttft):+9.1f} "
            f"{s_e2e:9.3f}s {o_e2e:7.3f}s {1000 * (s_e2e - o_e2e):+8.1f} {paired:>21} {1000 * d_tok:+9.1f}"
        )
        if errors:
            print(f"ERRORS {mode} (part 2): {errors}")


# ----------------------------------------------------------------------------------------------------------
# the in-process app
# ----------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(prefill_dir: Path, decode_dir: Path) -> tuple[str, str, dict[str, Any]]:
    """Start Ray and the app on a free loopback port; returns (url, pair name, app args)."""
    import yaml

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import logging

    import ray
    from ray import serve

    from overfill_serve.serve.app import build_app_with
    from overfill_serve.serve.config import ServeConfig

    config = yaml.safe_load(CONFIG.read_text())
    app = config["applications"][0]
    args = {**app["args"], "prefill_model": str(prefill_dir), "decode_model": str(decode_dir)}
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments", [])}
    ray.init(
        address="local",  # never attach to another Ray on this machine
        num_cpus=8,  # logical: every replica's fractional num_cpus fits on 2 cores
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": {"OVERFILL_CACHE_DIR": str(prefill_dir.parent)}},
    )
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app_with(ServeConfig.from_args(args), options), name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{port}", args["pair_name"], args


def replica_threads() -> int:
    import ray

    @ray.remote(num_cpus=0.5)
    def probe() -> int:
        import torch

        return torch.get_num_threads()

    return ray.get(probe.remote())


def handle_rtt(n: int = 20) -> float:
    from ray import serve

    handle = serve.get_deployment_handle("DecodeServer", app_name=APP_NAME)
    handle.stats.remote().result()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        handle.stats.remote().result()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def kv_check(wait_s: float = 15.0) -> bool:
    """Print every replica's pool stats once they settle; True when every pool is whole again."""
    from ray import serve

    def snapshot() -> list[tuple[str, dict[str, Any]]]:
        seen: dict[Any, tuple[str, dict[str, Any]]] = {}
        for name in ("PrefillServer", "DecodeServer"):
            handle = serve.get_deployment_handle(name, app_name=APP_NAME)
            for _ in range(4):
                s = handle.stats.remote().result()
                seen[s["replica_id"]] = (name, s)
        return list(seen.values())

    def whole(stats: list[tuple[str, dict[str, Any]]]) -> bool:
        return all(
            s["free_blocks"] == s["total_blocks"]
            and s.get("open_transfers", 0) == 0
            and s["waiting"] == 0
            and s["running"] == 0
            for _, s in stats
        )

    deadline = time.monotonic() + wait_s
    stats = snapshot()
    while not whole(stats) and time.monotonic() < deadline:
        time.sleep(0.5)
        stats = snapshot()
    for name, s in stats:
        extra = f", open_transfers {s['open_transfers']}" if "open_transfers" in s else ""
        print(
            f"{name} {s['replica_id'][:8]}: free_blocks {s['free_blocks']}/{s['total_blocks']}, "
            f"waiting {s['waiting']}, running {s['running']}{extra}"
        )
    ok = whole(stats)
    print("KV pools whole again: " + ("yes" if ok else f"NO (after waiting {wait_s:.0f} s): LEAK"))
    return ok


def make_pair(which: str, tmp: Path, hidden: int, intermediate: int) -> tuple[Path, Path, str]:
    from overfill_serve.default_model import default_model_dir

    teacher = default_model_dir()
    if which == "default":
        return teacher, teacher, f"default: {teacher.name} on both stages (overfill == full in speed)"
    from overfill_serve.model.prune import prune_model

    t = time.perf_counter()
    rep = prune_model(
        teacher,
        tmp / f"{teacher.name}-pruned-h{hidden}-i{intermediate}",
        hidden_size=hidden,
        intermediate_size=intermediate,
    )
    desc = (
        f"pruned: teacher {teacher.name} (hidden {rep.teacher_hidden_size}, intermediate "
        f"{rep.teacher_intermediate_size}, {rep.teacher_parameters / 1e6:.1f}M params) prefills; student "
        f"hidden {rep.student_hidden_size}, intermediate {rep.student_intermediate_size}, layers "
        f"{rep.student_num_layers}/{rep.teacher_num_layers}, {rep.student_parameters / 1e6:.1f}M params "
        f"(prune_model, {time.perf_counter() - t:.1f} s).\n"
        "NOTE: the student is NOT distilled, so its text is garbage; only speed is measured."
    )
    return teacher, rep.out_dir, desc


# ----------------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running app (e.g. http://127.0.0.1:8000); default: start one in-process")
    ap.add_argument("--model", help="the pair's model name (default: the app's; with --url, from /v1/models)")
    ap.add_argument(
        "--pair",
        choices=["default", "pruned"],
        default="default",
        help="in-process app: the embedded model on both stages, or it + a pruned student",
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
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"command: {shlex.join(['python', 'benchmarks/serve_load.py', *sys.argv[1:]])}")
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    print(
        f"machine: {platform.machine()} {platform.system()}, nproc {os.cpu_count()} ({cpu}), no GPU used, "
        f"python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}; "
        f"load average at start {load_avg()}"
    )

    t_start = time.perf_counter()
    leak_ok = True
    with tempfile.TemporaryDirectory(prefix="overfill-serve-load-") as tmp:
        own_app = args.url is None
        if own_app:
            prefill_dir, decode_dir, desc = make_pair(
                args.pair, Path(tmp), args.prune_hidden, args.prune_intermediate
            )
            t = time.perf_counter()
            url, pair, app_args = start_app(prefill_dir, decode_dir)
            print(f"pair {desc}")
            print(
                f"app: in-process Serve app on {url} (cluster/config.yaml args: block_size "
                f"{app_args['block_size']}, kv blocks {app_args['prefill_kv_blocks']}/"
                f"{app_args['decode_kv_blocks']}, max_num_seqs {app_args['max_num_seqs']}, transfer "
                f"{app_args.get('transfer', {}).get('backend', 'grpc')}; 1 PrefillServer + 1 DecodeServer + "
                f"1 Router replica, torch threads per replica {replica_threads()}), started in "
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
            from overfill_serve.default_model import default_model_dir

            prefill_dir = args.prefill_model or default_model_dir()
            decode_dir = args.decode_model or prefill_dir
        pair = args.model or pair

        corpus = corpus_token_ids(prefill_dir)
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
            print(f"  {mode}: done in {wall:.1f} s, load average {load_avg()}", file=sys.stderr)
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
            blocks = int(app_args["decode_kv_blocks"]) if own_app else 512
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
            line = f"round trips (median of 20): GET /health (HTTP proxy + Router, no model) {1000 * health:.1f} ms"
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
    print(f"\ntotal runtime {time.perf_counter() - t_start:.0f} s, load average at end {load_avg()}")
    return 0 if leak_ok else 1


if __name__ == "__main__":
    sys.exit(main())
