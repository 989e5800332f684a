"""One call on a GPU machine: is the CUDA path right, and how fast is it against the anchors?

1. Ceilings measured in this run: device copy bandwidth (read + write) and the bf16 matmul rate.
2. Correctness: the engine on CUDA (fp32) must give exactly the CPU fp32 engine's greedy tokens, for an
   identity, a width-pruned and a depth-pruned pair, in every mode, over mixed prompt lengths and chunked
   prefill (multi-token queries over a cached prefix). bf16 on CUDA is reported, not asserted (rounding
   moves near-ties).
3. Timings (bf16, random weights: shapes are what matter): one decode step of the released 3B->1B student
   shape through our runner at equal and at mixed context lengths (the masked path), one teacher prefill;
   each against transformers' eager model in the same run (the anchor of shared/tools/gpu_anchor.py) and
   the HBM floor (weights + KV read once at the measured bandwidth).

    python benchmarks/gpu_check.py           # on the GPU machine: JSON lines, and $OUT/gpu_check.json
    python benchmarks/gpu_check.py --small   # tiny shapes on whatever device there is: tries the script

Exits 1 when a correctness check fails (after printing every figure).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from overfill_serve import LLM, SamplingParams
from overfill_serve.engine.batch import Batch, ScheduledSeq
from overfill_serve.engine.runner import ModelRunner
from overfill_serve.kv.paged_cache import PagedKVCache
from overfill_serve.model.llama import CausalLM
from overfill_serve.model.prune import prune_model
from overfill_serve.model.random_model import make_random_model
from overfill_serve.model.spec import ModelSpec, RopeSpec

LLAMA3_ROPE = RopeSpec(500000.0, "llama3", 32.0, 1.0, 4.0, 8192)
# (layers, hidden, intermediate, heads, kv heads, head_dim): the released OverFill pair
STUDENT_3B_TO_1B = (28, 1689, 4505, 24, 8, 128)
TEACHER_3B = (28, 3072, 8192, 24, 8, 128)
SMALL = (2, 96, 160, 4, 2, 32)  # --small: odd hidden size as the student has


def timed_ms(fn: Callable[[], object], device: torch.device, n: int = 10, warm: int = 3) -> float:
    """Median milliseconds of fn(); CUDA events on a GPU, wall clock elsewhere."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(n):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def ceilings(device: torch.device, small: bool) -> dict:
    n = (64 << 20) if small else (2 << 30)
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    copy_ms = timed_ms(lambda: y.copy_(x), device)
    x = y = torch.empty(0)  # give the memory back before the matmul
    m = 512 if small else 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    mm_ms = timed_ms(lambda: a @ b, device)
    return {"copy_GBps_rw": 2 * n / copy_ms / 1e6, "bf16_TFLOPs": 2 * m**3 / mm_ms / 1e9}


# -- correctness -------------------------------------------------------------------------------------------
def correctness(device: str) -> tuple[dict, bool]:
    prompts = [list(range(10, 13)), list(range(20, 37)), list(range(40, 90)), list(range(100, 300))]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    # A small token budget splits the long prompt: later chunks attend over a cached prefix.
    engine = dict(num_kv_blocks=256, block_size=16, max_num_batched_tokens=64)
    report, ok = {}, True
    with tempfile.TemporaryDirectory() as tmp:
        teacher = make_random_model(
            f"{tmp}/t", hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2, head_dim=64
        )
        width = prune_model(teacher, f"{tmp}/w", hidden_size=192, intermediate_size=384).out_dir
        depth = prune_model(teacher, f"{tmp}/d", num_layers=2, kept_layers="firstlast").out_dir
        for name, student in (("identity", teacher), ("width", width), ("depth", depth)):
            ref_llm = LLM(teacher, student, **engine)
            fp32 = LLM(teacher, student, device=device, **engine)
            bf16 = LLM(teacher, student, device=device, dtype="bfloat16", **engine)
            for mode in ("overfill", "full", "pruned"):
                ref = ref_llm.generate(prompts, params, mode=mode)
                got = fp32.generate(prompts, params, mode=mode)
                low = bf16.generate(prompts, params, mode=mode)
                same = all(a.token_ids == b.token_ids for a, b in zip(ref, got))
                ok &= same
                report[f"{name}/{mode}"] = {
                    "fp32_tokens_identical": same,
                    "fp32_max_logprob_diff": max(
                        abs(x.logprob - y.logprob)
                        for a, b in zip(ref, got)
                        for x, y in zip(a.logprobs or [], b.logprobs or [])
                    ),
                    "bf16_mean_prefix_matching": statistics.mean(
                        _common_prefix(a.token_ids, b.token_ids) / len(a.token_ids) for a, b in zip(ref, low)
                    ),
                }
    return report, ok


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# -- timings -----------------------------------------------------------------------------------------------
def spec_of(shape: tuple[int, ...]) -> ModelSpec:
    layers, hidden, inter, heads, kv, head_dim = shape
    return ModelSpec(
        model_type="llama",
        vocab_size=128256,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        rms_norm_eps=1e-5,
        rope=LLAMA3_ROPE,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        qkv_bias=False,
        o_bias=False,
        mlp_bias=False,
        bos_token_id=128000,
        eos_token_ids=(128001,),
        torch_dtype="bfloat16",
    )


def our_model(spec: ModelSpec, device: torch.device) -> CausalLM:
    with device:
        model = CausalLM(spec).to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.init_rotary(device)
    return model.eval()


