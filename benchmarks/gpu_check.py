"""One call on a GPU machine: build, assert the CUDA path's tokens, time it against the anchors.

1. Ceilings measured in this run: device copy bandwidth (read + write) and the bf16 matmul rate.
2. Correctness (exit 1 on any wrong token): the engine on CUDA in fp32 (Triton kernels, CUDA graphs, padding:
   the GPU defaults) gives exactly the CPU fp32 engine's greedy tokens, for pairs of the released 3B geometry
   cut to 4 layers (the teacher; a width-pruned student with the odd 1689 / 4505 dims; a depth-pruned one
   keeping 2 layers), every mode, prompts of 3 to 700 tokens, a pool small enough to preempt. bf16 (the GPU
   default dtype) is reported: the tokens it shares and its max-abs logit difference from fp32.
3. Timings (bf16, random weights, full 28-layer shapes): a decode step through our runner (CUDA graph, paged
   kernels) for the teacher, the odd student and the padded student at batch 1 / 32 / 128, equal and mixed
   context lengths; against a plain CUDA-graphed torch step (graph_anchor.py), transformers eager and the HBM
   floor (weights + KV read once at the measured bandwidth); OverFill TPOT / full TPOT at equal batch; the
   decode attention alone at 64 x 2K mixed against reading its KV once; a 2048-token teacher prefill against
   the compute floor.

    python benchmarks/gpu_check.py           # on the GPU machine: JSON lines, and $OUT/gpu_check.json
    python benchmarks/gpu_check.py --small   # tiny shapes on whatever device there is: tries the script
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from gpu_timing import ModelShape, attention_alone, ceilings, decode_step_ms, prefill_ms, spec_of

from overfill_serve import LLM, SamplingParams
from overfill_serve.model.prune import prune_model
from overfill_serve.model.random_model import make_random_model

TEACHER_3B = ModelShape(28, 3072, 8192, 24, 8, 128)
STUDENT_ODD = ModelShape(28, 1689, 4505, 24, 8, 128)  # the released 3B -> 1B decoder
SMALL_TEACHER, SMALL_STUDENT = ModelShape(2, 96, 160, 4, 2, 32), ModelShape(2, 72, 120, 4, 2, 32)


def correctness(device: str, small: bool) -> tuple[dict, bool]:
    t = SMALL_TEACHER if small else TEACHER_3B
    s = SMALL_STUDENT if small else STUDENT_ODD
    prompts = [list(range(10, 10 + n)) for n in ((3, 17, 33, 50) if small else (3, 17, 50, 200, 700))]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=0)
    # Every prompt fits at once, not all their outputs: decodes get preempted.
    engine = dict(num_kv_blocks=12 if small else 72, block_size=16, max_num_batched_tokens=256)
    report, ok = {}, True
    with tempfile.TemporaryDirectory() as tmp:
        teacher = make_random_model(
            f"{tmp}/t", hidden_size=t.hidden, intermediate_size=t.inter, num_heads=t.heads,
            num_kv_heads=t.kv, head_dim=t.head_dim, num_layers=4, vocab_size=32768, rope_theta=500000.0,
            max_position_embeddings=4096,
        )  # fmt: skip
        width = prune_model(teacher, f"{tmp}/w", hidden_size=s.hidden, intermediate_size=s.inter).out_dir
        depth = prune_model(teacher, f"{tmp}/d", num_layers=2, kept_layers="firstlast").out_dir
        for name, student in (("width", width), ("depth", depth)):
            cpu = LLM(teacher, student, dtype="float32", **engine)
            fp32 = LLM(teacher, student, device=device, dtype="float32", **engine)
            # Every GPU default, the KV pool sized from the memory left after weights and a measured peak.
            bf16 = LLM(teacher, student, device=device, max_num_batched_tokens=256)
            for mode in ("overfill", "full", "pruned"):
                ref = cpu.generate(prompts, params, mode=mode)
                got, low = (
                    fp32.generate(prompts, params, mode=mode),
                    bf16.generate(prompts, params, mode=mode),
                )
                same = [a.token_ids == b.token_ids for a, b in zip(ref, got)]
                ok &= all(same)
                report[f"{name}/{mode}"] = {
                    "fp32_identical": f"{sum(same)}/{len(same)}",
                    "preemptions": sum(o.metrics.num_preemptions for o in got),
                    "bf16_tokens_shared": sum(a.token_ids == b.token_ids for a, b in zip(ref, low)),
                }
            report[f"{name}/bf16_max_abs_logit_diff"] = max_logit_diff(fp32, bf16, prompts[-1])
            report[f"{name}/bf16_kv_blocks"] = bf16.core.pool.num_blocks
            del cpu, fp32, bf16  # the bf16 engine's pool holds most of the GPU: free it for the next pair
            if device == "cuda":
                torch.cuda.empty_cache()
    return report, ok


def max_logit_diff(a: LLM, b: LLM, prompt: list[int]) -> float:
    """The teacher's last-position logits for one prompt, fp32 vs bf16 engine (a fresh, unshared pool)."""
    from overfill_serve.engine.batch import Batch, ScheduledSeq

    blocks = tuple(range(-(-len(prompt) // 16)))
    batch = Batch((ScheduledSeq("diff", tuple(prompt), 0, blocks, True),))
    logits = [llm.core.prefill["teacher"].runner.run(batch).float().cpu() for llm in (a, b)]
    return float((logits[0] - logits[1]).abs().max())


def timings(device: torch.device, bw: float, peak_flops: float, small: bool) -> dict:
    scale = 16 if small else 1
    cases = {
        "b1_ctx2048": [2048 // scale],
        "b32_ctx1024": [1024 // scale] * 32,
        "b32_ctx512-1536": [(512 + 1024 * i // 31) // scale for i in range(32)],
        "b128_ctx1024-2048": [(1024 + 1024 * i // 127) // scale for i in range(128)],
    }
    shapes = {"teacher": TEACHER_3B, "student_odd": STUDENT_ODD, "student_padded": STUDENT_ODD.padded(64)}
    if small:
        shapes = {
            "teacher": SMALL_TEACHER,
            "student_odd": SMALL_STUDENT,
            "student_padded": SMALL_STUDENT.padded(64),
        }
    out: dict = {}
    for name, shape in shapes.items():
        out[name] = decode_step_ms(shape, cases, device, bw, anchors=not small or name != "teacher")
        print(json.dumps({f"decode_step_{name}_bf16": out[name]}), flush=True)
    out["overfill_over_full_tpot"] = {
        case: out["student_padded"][case]["ours_ms"] / out["teacher"][case]["ours_ms"] for case in cases
    }
    out["decode_attention_64x2k"] = attention_alone(device, bw, small)
    out["prefill_teacher_2048"] = prefill_ms(spec_of(shapes["teacher"]), 2048 // scale, device, peak_flops)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes: try the script on any machine")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.small:
        print(json.dumps({"gpu": None, "note": "no CUDA device: nothing to check (try --small)"}))
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }

    def emit(key: str, value: object) -> None:
        results[key] = value
        print(json.dumps({key: value}), flush=True)

    emit("ceilings", ceilings(device, args.small))
    report, ok = correctness(str(device), args.small)
    emit("correctness_cuda_vs_cpu_fp32", report)
    bw, peak = results["ceilings"]["copy_GBps_rw"] * 1e9, results["ceilings"]["bf16_TFLOPs"] * 1e12
    emit("timings", timings(device, bw, peak, args.small))
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, "gpu_check.json").write_text(json.dumps(results, indent=1))
    if not ok:
        print("FAILED: the CUDA fp32 engine's tokens differ from the CPU fp32 engine's", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
