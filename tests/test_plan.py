"""`overfill-serve plan`: the roofline capacity planner, checked against a hand computation of the documented
formulas (docs/capacity_planning.md) and against properties any sane plan has."""

from __future__ import annotations

import argparse
import io
import json
import math
import shlex
from pathlib import Path

import pytest

from overfill_serve.errors import ModelConfigError
from overfill_serve.tools.gpu_specs import BUILTIN_GPUS, GpuSpec, gpu_spec, load_gpu_specs
from overfill_serve.tools.plan import (
    DEPLOYMENTS,
    PRESETS,
    Assumptions,
    PlanRow,
    Targets,
    Workload,
    plan,
    preset_pair,
)
from overfill_serve.tools.plan_cli import add_plan_command

PAIR_3B = "llama-3.2-3b-overfill-1b"
# Pinned here, not read from the shipped table, so a price update there cannot move the hand computation.
H100 = GpuSpec("H100", mem_bw_gbps=3350, bf16_tflops=989, memory_gb=80, usd_per_hour=2.70)
L4 = GpuSpec("L4", mem_bw_gbps=300, bf16_tflops=121, memory_gb=24, usd_per_hour=0.60)
WORKLOAD = Workload(rate_rps=10, prompt_tokens=2000, output_tokens=200)
TARGETS = Targets(ttft_s=1.0, tpot_s=0.050)


def _cli(*argv: str) -> tuple[list[PlanRow], str]:
    parser = argparse.ArgumentParser(prog="overfill-serve")
    add_plan_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *argv])
    out = io.StringIO()
    rows = args.func(args, out=out)
    return rows, out.getvalue()


def _rows(rate: float = 10, prefill: GpuSpec = H100, decode: GpuSpec = L4, **targets: float) -> list[PlanRow]:
    teacher, student = preset_pair(PAIR_3B)
    workload = Workload(rate_rps=rate, prompt_tokens=2000, output_tokens=200)
    return plan(
        teacher, student, prefill, decode, workload, Targets(**{"ttft_s": 1.0, "tpot_s": 0.05, **targets})
    )


def test_overfill_row_matches_a_hand_computation(tmp_path: Path) -> None:
    # Student (OverFill decoder of Llama-3.2-3B): hidden 1689, inter 4505, 28 layers, 24 heads, 8 kv heads,
    # head_dim 128, vocab 128256, tied embeddings.
    attn = 1689 * 128 * (2 * 24 + 2 * 8)  # q, o: 24 heads; k, v: 8 heads
    mlp = 3 * 1689 * 4505  # gate, up, down
    per_layer = attn + mlp + 2 * 1689  # + two RMSNorms
    params = 28 * per_layer + 128256 * 1689 + 1689  # + tied embedding / LM head + final norm
    assert params == 1_243_288_101
    teacher, student = preset_pair(PAIR_3B)
    assert student.num_parameters() == params

    # Decode on an L4 at MBU 0.7, bf16.
    weight_bytes = params * 2
    kv_per_token = 28 * 2 * 8 * 128 * 2  # layers · (K, V) · kv heads · head_dim · bytes = 114688
    context = 2000 + 200 / 2  # mean context over the decode steps
    kv_per_seq = kv_per_token * context
    bandwidth = 300e9 * 0.7
    weight_read_s = weight_bytes / bandwidth  # ≈ 11.84 ms
    kv_read_s = kv_per_seq / bandwidth  # ≈ 1.147 ms per sequence
    by_tpot = (0.050 - weight_read_s) / kv_read_s  # ≈ 33.3
    by_memory = (24e9 * 0.9 - weight_bytes) / kv_per_seq  # ≈ 79.4
    by_compute = 0.050 / (2 * params / (121e12 * 0.5))  # ≈ 1217
    batch_max = math.floor(min(by_tpot, by_memory, by_compute, 512))
    assert batch_max == 33
    step_s = weight_read_s + batch_max * kv_read_s  # ≈ 49.69 ms
    tokens_per_s = batch_max / step_s  # ≈ 664 per replica
    decode_replicas = math.ceil(10 * (200 - 1) / tokens_per_s)  # token 1 is the teacher's
    assert decode_replicas == 3
    # Prefill: 10 req/s × ≈24 ms per prompt on an H100 stays far below the 0.7 utilization cap: one replica.
    usd_per_hour = 1 * 2.70 + decode_replicas * 0.60
    usd_per_m = usd_per_hour / (10 * 200 * 3600) * 1e6
    assert usd_per_m == pytest.approx(0.625)

    row = plan(teacher, student, H100, L4, WORKLOAD, TARGETS)[0]
    assert row.deployment == "overfill-disagg" and row.ok
    assert row.decode_batch_max == batch_max
    assert row.decode_step_s == pytest.approx(step_s)
    assert (row.prefill_replicas, row.decode_replicas) == (1, decode_replicas)
    assert row.usd_per_hour == pytest.approx(usd_per_hour)
    assert row.usd_per_m_tokens == pytest.approx(usd_per_m)

    # The CLI prints the same figures (the GPU table pinned through --gpu-specs).
    specs = tmp_path / "gpus.json"
    specs.write_text(
        json.dumps({g.name: {k: v for k, v in vars(g).items() if k != "name"} for g in (H100, L4)})
    )
    argv = f"--preset {PAIR_3B} --gpu-specs {specs} --prefill-gpu H100 --decode-gpu L4 --rate 10"
    rows, text = _cli(
        *shlex.split(argv + " --prompt-tokens 2000 --output-tokens 200 --ttft-ms 1000 --tpot-ms 50")
    )
    assert rows[0] == row
    assert row.ttft_s is not None and row.decode_batch is not None
    line = next(ln for ln in text.splitlines() if ln.startswith("overfill-disagg")).split()
    assert line[:4] == ["overfill-disagg", "H100x1", "L4x3", f"{row.decode_batch:.1f}/33"]
    assert line[4:] == [f"{row.ttft_s * 1e3:.0f}", "ms", "49.5", "ms", "4.50", "0.625"]
    assert [ln.split()[0] for ln in text.splitlines()[4:7]] == list(DEPLOYMENTS)


