"""Offline throughput: overfill-serve `LLM.generate` (continuous batching over a paged KV cache) against
transformers `generate` with static, left-padded batches, on the embedded default model (SmolLM2-135M-Instruct).

Part 1 (engine vs transformers): N mixed-length requests (prompt 16-512 tokens, output 16-256 tokens, seeded),
greedy, ignore_eos, each request's max_tokens its drawn output length. Both systems get the same token-id
prompts. overfill-serve runs them all at once in mode "full" (teacher only: the same model transformers runs);
transformers runs them in arrival order, `--hf-batch-size` at a time; a static batch runs until its longest
member ends, and only each request's own tokens count as useful output.

Part 2 (OverFill decode speed): the default model is pruned (width: hidden and intermediate ~0.5x; depth:
half the layers, "firstlast") and one `LLM(teacher, student)` decodes the same decode-heavy workload in mode
"full" (teacher decodes) and mode "overfill" (pruned student decodes). The students are not distilled, so
their text is garbage: only their speed is measured.

    python benchmarks/offline_throughput.py [--num-requests 64] [--seed 0] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_common import Req, command_line, corpus_token_ids, make_workload, pct, print_head, utc_date

from overfill_serve import LLM, SamplingParams
from overfill_serve.model.prune import prune_model
from overfill_serve.tools.default_model import default_model_dir


@dataclass
class Result:
    name: str
    wall: float
    prompt_tokens: int
    output_tokens: int
    e2e: list[float]
    ttft: list[float]
    tokens: list[list[int]]

    @property
    def out_tps(self) -> float:
        return self.output_tokens / self.wall

    @property
    def total_tps(self) -> float:
        return (self.output_tokens + self.prompt_tokens) / self.wall


# ----------------------------------------------------------------------------------------------------------
# part 1: overfill-serve vs transformers
# ----------------------------------------------------------------------------------------------------------
def run_overfill(llm: LLM, reqs: list[Req], mode: str = "full") -> Result:
    params = [SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True) for r in reqs]
    t0 = time.perf_counter()
    outs = llm.generate([r.prompt for r in reqs], params, mode=mode)
    wall = time.perf_counter() - t0
    for o, r in zip(outs, reqs):
        assert len(o.token_ids) == r.max_tokens, (len(o.token_ids), r.max_tokens)
    return Result(
        f"overfill-serve ({mode})",
        wall,
        sum(len(r.prompt) for r in reqs),
        sum(len(o.token_ids) for o in outs),
        [o.metrics.e2e for o in outs],
        [o.metrics.ttft for o in outs],
        [o.token_ids for o in outs],
    )


class _FirstCall:
    """A logits processor that only records when the first decoding step of a batch happens (= its TTFT)."""

    def __init__(self) -> None:
        self.t: float | None = None

    def __call__(self, input_ids, scores):
        if self.t is None:
            self.t = time.perf_counter()
        return scores


def run_hf(model, pad_id: int, reqs: list[Req], batch_size: int) -> Result:
    from transformers import LogitsProcessorList

    e2e: list[float] = []
    ttft: list[float] = []
    tokens: list[list[int]] = []
    t0 = time.perf_counter()
    for b in range(0, len(reqs), batch_size):
        batch = reqs[b : b + batch_size]  # arrival order, not sorted by length
        width = max(len(r.prompt) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding
            ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt) :] = 1
        new = max(r.max_tokens for r in batch)
        first = _FirstCall()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=pad_id,
                logits_processor=LogitsProcessorList([first]),
            )
        end = time.perf_counter()
        gen = out[:, width:]
        assert gen.shape[1] == new, (gen.shape, new)
        for i, r in enumerate(batch):
            tokens.append(gen[i, : r.max_tokens].tolist())  # only the request's own tokens are useful
            e2e.append(end - t0)  # offline: every request arrived at t0 and is returned when its batch ends
            ttft.append((first.t or end) - t0)
    wall = time.perf_counter() - t0
    return Result(
        f"transformers (bs={batch_size})",
        wall,
        sum(len(r.prompt) for r in reqs),
        sum(r.max_tokens for r in reqs),
        e2e,
        ttft,
        tokens,
    )


def agreement(a: list[list[int]], b: list[list[int]], idx: list[int]) -> tuple[int, float]:
    """(requests whose tokens match exactly, mean fraction of tokens before the first divergence)."""
    exact, prefix = 0, []
    for i in idx:
        x, y = a[i], b[i]
        n = next((k for k, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        exact += x == y
        prefix.append(n / max(len(x), 1))
    return exact, statistics.mean(prefix)


def print_table(results: list[Result]) -> None:
    head = (
        f"{'system':<28} {'wall s':>8} {'out tok/s':>10} {'total tok/s':>12} {'e2e mean':>9} "
        f"{'e2e p50':>8} {'e2e p90':>8} {'TTFT mean':>10} {'TTFT p50':>9}"
    )
    print_head(head)
    for r in results:
        print(
            f"{r.name:<28} {r.wall:8.2f} {r.out_tps:10.1f} {r.total_tps:12.1f} {statistics.mean(r.e2e):9.2f} "
            f"{pct(r.e2e, 0.5):8.2f} {pct(r.e2e, 0.9):8.2f} {statistics.mean(r.ttft):10.2f} {pct(r.ttft, 0.5):9.2f}"
        )


# ----------------------------------------------------------------------------------------------------------
# part 2: overfill vs full decode speed on a pruned pair
# ----------------------------------------------------------------------------------------------------------
def decode_tps(llm: LLM, reqs: list[Req], mode: str) -> tuple[float, float]:
    """(decode tokens/s, wall s). All prompts are prefilled in the first step; decode time is from the last
    first token to the last finish, decode tokens are every output token after each request's first."""
    params = [SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True) for r in reqs]
    t0 = time.perf_counter()
    outs = llm.generate([r.prompt for r in reqs], params, mode=mode)
    wall = time.perf_counter() - t0
    n = sum(len(o.token_ids) - 1 for o in outs)
    span = max(o.metrics.e2e for o in outs) - max(o.metrics.ttft for o in outs)
    return n / span, wall


