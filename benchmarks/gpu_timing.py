"""The timing half of `gpu_check.py`: ceilings, our decode step and prefill, and their anchors (a plain CUDA-
graphed torch step, transformers eager, the HBM and compute floors). Random weights, bf16."""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from graph_anchor import captured_step, make_weights, weight_bytes

from overfill_serve.engine.batch import Batch, ScheduledSeq
from overfill_serve.engine.decode_graphs import DecodeGraphs
from overfill_serve.engine.runner import ModelRunner
from overfill_serve.kv.paged_cache import PagedKVCache
from overfill_serve.model.llama import CausalLM
from overfill_serve.model.padding import padded_size
from overfill_serve.model.spec import ModelSpec, RopeSpec
from overfill_serve.tools.plan import kv_bytes_per_token, prefill_flops

VOCAB, BLOCK = 128256, 16
BACKEND = "triton" if torch.cuda.is_available() else "torch"


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    inter: int
    heads: int
    kv: int
    head_dim: int

    def padded(self, multiple: int) -> ModelShape:
        hidden, inter = padded_size(self.hidden, multiple), padded_size(self.inter, multiple)
        return ModelShape(self.layers, hidden, inter, self.heads, self.kv, self.head_dim)


def spec_of(shape: ModelShape) -> ModelSpec:
    return ModelSpec(
        model_type="llama", vocab_size=VOCAB, hidden_size=shape.hidden, intermediate_size=shape.inter,
        num_layers=shape.layers, num_heads=shape.heads, num_kv_heads=shape.kv, head_dim=shape.head_dim,
        rms_norm_eps=1e-5, rope=RopeSpec(500000.0, "llama3", 32.0, 1.0, 4.0, 8192),
        max_position_embeddings=131072, tie_word_embeddings=True, qkv_bias=False, o_bias=False,
        mlp_bias=False, bos_token_id=128000, eos_token_ids=(128001,), torch_dtype="bfloat16",
    )  # fmt: skip


def timed_ms(fn: Callable[[], object], device: torch.device, n: int = 20, warm: int = 3) -> float:
    """Median milliseconds of fn(); CUDA events on a GPU (host work that delays the GPU counts), wall clock
    elsewhere."""
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
    copy_ms = timed_ms(lambda: torch.empty_like(x).copy_(x), device)
    m = 512 if small else 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    mm_ms = timed_ms(lambda: a @ a, device)
    return {"copy_GBps_rw": 2 * n / copy_ms / 1e6, "bf16_TFLOPs": 2 * m**3 / mm_ms / 1e9}


def our_model(spec: ModelSpec, device: torch.device) -> CausalLM:
    with device:
        model = CausalLM(spec).to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.init_rotary(device)
    return model.eval()