def test_ok_rows_meet_their_targets_and_limits() -> None:
    for rate in (0.5, 10, 100):
        for decode in (BUILTIN_GPUS["L4"], BUILTIN_GPUS["L40S"], H100):
            for row in _rows(rate, decode=decode):
                assert row.ok, row.unmet
                assert row.ttft_s is not None and row.ttft_s <= 1.0
                assert row.tpot_s is not None and row.tpot_s <= 0.05 + 1e-12
                assert row.decode_batch is not None and row.decode_batch <= (row.decode_batch_max or 0)
                assert row.prefill_replicas is not None and rate * row.prefill_s / row.prefill_replicas <= 0.7


def test_overfill_decode_pool_is_no_bigger_than_the_full_models() -> None:
    for name in PRESETS:
        teacher, student = preset_pair(name)
        for rate in (1, 10, 50, 200):
            for decode in BUILTIN_GPUS.values():
                rows = plan(teacher, student, H100, decode, Workload(rate, 2000, 200), TARGETS)
                overfill, full = rows[0], rows[1]
                if full.ok:
                    assert overfill.ok and overfill.decode_replicas is not None
                    assert overfill.decode_replicas <= (full.decode_replicas or 0)
                    assert (overfill.decode_batch_max or 0) >= (full.decode_batch_max or 0)
                assert overfill.kv_transfer_s == pytest.approx(full.kv_transfer_s)  # same kept layers


def test_cost_per_token_is_about_flat_in_rate() -> None:
    # Replicas scale with the rate, so $/M tokens only moves by rounding up whole replicas.
    costs = {rate: [r.usd_per_m_tokens or math.nan for r in _rows(rate)] for rate in (200, 400, 800)}
    for col in range(3):
        per_m = [costs[rate][col] for rate in costs]
        assert max(per_m) / min(per_m) < 1.1, per_m
    hourly = [r.usd_per_hour or 0 for r in _rows(800)], [r.usd_per_hour or 0 for r in _rows(400)]
    assert all(1.8 < a / b < 2.2 for a, b in zip(*hourly))


def test_colocated_shares_the_big_pool() -> None:
    row = _rows(100)[2]
    assert row.deployment == "full-colocated" and row.decode_replicas == 0 and row.kv_transfer_s == 0
    assert row.usd_per_hour == pytest.approx((row.prefill_replicas or 0) * H100.usd_per_hour)
    # Prefill steals u = rate · prefill_s / N of the time: TPOT is the decode step stretched by 1 / (1 - u).
    assert row.prefill_replicas is not None and row.decode_batch is not None
    u = 100 * row.prefill_s / row.prefill_replicas
    bandwidth = 3350e9 * 0.7
    teacher = preset_pair(PAIR_3B)[0]
    step = (teacher.num_parameters() * 2 + row.decode_batch * 28 * 2 * 8 * 128 * 2 * 2100) / bandwidth
    assert row.tpot_s == pytest.approx(step / (1 - u))