def hf_model(shape: tuple[int, ...], device: torch.device):  # noqa: ANN201 - transformers is optional here
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, inter, heads, kv, head_dim = shape
    config = LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=heads * head_dim,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    )
    object.__setattr__(config, "hidden_size", hidden)  # transformers 5 refuses 1689 / 24 when validating
    with device:
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.config._attn_implementation = "sdpa"
    return model


def cache_keyword(model: torch.nn.Module) -> str:
    """transformers renames past_key_values= to cache=; a keyword it does not know is silently swallowed."""
    names = inspect.signature(model.forward).parameters
    return "past_key_values" if "past_key_values" in names else "cache"


def decode_case(context_lens: list[int], block_size: int) -> Batch:
    seqs, next_block = [], 0
    for i, ctx in enumerate(context_lens):
        n = -(-ctx // block_size)
        table = tuple(range(next_block, next_block + n))
        next_block += n
        seqs.append(ScheduledSeq(str(i), (1,), ctx - 1, table, True))
    return Batch(tuple(seqs))


def decode_timings(
    shape: tuple[int, ...], cases: dict[str, list[int]], device: torch.device, bw: float
) -> dict:
    spec = spec_of(shape)
    model = our_model(spec, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    block = 16
    need = max(sum(-(-c // block) for c in lens) for lens in cases.values())
    cache = PagedKVCache(
        spec.num_layers, need, block, spec.num_kv_heads, spec.head_dim, torch.bfloat16, device
    )
    runner = ModelRunner(model, cache, tuple(range(spec.num_layers)))
    kv_bytes_per_token = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * 2
    out = {}
    with torch.inference_mode():
        for name, lens in cases.items():
            batch = decode_case(lens, block)
            ms = timed_ms(lambda b=batch: runner.run(b), device)
            floor = (weight_bytes + sum(lens) * kv_bytes_per_token) / bw * 1e3
            out[name] = {"ours_ms": ms, "floor_ms": floor, "ours_over_floor": ms / floor}
    return out


def hf_decode_ms(shape: tuple[int, ...], batch: int, ctx: int, device: torch.device) -> float:
    from transformers import DynamicCache

    model = hf_model(shape, device)
    kw = cache_keyword(model)
    past = DynamicCache()
    with torch.inference_mode():
        ids = torch.randint(0, 32000, (batch, ctx), device=device)
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: past})
        token = torch.randint(0, 32000, (batch, 1), device=device)

        def step() -> None:
            model(input_ids=token, use_cache=True, **{kw: past})
            assert past.get_seq_length() == ctx + 1, f"transformers ignored {kw}=: the anchor is void"
            past.crop(-1)  # a negative count: every transformers 5 release takes it

        ms = timed_ms(step, device)
    return ms


def prefill_timings(shape: tuple[int, ...], length: int, device: torch.device) -> dict:
    spec = spec_of(shape)
    model = our_model(spec, device)
    block = 16
    cache = PagedKVCache(
        spec.num_layers, -(-length // block), block, spec.num_kv_heads, spec.head_dim, torch.bfloat16, device
    )
    runner = ModelRunner(model, cache, tuple(range(spec.num_layers)))
    seq = ScheduledSeq("p", tuple(range(1, length + 1)), 0, tuple(range(cache.num_blocks)), True)
    with torch.inference_mode():
        ours = timed_ms(lambda: runner.run(Batch((seq,))), device, n=5, warm=2)
    hf = hf_model(shape, device)
    ids = torch.randint(0, 32000, (1, length), device=device)
    with torch.inference_mode():
        anchor = timed_ms(lambda: hf(input_ids=ids, use_cache=True, logits_to_keep=1), device, n=5, warm=2)
    return {"tokens": length, "ours_ms": ours, "hf_eager_ms": anchor, "speedup_vs_hf": anchor / ours}


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
        "date": time.strftime("%Y-%m-%d"),
    }

    def emit(key: str, value: object) -> None:
        results[key] = value
        print(json.dumps({key: value}), flush=True)

    emit("ceilings", ceilings(device, args.small))
    bw = results["ceilings"]["copy_GBps_rw"] * 1e9
    report, ok = correctness(str(device))
    emit("correctness_cuda_vs_cpu_fp32", report)

    student = SMALL if args.small else STUDENT_3B_TO_1B
    teacher = SMALL if args.small else TEACHER_3B
    scale = 16 if args.small else 1
    cases = {
        "b1_ctx2048": [2048 // scale],
        "b32_ctx1024": [1024 // scale] * 32,
        "b32_ctx512-1536": [(512 + 1024 * i // 31) // scale for i in range(32)],
        "b128_ctx512-1536": [(512 + 1024 * i // 127) // scale for i in range(128)],
    }
    decode = decode_timings(student, cases, device, bw)
    for name, batch, ctx in (("b1_ctx2048", 1, 2048), ("b32_ctx1024", 32, 1024)):
        hf = hf_decode_ms(student, batch, ctx // scale, device)
        decode[name] |= {"hf_eager_ms": hf, "speedup_vs_hf": hf / decode[name]["ours_ms"]}
    emit("decode_step_student_3b_to_1b_bf16", decode)
    emit("prefill_teacher_3b_bf16", prefill_timings(teacher, 2048 // scale, device))

    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, "gpu_check.json").write_text(json.dumps(results, indent=1))
    if not ok:
        print("FAILED: the CUDA fp32 engine's tokens differ from the CPU fp32 engine's", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