def part2(teacher: Path, reqs: list[Req], variants: list[tuple[str, dict]]) -> None:
    print("\n## Part 2: OverFill decode speed (teacher prefills, pruned student decodes)")
    print(
        f"workload: {len(reqs)} requests, prompt {len(reqs[0].prompt)} tokens, output {reqs[0].max_tokens} "
        "tokens, greedy, ignore_eos"
    )
    print(
        "NOTE: the pruned students are NOT distilled, so their text is garbage; only decode speed is measured."
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="overfill-bench-") as tmp:
        for name, kw in variants:
            out = Path(tmp) / name
            t = time.perf_counter()
            rep = prune_model(teacher, out, **kw)
            print(
                f"pruned {name}: hidden {rep.student_hidden_size}, intermediate {rep.student_intermediate_size}, "
                f"layers {rep.student_num_layers}/{rep.teacher_num_layers}, "
                f"params {rep.student_parameters / 1e6:.1f}M / {rep.teacher_parameters / 1e6:.1f}M "
                f"({time.perf_counter() - t:.1f} s)"
            )
            llm = LLM(teacher, out)
            warm = [Req(reqs[0].prompt[:16], 4)]
            decode_tps(llm, warm, "full")
            decode_tps(llm, warm, "overfill")
            full, full_wall = decode_tps(llm, reqs, "full")
            over, over_wall = decode_tps(llm, reqs, "overfill")
            rows.append((name, rep, full, full_wall, over, over_wall))
            del llm
    head = f"{'student':<34} {'params':>8} {'full dec tok/s':>15} {'overfill dec tok/s':>19} {'ratio':>6}"
    print_head(head)
    for name, rep, full, _, over, _ in rows:
        label = (
            f"{name} (h{rep.student_hidden_size}/i{rep.student_intermediate_size}/L{rep.student_num_layers})"
        )
        print(
            f"{label:<34} {rep.student_parameters / 1e6:7.1f}M {full:15.1f} {over:19.1f} {over / full:5.2f}x"
        )