def decode_batch(context_lens: list[int]) -> Batch:
    seqs, start = [], 0
    for i, ctx in enumerate(context_lens):
        n = -(-ctx // BLOCK)
        seqs.append(ScheduledSeq(str(i), (1,), ctx - 1, tuple(range(start, start + n)), True))
        start += n
    return Batch(tuple(seqs))


def decode_step_ms(
    shape: ModelShape, cases: dict[str, list[int]], device: torch.device, bw: float, anchors: bool
) -> dict:
    """Per case: our CUDA-graphed paged step, the HBM floor, and (with `anchors`) the plain CUDA-graph torch
    step at the same lengths plus transformers eager at equal lengths."""
    out = _ours(shape, cases, device, bw)
    if anchors and device.type == "cuda":
        torch.cuda.empty_cache()
        dims = (shape.layers, shape.hidden, shape.inter, shape.heads, shape.kv, shape.head_dim)
        weights = make_weights(dims, device, torch.bfloat16, VOCAB)
        for name, lens in cases.items():
            replay = captured_step(weights, lens, torch.bfloat16).replay
            out[name]["plain_graph_ms"] = timed_ms(replay, device)
            out[name]["plain_graph_over_ours"] = out[name]["plain_graph_ms"] / out[name]["ours_ms"]
        out["plain_graph_weight_GB"] = weight_bytes(weights) / 1e9
        del weights
        torch.cuda.empty_cache()
        for name, lens in cases.items():
            if len(set(lens)) == 1 and len(lens) <= 32:
                out[name]["hf_eager_ms"] = hf_decode_ms(shape, len(lens), lens[0], device)
    return out


def _ours(shape: ModelShape, cases: dict[str, list[int]], device: torch.device, bw: float) -> dict:
    spec = spec_of(shape)
    model = our_model(spec, device)
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    blocks = max(sum(-(-c // BLOCK) for c in lens) for lens in cases.values())
    cache = PagedKVCache(
        spec.num_layers, blocks, BLOCK, spec.num_kv_heads, spec.head_dim, torch.bfloat16, device
    )
    kept = tuple(range(spec.num_layers))
    longest = max(max(lens) for lens in cases.values())
    graphs = DecodeGraphs(
        model, cache.layers(kept), BLOCK, 128, longest + 1, BACKEND, capture=device.type == "cuda"
    )
    runner = ModelRunner(model, cache, kept, BACKEND, graphs)
    out = {}
    for name, lens in cases.items():
        batch = decode_batch(lens)
        ms = timed_ms(lambda b=batch: runner.run(b), device)
        floor = (wbytes + sum(lens) * kv_bytes_per_token(spec)) / bw * 1e3
        out[name] = {"ours_ms": ms, "floor_ms": floor, "ours_over_floor": ms / floor}
    return out


def hf_decode_ms(shape: ModelShape, batch: int, ctx: int, device: torch.device) -> float:
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        num_hidden_layers=shape.layers, hidden_size=shape.heads * shape.head_dim, intermediate_size=shape.inter,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv, head_dim=shape.head_dim,
        vocab_size=VOCAB, tie_word_embeddings=True, rope_theta=500000.0,
    )  # fmt: skip
    object.__setattr__(
        config, "hidden_size", shape.hidden
    )  # transformers 5 refuses 1689 / 24 when validating
    with device:
        model: Any = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.config._attn_implementation = "sdpa"
    # transformers renames past_key_values= to cache=; a keyword it does not know is silently swallowed.
    kw = "past_key_values" if "past_key_values" in inspect.signature(model.forward).parameters else "cache"
    past = DynamicCache()
    with torch.inference_mode():
        model(input_ids=torch.randint(0, 32000, (batch, ctx), device=device), logits_to_keep=1, **{kw: past})
        token = torch.randint(0, 32000, (batch, 1), device=device)

        def step() -> None:
            model(input_ids=token, use_cache=True, **{kw: past})
            assert past.get_seq_length() == ctx + 1, f"transformers ignored {kw}=: the anchor is void"
            past.crop(-1)  # a negative count: every transformers 5 release takes it

        return timed_ms(step, device)


def prefill_ms(spec: ModelSpec, length: int, device: torch.device, peak_flops: float) -> dict:
    model = our_model(spec, device)
    blocks = -(-length // BLOCK)
    cache = PagedKVCache(
        spec.num_layers, blocks, BLOCK, spec.num_kv_heads, spec.head_dim, torch.bfloat16, device
    )
    runner = ModelRunner(model, cache, tuple(range(spec.num_layers)), BACKEND)
    batch = Batch((ScheduledSeq("p", tuple(range(1, length + 1)), 0, tuple(range(blocks)), True),))
    ms = timed_ms(lambda: runner.run(batch), device, n=5, warm=2)
    floor = prefill_flops(spec, length) / peak_flops * 1e3
    return {"tokens": length, "ours_ms": ms, "compute_floor_ms": floor, "fraction_of_peak": floor / ms}


def attention_alone(device: torch.device, bw: float, small: bool) -> dict:
    """The decode kernel at 64 sequences x 1K-3K (mean 2K) tokens, the released geometry (24 / 8 heads x 128),
    against reading that KV once."""
    from overfill_serve.model import triton_attention as kernels

    lens = [(1024 + 2048 * i // 63) // (16 if small else 1) for i in range(64)]
    batch = decode_batch(lens)
    blocks = sum(len(s.block_table) for s in batch.seqs)
    cache = PagedKVCache(1, blocks, BLOCK, 8, 128, torch.bfloat16, device)
    cache.tensor.normal_()
    k_cache, v_cache = cache.layer(0)
    width = max(len(s.block_table) for s in batch.seqs)
    tables = torch.zeros(64, width, dtype=torch.int32)
    for i, s in enumerate(batch.seqs):
        tables[i, : len(s.block_table)] = torch.tensor(s.block_table)
    tables, ctx = tables.to(device), torch.tensor(lens, dtype=torch.int32, device=device)
    q = torch.randn(64, 24, 128, device=device, dtype=torch.bfloat16)
    runs = dict(n=1, warm=0) if small else {}  # interpreted on CPU: one call says it works
    ms = timed_ms(
        lambda: kernels.decode_attention(q, k_cache, v_cache, tables, ctx, 128**-0.5), device, **runs
    )
    read_ms = sum(lens) * 2 * 8 * 128 * 2 / bw * 1e3
    return {"tokens": sum(lens), "kernel_ms": ms, "kv_read_once_ms": read_ms, "over_read_once": ms / read_ms}