def test_impossible_targets_are_reported_not_sized() -> None:
    rows = _rows(tpot_s=0.001)
    assert not any(r.ok for r in rows)
    for r in rows:
        assert r.decode_replicas is None and r.usd_per_m_tokens is None
        assert any("TPOT target 1.0 ms is below the single-sequence floor" in why for why in r.unmet)
    rows = _rows(ttft_s=0.01)
    assert all(any("TTFT target 10 ms" in why for why in r.unmet) for r in rows)
    _, text = _cli("--preset", PAIR_3B, "--rate", "10", "--tpot-ms", "1")
    assert "targets not met:" in text and "unmet" in text and "nan" not in text
    # An 8B teacher at 8k-token prompts cannot decode on an L4 within 50 ms, while the OverFill student can.
    teacher, student = preset_pair("llama-3.1-8b-overfill-3b")
    rows = plan(teacher, student, H100, L4, Workload(10, 8000, 200), TARGETS)
    assert rows[0].ok and not rows[1].ok and "teacher on L4" in rows[1].unmet[0]


def test_weights_that_do_not_fit_are_reported() -> None:
    tiny = GpuSpec("tiny", mem_bw_gbps=100, bf16_tflops=10, memory_gb=4, usd_per_hour=0.1)
    rows = _rows(decode=tiny)
    assert rows[0].ok  # the 2.5 GB student fits a 4 GB card; the 6.4 GB teacher does not
    assert not rows[1].ok and "teacher weights (6.4 GB) plus one sequence's KV exceed" in rows[1].unmet[0]
    rows = _rows(prefill=tiny)
    assert not any(r.ok for r in rows) and all(
        "teacher weights plus one prompt's KV" in r.unmet[0] for r in rows
    )


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: Workload(-1, 2000, 200), "rate_rps"),
        (lambda: Workload(10, 0, 200), "prompt_tokens"),
        (lambda: Workload(10, 2000, 1), "output_tokens"),
        (lambda: Targets(0, 0.05), "ttft_s"),
        (lambda: Targets(1, -0.05), "tpot_s"),
        (lambda: Assumptions(mfu=1.5), "mfu"),
        (lambda: Assumptions(mbu=0), "mbu"),
        (lambda: Assumptions(max_prefill_util=1), "max_prefill_util"),
        (lambda: Assumptions(link_gbps=-1), "link_gbps"),
        (lambda: gpu_spec("B300", BUILTIN_GPUS, "--decode-gpu"), "--decode-gpu"),
        (lambda: preset_pair("llama-9-overfill"), "--preset"),
        (lambda: GpuSpec("x", mem_bw_gbps=-1, bf16_tflops=1, memory_gb=1, usd_per_hour=1), "mem_bw_gbps"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(make, name: str) -> None:
    with pytest.raises(ModelConfigError, match=name):
        make()


def test_cli_bad_inputs() -> None:
    with pytest.raises(ModelConfigError, match="rate_rps"):
        _cli("--preset", PAIR_3B, "--rate", "-1")
    with pytest.raises(ModelConfigError, match="--prefill-gpu: unknown GPU type 'B300'"):
        _cli("--preset", PAIR_3B, "--rate", "1", "--prefill-gpu", "B300")
    with pytest.raises(ModelConfigError, match="--rate"):
        _cli("--preset", PAIR_3B)
    with pytest.raises(ModelConfigError, match="--preset"):
        _cli("--rate", "1")


def test_model_directories_give_the_preset_plan(tmp_path: Path) -> None:
    teacher_cfg, student_cfg = PRESETS[PAIR_3B]
    for name, cfg in (("t", teacher_cfg), ("s", student_cfg)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
    rows, _ = _cli(
        "--prefill-model", str(tmp_path / "t"), "--decode-model", str(tmp_path / "s"), "--rate", "10"
    )
    preset_rows, _ = _cli("--preset", PAIR_3B, "--rate", "10")
    assert rows == preset_rows


def test_gpu_specs_file_overrides_and_extends(tmp_path: Path) -> None:
    toml = tmp_path / "gpus.toml"
    toml.write_text(
        "[l4]\nmem_bw_gbps = 300\nbf16_tflops = 121\nmemory_gb = 24\nusd_per_hour = 0.30\n"
        "[B200]\nmem_bw_gbps = 8000\nbf16_tflops = 2250\nmemory_gb = 180\nusd_per_hour = 6.0\n"
    )
    table = load_gpu_specs(toml)
    assert table["L4"].usd_per_hour == 0.30 and "l4" not in table  # names match case-insensitively
    assert table["B200"].memory_gb == 180 and table["H100"] == BUILTIN_GPUS["H100"]
    _, text = _cli("--gpu-specs", str(toml), "--list-gpus")
    assert "B200" in text and "0.30" in text
    toml.write_text("[L4]\nmem_bw_gbps = 300\n")
    with pytest.raises(ModelConfigError, match="missing"):
        load_gpu_specs(toml)
    with pytest.raises(ModelConfigError, match="--gpu-specs"):
        load_gpu_specs(tmp_path / "absent.json")
