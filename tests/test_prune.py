from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from overfill_serve.errors import ModelConfigError
from overfill_serve.model.prune import prune_model
from overfill_serve.model.random_model import make_random_model
from overfill_serve.model.spec import KEPT_LAYERS_KEY, ModelSpec

CALIB = 256  # tokens: enough to rank channels, small enough to keep the suite fast


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits[0]


def _kept_columns(teacher: torch.Tensor, student: torch.Tensor) -> list[int]:
    """Which teacher columns the student's columns are (weights are random, so columns are unique)."""
    return [int((teacher == student[:, [j]]).all(0).nonzero()) for j in range(student.shape[1])]


def _edit_teacher(src: Path, dst: Path, edit: dict[str, torch.Tensor]) -> Path:
    shutil.copytree(src, dst)
    tensors = _tensors(src)
    tensors.update(edit)
    save_file(tensors, str(dst / "model.safetensors"), {"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Untied with o_proj bias: every slicing rule has a tensor to act on.
    return make_random_model(
        tmp_path_factory.mktemp("llama"),
        num_layers=4,
        tie_word_embeddings=False,
        attention_bias=True,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    )


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_model(
        tmp_path_factory.mktemp("qwen2"), model_type="qwen2", num_layers=2, rope_theta=1e6
    )


@pytest.mark.parametrize("teacher", ["llama", "qwen2"])
def test_student_keeps_kv_layout(request: pytest.FixtureRequest, tmp_path: Path, teacher: str) -> None:
    src: Path = request.getfixturevalue(teacher)
    report = prune_model(src, tmp_path, hidden_size=48, intermediate_size=96, max_calibration_tokens=CALIB)
    t, s = ModelSpec.from_dir(src), ModelSpec.from_dir(tmp_path)
    assert (s.hidden_size, s.intermediate_size, s.num_layers) == (48, 96, t.num_layers)
    for field in (
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "rope",
        "vocab_size",
        "eos_token_ids",
        "model_type",
    ):
        assert getattr(s, field) == getattr(t, field), field
    assert (s.tie_word_embeddings, s.qkv_bias, s.o_bias) == (t.tie_word_embeddings, t.qkv_bias, t.o_bias)
    assert s.kept_layers is None  # width-only, like the released OverFill decoder
    assert report.calibration_tokens == CALIB
    assert (report.teacher_hidden_size, report.student_hidden_size) == (64, 48)
    assert (report.teacher_intermediate_size, report.student_intermediate_size) == (128, 96)
    assert report.student_parameters == sum(v.numel() for v in _tensors(tmp_path).values())
    assert report.student_parameters < report.teacher_parameters
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (tmp_path / name).read_bytes() == (src / name).read_bytes()


def test_hidden_not_multiple_of_heads(llama: Path, qwen2: Path, tmp_path: Path) -> None:
    for name, src in (("llama", llama), ("qwen2", qwen2)):
        out = tmp_path / name
        prune_model(src, out, hidden_size=50, intermediate_size=100, max_calibration_tokens=CALIB)
        spec = ModelSpec.from_dir(out)
        assert (spec.hidden_size, spec.head_dim, spec.num_heads) == (50, 16, 4)
        tensors = _tensors(out)
        kv = spec.num_kv_heads * spec.head_dim
        assert tensors["model.embed_tokens.weight"].shape == (spec.vocab_size, 50)
        assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (64, 50)
        assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (kv, 50)
        assert tensors["model.layers.0.self_attn.k_proj.bias"].shape == (kv,)
        assert tensors["model.layers.0.self_attn.o_proj.weight"].shape == (50, 64)
        assert tensors["model.layers.0.mlp.gate_proj.weight"].shape == (100, 50)
        assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (50, 100)
        assert tensors["model.norm.weight"].shape == (50,)
    assert _tensors(tmp_path / "llama")["model.layers.1.self_attn.o_proj.bias"].shape == (50,)
    assert _tensors(tmp_path / "llama")["lm_head.weight"].shape == (512, 50)
    # transformers' Llama refuses such a config, its Qwen2 runs it: a check that the slices fit together.
    logits = _logits(tmp_path / "qwen2", torch.arange(3, 30).unsqueeze(0))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("kept_layers", "expected"), [("firstlast", (0, 3)), ("last", (2, 3)), ([1, 2], (1, 2))]
)
def test_depth_prune_copies_kept_layers(llama: Path, tmp_path: Path, kept_layers, expected) -> None:
    report = prune_model(llama, tmp_path, num_layers=2, kept_layers=kept_layers)
    assert report.kept_layers == expected and report.student_num_layers == 2
    assert report.calibration_tokens == 0  # depth alone needs no calibration
    config = json.loads((tmp_path / "config.json").read_text())
    assert config[KEPT_LAYERS_KEY] == list(expected) and config["num_hidden_layers"] == 2
    assert ModelSpec.from_dir(tmp_path).kept_layers == expected
    teacher, student = _tensors(llama), _tensors(tmp_path)
    assert not any(k.startswith("model.layers.2.") for k in student)
    for name, value in student.items():
        if name.startswith("model.layers."):
            j, rest = name.split(".", 3)[2:]
            assert torch.equal(value, teacher[f"model.layers.{expected[int(j)]}.{rest}"]), name
        else:
            assert torch.equal(value, teacher[name]), name


def test_depth_map_composes_with_source_map(llama: Path, tmp_path: Path) -> None:
    prune_model(llama, tmp_path / "s1", kept_layers=[0, 2, 3])
    report = prune_model(tmp_path / "s1", tmp_path / "s2", num_layers=2, kept_layers="last")
    assert report.kept_layers == (2, 3)  # teacher layers, not the intermediate student's
    assert ModelSpec.from_dir(tmp_path / "s2").kept_layers == (2, 3)
    t, s = _tensors(llama), _tensors(tmp_path / "s2")
    assert torch.equal(s["model.layers.0.mlp.up_proj.weight"], t["model.layers.2.mlp.up_proj.weight"])


@pytest.mark.parametrize("teacher", ["llama", "qwen2"])
def test_prune_to_own_size_is_identity(request: pytest.FixtureRequest, tmp_path: Path, teacher: str) -> None:
    src: Path = request.getfixturevalue(teacher)
    spec = ModelSpec.from_dir(src)
    prune_model(
        src,
        tmp_path,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_layers=spec.num_layers,
        max_calibration_tokens=CALIB,
    )
    t, s = _tensors(src), _tensors(tmp_path)
    assert t.keys() == s.keys()
    assert all(torch.equal(t[k], s[k]) for k in t)
    ids = torch.arange(3, 40).unsqueeze(0)
    assert torch.equal(_logits(src, ids), _logits(tmp_path, ids))


def _kept_neurons(
    teacher: dict[str, torch.Tensor], student: Path, layer: int, channels: list[int]
) -> list[int]:
    name = f"model.layers.{layer}.mlp.down_proj.weight"
    return _kept_columns(teacher[name][channels], _tensors(student)[name])


def test_importance_decides_what_is_kept(llama: Path, tmp_path: Path) -> None:
    teacher = _tensors(llama)
    embed = teacher["model.embed_tokens.weight"]
    prune_model(llama, tmp_path / "base", hidden_size=32, intermediate_size=64, max_calibration_tokens=CALIB)
    kept = _kept_columns(embed, _tensors(tmp_path / "base")["model.embed_tokens.weight"])
    assert kept == sorted(kept) and len(kept) == 32  # original channel order survives
    neurons = _kept_neurons(teacher, tmp_path / "base", 1, kept)
    assert neurons == sorted(neurons) and len(neurons) == 64
    channel = next(c for c in range(64) if c not in kept)
    neuron = next(n for n in range(128) if n not in neurons)

    # Scale a dropped hidden channel in one norm, and a dropped neuron's up projection, by 100.
    norm = teacher["model.layers.1.post_attention_layernorm.weight"].clone()
    norm[channel] *= 100
    up = teacher["model.layers.1.mlp.up_proj.weight"].clone()
    up[neuron] *= 100
    edited = _edit_teacher(
        llama,
        tmp_path / "edited",
        {"model.layers.1.post_attention_layernorm.weight": norm, "model.layers.1.mlp.up_proj.weight": up},
    )
    prune_model(edited, tmp_path / "out", hidden_size=32, intermediate_size=64, max_calibration_tokens=CALIB)
    kept_after = _kept_columns(embed, _tensors(tmp_path / "out")["model.embed_tokens.weight"])
    assert channel in kept_after
    assert neuron in _kept_neurons(_tensors(edited), tmp_path / "out", 1, kept_after)
    # Neurons are ranked per layer: layer 0, upstream of the edit, keeps the same ones.
    assert _kept_neurons(teacher, tmp_path / "out", 0, kept_after) == _kept_neurons(
        teacher, tmp_path / "base", 0, kept
    )


def test_calibration_texts_and_dtype(qwen2: Path, tmp_path: Path) -> None:
    text = "A short calibration text about caches, tokens and attention heads. " * 40
    report = prune_model(
        qwen2,
        tmp_path,
        hidden_size=40,
        calibration_texts=[text],
        max_calibration_tokens=100,
        dtype="bfloat16",
    )
    assert report.calibration_tokens == 100
    assert ModelSpec.from_dir(tmp_path).torch_dtype == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in _tensors(tmp_path).values())
    with pytest.raises(ModelConfigError, match="calibration"):
        prune_model(qwen2, tmp_path / "empty", hidden_size=40, calibration_texts=[""])


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        (dict(hidden_size=0), "hidden_size"),
        (dict(hidden_size=65), "hidden_size"),
        (dict(intermediate_size=-1), "intermediate_size"),
        (dict(intermediate_size=129), "intermediate_size"),
        (dict(num_layers=5, kept_layers="first"), "num_layers"),
        (dict(num_layers=0), "num_layers"),
        (dict(num_layers=2), "kept_layers"),
        (dict(num_layers=2, kept_layers=[0, 1, 2]), "kept_layers"),
        (dict(num_layers=2, kept_layers=[3, 1]), "kept_layers"),
        (dict(num_layers=2, kept_layers="middle"), "kept_layers"),
        (dict(hidden_size=32, max_calibration_tokens=0), "max_calibration_tokens"),
        (dict(dtype="int8"), "dtype"),
    ],
)
def test_bad_arguments(llama: Path, tmp_path: Path, kwargs, names: str) -> None:
    with pytest.raises(ModelConfigError, match=names):
        prune_model(llama, tmp_path, **kwargs)
    assert not (tmp_path / "config.json").exists()


def test_refuses_to_overwrite_teacher(llama: Path) -> None:
    with pytest.raises(ModelConfigError, match="out_dir"):
        prune_model(llama, llama, num_layers=4)


def test_progress_reports_each_stage_to_its_end(llama: Path, tmp_path: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    prune_model(
        llama,
        tmp_path,
        hidden_size=48,
        max_calibration_tokens=CALIB,
        progress=lambda stage, done, total: calls.append((stage, done, total)),
    )
    stages = list(dict.fromkeys(stage for stage, _, _ in calls))
    assert stages == ["calibrating", "reading weights", "writing student"]
    for stage in stages:
        mine = [(done, total) for s, done, total in calls if s == stage]
        assert mine[0][0] == 0 and mine[-1][0] == mine[-1][1]  # starts at 0, ends at its total
        assert [d for d, _ in mine] == sorted(d for d, _ in mine)  # never goes back
    assert ("calibrating", CALIB, CALIB) in calls
