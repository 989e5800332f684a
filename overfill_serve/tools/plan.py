"""`overfill-serve plan`: roofline capacity planning for three deployments of a teacher/student pair.

`plan(...)` is a pure function returning one frozen `PlanRow` per deployment; plan_cli.py prints the
table and registers the command. The model (formulas, assumptions, what it leaves out) is written down in
docs/capacity_planning.md: keep the two in step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from overfill_serve.errors import ModelConfigError
from overfill_serve.model.spec import ModelSpec
from overfill_serve.tools.gpu_specs import GpuSpec

DEPLOYMENTS = ("overfill-disagg", "full-disagg", "full-colocated")
_EPS = 1e-9  # keeps ceil/floor of values that are whole up to float error from stepping by one


_SHAPE_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "tie_word_embeddings",
)


def _llama(*shape: int | bool) -> dict[str, Any]:
    # head_dim is explicit: the students' hidden sizes are not multiples of the head count.
    fixed = {"model_type": "llama", "vocab_size": 128256, "num_key_value_heads": 8, "head_dim": 128}
    return {**fixed, **dict(zip(_SHAPE_KEYS, shape))}


# Shapes of the released OverFill pairs (DESIGN.md §1), so planning needs no checkpoint on disk.
PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "llama-3.2-3b-overfill-1b": (_llama(28, 3072, 24, 8192, True), _llama(28, 1689, 24, 4505, True)),
    "llama-3.1-8b-overfill-3b": (_llama(32, 4096, 32, 14336, False), _llama(32, 2334, 32, 8171, False)),
}


def preset_pair(name: str) -> tuple[ModelSpec, ModelSpec]:
    """(teacher, student) specs of a built-in pair."""
    if name not in PRESETS:
        raise ModelConfigError(f"--preset: unknown pair {name!r}; known: {', '.join(PRESETS)}")
    teacher, student = PRESETS[name]
    return ModelSpec.from_config(teacher, name), ModelSpec.from_config(student, name)


def _require(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise ModelConfigError(f"{name} must be {rule}, got {value!r}")


@dataclass(frozen=True)
class Workload:
    """Poisson arrivals at `rate_rps`, with mean prompt and output lengths in tokens."""

    rate_rps: float
    prompt_tokens: float
    output_tokens: float

    def __post_init__(self) -> None:
        _require(self.rate_rps > 0, "rate_rps", "> 0", self.rate_rps)
        _require(self.prompt_tokens >= 1, "prompt_tokens", ">= 1", self.prompt_tokens)
        # The teacher samples token 1; a decode pool needs tokens to decode.
        _require(self.output_tokens > 1, "output_tokens", "> 1", self.output_tokens)


@dataclass(frozen=True)
class Targets:
    """Latency targets, in seconds: mean time to first token and mean time per output token."""

    ttft_s: float
    tpot_s: float

    def __post_init__(self) -> None:
        _require(self.ttft_s > 0, "ttft_s", "> 0", self.ttft_s)
        _require(self.tpot_s > 0, "tpot_s", "> 0", self.tpot_s)


@dataclass(frozen=True)
class Assumptions:
    """Efficiency factors and limits; defaults are typical of a tuned engine (see the doc)."""

    mfu: float = 0.5  # achieved / peak FLOP/s in prefill and compute-bound decode
    mbu: float = 0.7  # achieved / peak memory bandwidth in decode and weight reads
    max_prefill_util: float = 0.7  # busy fraction a prefill replica may run at
    mem_util: float = 0.9  # GPU memory usable for weights + KV (rest: activations, graphs, fragmentation)
    link_gbps: float = 25.0  # prefill -> decode KV link, GB/s (gigabytes)
    max_decode_batch: int = 512  # engine cap on concurrent sequences per replica (vLLM: 256-1024)
    dtype_bytes: int = 2  # bf16 weights and KV

    def __post_init__(self) -> None:
        for name in ("mfu", "mbu", "mem_util"):
            _require(0 < getattr(self, name) <= 1, name, "in (0, 1]", getattr(self, name))
        _require(0 < self.max_prefill_util < 1, "max_prefill_util", "in (0, 1)", self.max_prefill_util)
        _require(self.link_gbps > 0, "link_gbps", "> 0", self.link_gbps)
        _require(self.max_decode_batch >= 1, "max_decode_batch", ">= 1", self.max_decode_batch)
        _require(self.dtype_bytes > 0, "dtype_bytes", "> 0", self.dtype_bytes)


@dataclass(frozen=True)
class PlanRow:
    """One deployment's estimate. Sizing fields are None when `unmet` says why it cannot be sized.

    Colocated rows have decode_replicas 0: decode runs on the prefill replicas. decode_batch is the mean
    batch per decode replica at the planned load; decode_batch_max the largest meeting TPOT and memory.
    """

    deployment: str
    prefill_gpu: str
    decode_gpu: str
    prefill_s: float  # one prompt's prefill, unqueued
    kv_transfer_s: float  # prompt KV over the link (0 colocated)
    prefill_replicas: int | None = None
    decode_replicas: int | None = None
    decode_batch_max: int | None = None
    decode_batch: float | None = None
    decode_step_s: float | None = None  # step time at decode_batch_max
    ttft_s: float | None = None
    tpot_s: float | None = None
    usd_per_hour: float | None = None
    usd_per_m_tokens: float | None = None  # per million output tokens
    unmet: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.unmet


def kv_bytes_per_token(spec: ModelSpec, dtype_bytes: int = 2) -> int:
    """KV of one token over the layers whose KV is held: a student holds its kept teacher layers' KV, one
    per student layer, with the shared geometry."""
    return spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * dtype_bytes


def streamed_parameters(spec: ModelSpec) -> int:
    """Weights read (and multiplied) per decode step: all but an untied input embedding, which is gathered."""
    return spec.num_parameters() - (0 if spec.tie_word_embeddings else spec.vocab_size * spec.hidden_size)


def prefill_flops(spec: ModelSpec, prompt_tokens: float) -> float:
    """Linear layers over every prompt token, the LM head on the last one only, causal attention."""
    head = spec.vocab_size * spec.hidden_size
    body = streamed_parameters(spec) - head
    attention = 2 * spec.num_layers * spec.num_heads * spec.head_dim * prompt_tokens**2
    return 2 * body * prompt_tokens + 2 * head + attention


@dataclass(frozen=True)
class _Decode:
    """Decode step time t(B) = max(a + b·B, c·B): weight read, KV read per sequence, FLOPs per sequence."""

    a: float
    b: float
    c: float
    fit_max: float  # sequences that fit in memory beside the weights
    weight_bytes: float

    def step(self, batch: float) -> float:
        return max(self.a + self.b * batch, self.c * batch)

    def max_batch(self, tpot_s: float, cap: int) -> int:
        by_tpot = min((tpot_s - self.a) / self.b, tpot_s / self.c)
        return max(0, math.floor(min(by_tpot, self.fit_max, cap) + _EPS))

    def batch_for(self, tokens_per_s: float) -> float:
        # The smallest B with B / t(B) = tokens_per_s; callers keep tokens_per_s within the max batch's rate.
        return self.a * tokens_per_s / (1 - self.b * tokens_per_s)


def _decode(model: ModelSpec, gpu: GpuSpec, context: float, a: Assumptions) -> _Decode:
    bw = gpu.mem_bw_gbps * 1e9 * a.mbu
    kv_seq = kv_bytes_per_token(model, a.dtype_bytes) * context
    weights = model.num_parameters() * a.dtype_bytes
    flops = gpu.bf16_tflops * 1e12 * a.mfu
    return _Decode(
        a=streamed_parameters(model) * a.dtype_bytes / bw,
        b=kv_seq / bw,
        c=2 * streamed_parameters(model) / flops,
        fit_max=(gpu.memory_gb * 1e9 * a.mem_util - weights) / kv_seq,
        weight_bytes=weights,
    )


def _decode_unmet(d: _Decode, gpu: GpuSpec, what: str, tpot_s: float, a: Assumptions) -> list[str]:
    if d.fit_max < 1:
        return [
            f"{what} weights ({d.weight_bytes / 1e9:.1f} GB) plus one sequence's KV exceed "
            f"{gpu.name}'s usable {gpu.memory_gb * a.mem_util:.1f} GB"
        ]
    if d.step(1) > tpot_s:
        return [
            f"TPOT target {tpot_s * 1e3:.1f} ms is below the single-sequence floor "
            f"{d.step(1) * 1e3:.1f} ms ({what} on {gpu.name})"
        ]
    return []


def _md1_wait(rho: float, service_s: float) -> float:
    # M/D/1 mean queueing delay: Poisson arrivals, deterministic service.
    return rho * service_s / (2 * (1 - rho))


def plan(
    teacher: ModelSpec,
    student: ModelSpec,
    prefill_gpu: GpuSpec,
    decode_gpu: GpuSpec,
    workload: Workload,
    targets: Targets,
    assumptions: Assumptions | None = None,
) -> list[PlanRow]:
    """Replicas, latencies and cost of the three deployments, in `DEPLOYMENTS` order."""
    a = assumptions or Assumptions()
    prompt = workload.prompt_tokens
    big_bw, big_flops = prefill_gpu.mem_bw_gbps * 1e9 * a.mbu, prefill_gpu.bf16_tflops * 1e12 * a.mfu
    prefill_s = max(
        prefill_flops(teacher, prompt) / big_flops, streamed_parameters(teacher) * a.dtype_bytes / big_bw
    )
    unmet = []
    held = teacher.num_parameters() * a.dtype_bytes + kv_bytes_per_token(teacher, a.dtype_bytes) * prompt
    if held > prefill_gpu.memory_gb * 1e9 * a.mem_util:
        unmet.append(
            f"teacher weights plus one prompt's KV ({held / 1e9:.1f} GB) exceed {prefill_gpu.name}'s "
            f"usable {prefill_gpu.memory_gb * a.mem_util:.1f} GB"
        )
    planner = _Planner(workload, targets, a, prefill_gpu, prefill_s, tuple(unmet))

    def transfer_s(decoder: ModelSpec) -> float:
        return kv_bytes_per_token(decoder, a.dtype_bytes) * prompt / (a.link_gbps * 1e9)

    return [
        planner.row(DEPLOYMENTS[0], student, decode_gpu, "student", transfer_s(student)),
        planner.row(DEPLOYMENTS[1], teacher, decode_gpu, "teacher", transfer_s(teacher)),
        planner.row(DEPLOYMENTS[2], teacher, prefill_gpu, "teacher", 0.0),
    ]


@dataclass(frozen=True)
class _Planner:
    """What the three deployments share: the workload, the targets and the teacher's prefill."""

    workload: Workload
    targets: Targets
    a: Assumptions
    prefill_gpu: GpuSpec
    prefill_s: float
    prefill_unmet: tuple[str, ...]

    def row(self, name: str, decoder: ModelSpec, gpu: GpuSpec, what: str, transfer_s: float) -> PlanRow:
        """One deployment; `decoder` on `gpu` decodes (`what` names it in unmet targets)."""
        a, t, prefill_s = self.a, self.targets, self.prefill_s
        w = self.workload
        base = PlanRow(name, self.prefill_gpu.name, gpu.name, prefill_s, transfer_s)
        d = _decode(decoder, gpu, w.prompt_tokens + w.output_tokens / 2, a)  # mean context over decode
        unmet = [*self.prefill_unmet, *_decode_unmet(d, gpu, what, t.tpot_s, a)]
        slack = t.ttft_s - prefill_s - transfer_s
        if slack <= 0:
            link = f" + KV transfer ({a.link_gbps:g} GB/s)" if transfer_s else ""
            floor = f"{(prefill_s + transfer_s) * 1e3:.0f} ms"
            unmet.append(f"TTFT target {t.ttft_s * 1e3:.0f} ms is below the prefill{link} floor of {floor}")
        if unmet:
            return replace(base, unmet=tuple(unmet))
        shared = name == DEPLOYMENTS[2]  # colocated: decode runs on the prefill replicas
        n_p = self._prefill_replicas(d, slack, shared)
        if n_p is None:
            return replace(base, unmet=("no replica count up to a million meets the targets",))
        decode_tokens_per_s = self.decode_tokens_per_s
        u = w.rate_rps * prefill_s / n_p if shared else 0.0
        b_max = d.max_batch(t.tpot_s * (1 - u), a.max_decode_batch)
        n_d = 0 if shared else math.ceil(decode_tokens_per_s / (b_max / d.step(b_max)) - _EPS)
        batch = d.batch_for(decode_tokens_per_s / (n_p if shared else n_d) / (1 - u))
        usd = n_p * self.prefill_gpu.usd_per_hour + n_d * gpu.usd_per_hour
        return replace(
            base,
            prefill_replicas=n_p,
            decode_replicas=n_d,
            decode_batch_max=b_max,
            decode_batch=batch,
            decode_step_s=d.step(b_max),
            ttft_s=_md1_wait(w.rate_rps * prefill_s / n_p, prefill_s) + prefill_s + transfer_s,
            tpot_s=d.step(batch) / (1 - u),
            usd_per_hour=usd,
            usd_per_m_tokens=usd / (w.rate_rps * w.output_tokens * 3600) * 1e6,
        )

    @property
    def decode_tokens_per_s(self) -> float:
        return self.workload.rate_rps * (self.workload.output_tokens - 1)  # token 1 is the prefill's

    def _prefill_replicas(self, d: _Decode, slack: float, shared: bool) -> int | None:
        """Prefill replicas meeting the TTFT slack; colocated, also carrying the decode (None: none does)."""
        a, lam, prefill_s = self.a, self.workload.rate_rps, self.prefill_s
        # Highest utilization whose M/D/1 wait fits the TTFT slack: rho·t/(2(1-rho)) <= s <=> rho <= 2s/(t+2s).
        rho_max = min(a.max_prefill_util, 2 * slack / (prefill_s + 2 * slack))
        n_p = max(1, math.ceil(lam * prefill_s / rho_max - _EPS))
        if not shared:
            return n_p
        decode_tokens_per_s = self.decode_tokens_per_s

        def decode_fits(n: int) -> bool:
            # Prefill takes u = rate·prefill_s/n of a colocated replica's time; decode steps stretch by 1/(1-u).
            u = lam * prefill_s / n
            b = d.max_batch(self.targets.tpot_s * (1 - u), a.max_decode_batch)
            return b >= 1 and decode_tokens_per_s / n / (1 - u) <= b / d.step(b) + _EPS

        # Every condition eases as n grows, so the first n that fits is the cheapest.
        return next((n for n in range(n_p, n_p + 1_000_000) if decode_fits(n)), None)
