"""Prefix caching through the Serve app, caching off then on in the same run (issue 13 item 7).

Two workloads, each sent to the app twice (`enable_prefix_caching` false, then true), OverFill mode, greedy:
- shared prefix: `--questions` requests that share one `--shared-prefix`-token system prompt, each with its own
  short question, from `--concurrency` closed-loop streaming clients;
- multi-turn: `--conversations` chats of `--turns` turns run side by side; each turn resends the whole chat so
  far (the earlier answers included, re-tokenized) plus a new user message.
Printed per workload and setting: TTFT p50 / p90, the prompt tokens the teacher computed (the prefill
replica's `prefill_tokens`), the KV bytes that crossed the channel (the decode replica's transfer totals),
output tokens/s; then the ratios on / off and whether every output is equal. Exit code 1 if an output differs
or a KV pool is not whole after a run (cached blocks count as free).

    PYTHONPATH=. python benchmarks/prefix_cache.py                      # the embedded default model
    PYTHONPATH=. python benchmarks/prefix_cache.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_common import Req, command_line, corpus_token_ids, median, pct, utc_date
from load_client import new_session, run_load, stream_completion
from serve_app import machine_line, make_pair, replica_stats, start_app


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", choices=["default", "pruned", "tiny"], default="default")
    ap.add_argument("--shared-prefix", type=int, default=1024, help="tokens of the shared system prompt")
    ap.add_argument("--questions", type=int, default=24)
    ap.add_argument("--question-len", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--conversations", type=int, default=3)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--turn-len", type=int, default=48, help="tokens of each new user message")
    ap.add_argument(
        "--quick", action="store_true", help="a small run: 256-token prefix, 8 questions, 4 turns"
    )
    args = ap.parse_args()
    if args.quick:
        args.shared_prefix, args.questions, args.turns, args.conversations = 256, 8, 4, 2
    return args


@dataclass
class Measured:
    ttfts: list[float]
    tokens: int
    wall: float
    prefill_tokens: int
    kv_bytes: int
    texts: list[str]

    def row(self, name: str) -> str:
        return (
            f"{name:<22} {median(self.ttfts) * 1e3:>9.0f} {pct(self.ttfts, 0.9) * 1e3:>9.0f} "
            f"{self.prefill_tokens:>14} {self.kv_bytes / 2**20:>10.1f} {self.tokens / self.wall:>9.1f}"
        )


def counters() -> tuple[int, int]:
    """(prompt tokens the prefill replicas computed, KV bytes the decode replicas received) so far."""
    prefill = sum(s.get("prefill_tokens", 0) for s in replica_stats("PrefillServer"))
    kv = sum(
        t["nbytes"] for s in replica_stats("DecodeServer") for t in (s.get("kv_transfers") or {}).values()
    )
    return prefill, kv


def measure(run: Any) -> Measured:
    before = counters()
    t = time.perf_counter()
    outcomes = run()
    wall = time.perf_counter() - t
    after = counters()
    bad = [o.error for o in outcomes if not o.ok]
    if bad:
        raise SystemExit(f"{len(bad)} requests failed, e.g. {bad[0]}")
    return Measured(
        [o.ttft for o in outcomes if o.ttft is not None],
        sum(o.tokens for o in outcomes),
        wall,
        after[0] - before[0],
        after[1] - before[1],
        [o.text for o in outcomes],
    )


def shared_prefix_run(url: str, model: str, reqs: list[Req], concurrency: int) -> Any:
    def run() -> list[Any]:
        outcomes, _ = asyncio.run(run_load(url, model, reqs, None, concurrency, 0, 600.0, 3600.0))
        return outcomes

    return run


def multi_turn_run(
    url: str, model: str, tokenizer: Any, chats: list[list[list[int]]], max_tokens: int
) -> Any:
    """Each chat's turns in order (a turn's prompt is the chat so far: earlier messages and answers), the chats
    side by side."""

    async def chat(session: Any, messages: list[list[int]]) -> list[Any]:
        history: list[int] = []
        outcomes = []
        for message in messages:
            history += message
            out = await stream_completion(session, url, model, Req(list(history), max_tokens), 600.0)
            outcomes.append(out)
            history += tokenizer(out.text, add_special_tokens=False)["input_ids"]
        return outcomes

    async def all_chats() -> list[Any]:
        async with new_session() as session:
            done = await asyncio.gather(*(chat(session, c) for c in chats))
        return [o for outcomes in done for o in outcomes]

    return lambda: asyncio.run(all_chats())


def pools_whole() -> bool:
    stats = replica_stats("PrefillServer") + replica_stats("DecodeServer")
    return all(s["free_blocks"] == s["total_blocks"] and not s.get("open_transfers") for s in stats)


def shutdown() -> None:
    import ray
    from ray import serve

    with contextlib.redirect_stdout(io.StringIO()):
        serve.shutdown()
        ray.shutdown()


def main() -> int:
    args = parse_args()
    from overfill_serve.tokenizer import load_tokenizer

    print(f"# prefix caching, off vs on, {utc_date()}\n$ {command_line('benchmarks/prefix_cache.py')}")
    with tempfile.TemporaryDirectory() as tmp:
        prefill_dir, decode_dir, desc = make_pair(args.pair, Path(tmp), 288, 768)
        tokenizer = load_tokenizer(prefill_dir)
        corpus = corpus_token_ids(tokenizer)
        prefix = corpus[: args.shared_prefix]
        step = args.question_len
        questions = [corpus[50_000 + i * step : 50_000 + (i + 1) * step] for i in range(args.questions)]
        reqs = [Req(prefix + q, args.max_tokens) for q in questions]
        turn = args.turn_len
        chats = [
            [corpus[90_000 + (c * args.turns + t) * turn :][:turn] for t in range(args.turns)]
            for c in range(args.conversations)
        ]
        print(f"pair {desc}\n{machine_line()}")
        results: dict[tuple[str, bool], Measured] = {}
        whole = True
        for caching in (False, True):
            url, config = start_app(prefill_dir, decode_dir, enable_prefix_caching=caching)
            try:
                model = config.pair_name
                results["shared prefix", caching] = measure(
                    shared_prefix_run(url, model, reqs, args.concurrency)
                )
                results["multi-turn", caching] = measure(
                    multi_turn_run(url, model, tokenizer, chats, args.max_tokens)
                )
                whole = whole and pools_whole()
            finally:
                shutdown()
    return report(args, results, whole)


def report(args: argparse.Namespace, results: dict[tuple[str, bool], Measured], whole: bool) -> int:
    print(
        f"\nshared prefix: {args.questions} requests, {args.shared_prefix}-token prefix + {args.question_len}-token "
        f"question, concurrency {args.concurrency}; multi-turn: {args.conversations} chats x {args.turns} turns, "
        f"{args.turn_len}-token messages; {args.max_tokens} output tokens each, OverFill mode, greedy\n"
    )
    head = ("TTFT p50", 9), ("TTFT p90", 9), ("teacher tokens", 14), ("KV MiB", 10), ("out tok/s", 9)
    print(f"{'workload, caching':<22} " + " ".join(f"{name:>{width}}" for name, width in head))
    same = True
    for workload in ("shared prefix", "multi-turn"):
        off, on = results[workload, False], results[workload, True]
        print(off.row(f"{workload}, off"))
        print(on.row(f"{workload}, on"))
        equal = off.texts == on.texts
        same = same and equal
        print(
            f"  ratio on/off: TTFT p50 {median(on.ttfts) / median(off.ttfts):.2f}x, teacher prefill tokens "
            f"{on.prefill_tokens / off.prefill_tokens:.2f}x, KV bytes {on.kv_bytes / max(off.kv_bytes, 1):.2f}x, "
            f"output tok/s {on.tokens / on.wall / (off.tokens / off.wall):.2f}x; outputs equal: {equal}"
        )
    print(f"\nKV pools whole after every run (cached blocks count as free): {whole}")
    return 0 if same and whole else 1


if __name__ == "__main__":
    sys.exit(main())