# ----------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=None, help="part 1 requests (default 64; --quick: 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: few, short requests")
    ap.add_argument(
        "--hf-batch-size",
        type=int,
        nargs="+",
        default=None,
        help="transformers static batch size(s); several are all run and the best is compared "
        "(default 8; --quick: 4 8)",
    )
    ap.add_argument("--check", type=int, default=8, help="requests whose tokens are compared (greedy)")
    ap.add_argument("--skip-part1", action="store_true")
    ap.add_argument("--skip-part2", action="store_true")
    args = ap.parse_args()

    q = args.quick
    n = args.num_requests or (8 if q else 64)
    prompt_range, output_range = ((16, 128), (8, 48)) if q else ((16, 512), (16, 256))
    hf_bs = args.hf_batch_size or ([8, 16] if q else [16])
    p2_n, p2_prompt, p2_out = (4, 32, 32) if q else (16, 64, 128)

    import transformers

    transformers.logging.set_verbosity_error()  # the corpus is tokenized at once: a too-long-sequence warning
    transformers.utils.logging.disable_progress_bar()
    print("# overfill-serve offline throughput benchmark")
    print(f"date: {utc_date()}")
    print(f"command: {command_line(sys.argv[0])}")
    print(
        f"machine: {platform.machine()} {platform.system()}, nproc {os.cpu_count()}, "
        f"python {platform.python_version()}, torch {torch.__version__} (threads {torch.get_num_threads()}), "
        f"transformers {transformers.__version__}, device cpu, dtype float32"
    )

    teacher = default_model_dir()
    torch.manual_seed(args.seed)
    if not args.skip_part1:
        from transformers import AutoModelForCausalLM

        llm = LLM(teacher)
        corpus = corpus_token_ids(llm.tokenizer)
        reqs = make_workload(corpus, n, prompt_range, output_range, args.seed)
        print(f"\n## Part 1: overfill-serve vs transformers, model {teacher.name}")
        print(
            f"workload: {n} requests, prompt {prompt_range[0]}-{prompt_range[1]} tokens "
            f"(total {sum(len(r.prompt) for r in reqs)}), output {output_range[0]}-{output_range[1]} tokens "
            f"(total {sum(r.max_tokens for r in reqs)}), seed {args.seed}, greedy, ignore_eos"
        )
        warm = [Req(corpus[:16], 4), Req(corpus[16:40], 4)]
        run_overfill(llm, warm)
        ours = run_overfill(llm, reqs)
        del llm

        model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None  # like ignore_eos: eos neither stops nor is suppressed
        pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        run_hf(model, pad_id, warm, 2)
        hf = [run_hf(model, pad_id, reqs, bs) for bs in hf_bs]
        del model
        best = max(hf, key=lambda r: r.out_tps)

        print()
        print_table([ours, *hf])
        print(
            f"\nratio overfill-serve / {best.name}: output tok/s {ours.out_tps / best.out_tps:.2f}x, "
            f"mean e2e latency {statistics.mean(ours.e2e) / statistics.mean(best.e2e):.2f}x "
            f"(below 1 = lower latency), mean TTFT "
            f"{statistics.mean(ours.ttft) / statistics.mean(best.ttft):.2f}x"
        )
        idx = list(range(min(args.check, n)))
        exact, prefix = agreement(ours.tokens, best.tokens, idx)
        print(
            f"greedy agreement on the first {len(idx)} requests: {exact}/{len(idx)} identical, "
            f"{prefix:.1%} of tokens before the first divergence (padding and kernel order change float "
            "rounding, so late divergences are expected; reported, not enforced)"
        )

    if not args.skip_part2:
        spec_h, spec_i, spec_l = 576, 1536, 30
        try:
            from overfill_serve.model.spec import ModelSpec

            s = ModelSpec.from_dir(teacher)
            spec_h, spec_i, spec_l = s.hidden_size, s.intermediate_size, s.num_layers
        except Exception:
            pass
        variants = [
            ("width-0.5x", dict(hidden_size=spec_h // 2, intermediate_size=spec_i // 2)),
            ("depth-0.5x", dict(num_layers=spec_l // 2, kept_layers="firstlast")),
        ]
        corpus = None
        from transformers import AutoTokenizer

        corpus = corpus_token_ids(AutoTokenizer.from_pretrained(teacher))
        rng = random.Random(args.seed + 1)
        reqs2 = []
        for _ in range(p2_n):
            start = rng.randrange(0, len(corpus) - p2_prompt)
            reqs2.append(Req(corpus[start : start + p2_prompt], p2_out))
        part2(teacher, reqs2, variants)


if __name__ == "__main__":
    main()
