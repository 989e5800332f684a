"""Preemption under KV pressure: swap (decode KV to host memory and back) against recompute (re-prefill the
prompt and the generated tokens), on the embedded default model.

One `LLM` per policy, the same seeded workload (prompts 64-256 tokens, outputs 64-192), all requests at once,
greedy, ignore_eos, with a KV pool of `--kv-fraction` of what the whole batch needs at its end, so the
decode engine preempts. The baseline is recompute (`num_swap_blocks=0`) in the same run; the ratio is swap's
output tokens/s over recompute's. Tokens must be identical (preemption never changes the output).

    python benchmarks/preemption.py [--num-requests 24] [--kv-fraction 0.35] [--seed 0]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch
from bench_common import command_line, corpus_token_ids, cpu_name, make_workload, utc_date

from overfill_serve import LLM, SamplingParams
from overfill_serve.kv.paged_cache import blocks_for
from overfill_serve.tokenizer import load_tokenizer
from overfill_serve.tools.default_model import default_model_dir

BLOCK = 16


def run(args: argparse.Namespace, swap_blocks: int, num_blocks: int, reqs) -> tuple[float, int, int, list]:
    llm = LLM(block_size=BLOCK, num_kv_blocks=num_blocks, max_num_seqs=64, num_swap_blocks=swap_blocks)
    params = [SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True) for r in reqs]
    start = time.perf_counter()
    outs = llm.generate([r.prompt for r in reqs], params)
    wall = time.perf_counter() - start
    tokens = [o.token_ids for o in outs]
    return wall, sum(map(len, tokens)), sum(o.metrics.num_preemptions for o in outs), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-requests", type=int, default=24)
    parser.add_argument("--kv-fraction", type=float, default=0.35)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))

    tokenizer = load_tokenizer(default_model_dir())
    reqs = make_workload(corpus_token_ids(tokenizer), args.num_requests, (64, 256), (64, 192), args.seed)
    need = sum(blocks_for(len(r.prompt) + r.max_tokens, BLOCK) for r in reqs)
    longest = max(blocks_for(len(r.prompt) + r.max_tokens, BLOCK) for r in reqs)
    num_blocks = max(longest, int(need * args.kv_fraction))

    print(f"# preemption: swap vs recompute — {utc_date()}")
    print(f"machine: {cpu_name()}, {platform.python_version()}, torch {torch.__version__}, 2 threads, fp32")
    print(f"command: {command_line('benchmarks/preemption.py')}")
    print(
        f"workload: {len(reqs)} requests, KV pool {num_blocks} blocks of {BLOCK} ({need} needed at the end)\n"
    )
    results = {}
    for name, swap in (("recompute", 0), ("swap", need)):
        wall, out_tokens, preemptions, tokens = run(args, swap, num_blocks, reqs)
        results[name] = (wall, out_tokens, tokens)
        print(
            f"{name:>9}: {wall:7.1f} s  {out_tokens / wall:7.1f} output tok/s  {preemptions:4d} preemptions"
        )
    same = results["swap"][2] == results["recompute"][2]
    ratio = (results["swap"][1] / results["swap"][0]) / (results["recompute"][1] / results["recompute"][0])
    print(f"\nswap / recompute output tok/s: {ratio:.2f}x; tokens identical: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
