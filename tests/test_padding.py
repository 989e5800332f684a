"""Zero-padding hidden / intermediate sizes at load time is exact: the padded model's logits and greedy tokens
equal the unpadded model's (an independent computation: the checkpoint loaded as is)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import RELEASED_DECODER, edited_checkpoint

from overfill_serve.engine.batch import Batch, ScheduledSeq
from overfill_serve.engine.runner import ModelRunner
from overfill_serve.errors import ModelConfigError, WeightLoadError
from overfill_serve.kv.paged_cache import PagedKVCache
from overfill_serve.model.llama import CausalLM
from overfill_serve.model.loader import load_model
from overfill_serve.model.padding import PaddedModelSpec, padded_size, padded_spec, unpadded_spec
from overfill_serve.model.pair import ModelPair
from overfill_serve.model.random_model import make_random_model
from overfill_serve.model.spec import KVLayout, ModelSpec

PROMPT = [5, 17, 33, 101, 7, 9, 200, 44, 3, 61, 12]
STEPS = 10
BLOCK_SIZE = 4
TABLE = (9, 3, 14, 0, 7, 11, 2)  # scattered blocks, enough for PROMPT + STEPS


def _with_mlp_bias(src: Path, dst: Path) -> Path:
    """A copy of `src` with non-zero gate/up/down biases (no model family we build has them)."""
    config = json.loads((src / "config.json").read_text())
    gen = torch.Generator().manual_seed(1)

    def add_biases(tensors: dict[str, torch.Tensor]) -> None:
        for i in range(config["num_hidden_layers"]):
            for proj in ("gate", "up", "down"):
                rows = tensors[f"model.layers.{i}.mlp.{proj}_proj.weight"].shape[0]
                tensors[f"model.layers.{i}.mlp.{proj}_proj.bias"] = torch.randn(rows, generator=gen) * 0.2

    edited_checkpoint(src, dst, add_biases)
    (dst / "config.json").write_text(json.dumps({**config, "mlp_bias": True}))
    return dst


@pytest.fixture(scope="module")
def odd_models(pairs, tmp_path_factory) -> dict[str, Path]:
    """Models with sizes that are not multiples of 64, each covering a different set of parameters."""
    root = tmp_path_factory.mktemp("padding")
    qwen2 = make_random_model(  # q/k/v biases, untied head; hidden 44 != 4 heads * head_dim 16
        root / "qwen2",
        model_type="qwen2",
        tie_word_embeddings=False,
        num_layers=3,
        hidden_size=44,
        intermediate_size=90,
        head_dim=16,
    )
    return {
        "width": pairs["width"].student,  # hidden 42, intermediate 80, tied head
        "qwen2": qwen2,
        "o_bias": pairs["llama3_rope"].student,  # attention_bias (q/k/v/o) + llama3 RoPE; intermediate 64
        "mlp_bias": _with_mlp_bias(pairs["width"].student, root / "mlp_bias"),
    }


def _overfill_greedy(
    prefill_model: CausalLM, decode_model: CausalLM, prompt: list[int], steps: int
) -> tuple[list[int], torch.Tensor]:
    """Greedy decode over one paged cache: `prefill_model` prefills in two chunks and picks the first token,
    `decode_model` decodes on its KV. Returns the tokens and the logits of every step (chunk ends too)."""
    spec = prefill_model.spec
    cache = PagedKVCache(spec.num_layers, 16, BLOCK_SIZE, spec.num_kv_heads, spec.head_dim, torch.float32)
    layers = tuple(range(spec.num_layers))
    prefill, decode = ModelRunner(prefill_model, cache, layers), ModelRunner(decode_model, cache, layers)
    rows = []
    for start, end in ((0, 5), (5, len(prompt))):
        batch = Batch((ScheduledSeq("r", tuple(prompt[start:end]), start, TABLE, True),))
        rows.append(prefill.run(batch)[0])
    tokens = [int(rows[-1].argmax())]
    for step in range(steps - 1):
        batch = Batch((ScheduledSeq("r", (tokens[-1],), len(prompt) + step, TABLE, True),))
        rows.append(decode.run(batch)[0])
        tokens.append(int(rows[-1].argmax()))
    return tokens, torch.stack(rows)


def test_padded_spec_of_the_released_decoder():
    spec = ModelSpec.from_config(RELEASED_DECODER)
    padded = padded_spec(spec, 64)
    assert isinstance(padded, PaddedModelSpec)
    assert (padded.hidden_size, padded.intermediate_size) == (1728, 4544)
    assert padded.hidden_size % 64 == 0 and padded.intermediate_size % 64 == 0
    assert padded.rms_norm_eps == pytest.approx(1e-5 * 1689 / 1728, rel=1e-12)
    assert unpadded_spec(padded) is spec and padded.unpadded.hidden_size == 1689
    # The attention geometry, and so the KV layout a student decodes on, is untouched.
    assert (padded.num_heads, padded.num_kv_heads, padded.head_dim) == (24, 8, 128)
    assert KVLayout.of_teacher(padded, "bfloat16", 16) == KVLayout.of_teacher(spec, "bfloat16", 16)
    assert padded_spec(spec, 0) is spec and padded_spec(spec, None) is spec
    assert padded_spec(padded, 64) == padded and padded_spec(padded, 0) is spec
    assert padded_spec(spec, 128).hidden_size == 1792
    assert padded_size(1728, 64) == 1728 and padded_size(1, 64) == 64
    with pytest.raises(ModelConfigError):
        padded_spec(spec, -64)


@pytest.mark.parametrize(
    "kind, multiple, sizes",
    [
        ("width", 64, (64, 128)),
        ("width", 16, (48, 80)),  # intermediate already a multiple of 16: only hidden padded
        ("qwen2", 64, (64, 128)),
        ("o_bias", 64, (64, 64)),
        ("mlp_bias", 64, (64, 128)),
    ],
)
def test_padded_logits_and_greedy_tokens_match(odd_models, kind, multiple, sizes):
    plain = load_model(odd_models[kind])
    padded = load_model(odd_models[kind], pad_to_multiple=multiple)
    assert (padded.spec.hidden_size, padded.spec.intermediate_size) == sizes
    assert (plain.spec.hidden_size, plain.spec.intermediate_size) != sizes  # padding did something
    tokens, logits = _overfill_greedy(plain, plain, PROMPT, STEPS)
    padded_tokens, padded_logits = _overfill_greedy(padded, padded, PROMPT, STEPS)
    assert padded_tokens == tokens
    torch.testing.assert_close(padded_logits, logits, atol=1e-5, rtol=0)


def test_padding_changes_shapes_and_fills_zeros(width_pair):
    plain, padded = load_model(width_pair.student), load_model(width_pair.student, pad_to_multiple=64)
    n, i = plain.spec.hidden_size, plain.spec.intermediate_size  # 42, 80
    assert (n, i) == (42, 80)
    vocab, qkv_out = plain.spec.vocab_size, plain.layers[0].self_attn.qkv_proj.weight.shape[0]
    assert padded.embed_tokens.weight.shape == (vocab, 64)
    assert padded.lm_head.weight.data_ptr() == padded.embed_tokens.weight.data_ptr()  # still tied
    assert torch.equal(padded.embed_tokens.weight[:, :n], plain.embed_tokens.weight)
    assert not padded.embed_tokens.weight[:, n:].any()
    for a, b in zip(plain.layers, padded.layers):
        assert b.self_attn.qkv_proj.weight.shape == (qkv_out, 64)
        assert torch.equal(b.self_attn.qkv_proj.weight[:, :n], a.self_attn.qkv_proj.weight)
        assert not b.self_attn.qkv_proj.weight[:, n:].any() and not b.self_attn.o_proj.weight[n:].any()
        gate_up, down = b.mlp.gate_up_proj.weight, b.mlp.down_proj.weight
        assert gate_up.shape == (256, 64) and down.shape == (64, 128)
        # gate and up are padded each on its own: up starts at row 128, not 80.
        assert torch.equal(gate_up[:i, :n], a.mlp.gate_up_proj.weight[:i])
        assert torch.equal(gate_up[128 : 128 + i, :n], a.mlp.gate_up_proj.weight[i:])
        assert not gate_up[i:128].any() and not gate_up[128 + i :].any() and not gate_up[:, n:].any()
        assert torch.equal(down[:n, :i], a.mlp.down_proj.weight)
        assert not down[n:].any() and not down[:, i:].any()
        for norm in ("input_layernorm", "post_attention_layernorm"):
            w, w0 = getattr(b, norm).weight, getattr(a, norm).weight
            torch.testing.assert_close(w[:n], w0 * math.sqrt(n / 64), atol=1e-7, rtol=1e-6)
            assert not w[n:].any() and getattr(b, norm).eps == pytest.approx(a.input_layernorm.eps * n / 64)
    assert padded.norm.eps == pytest.approx(plain.norm.eps * n / 64) and not padded.norm.weight[n:].any()


def test_aligned_model_is_left_unchanged(teacher_dir):
    plain, padded = load_model(teacher_dir), load_model(teacher_dir, pad_to_multiple=64)
    assert (plain.spec.hidden_size, plain.spec.intermediate_size) == (64, 128)
    assert type(padded.spec) is ModelSpec and padded.spec == plain.spec
    ours, theirs = dict(plain.named_parameters()), dict(padded.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, p in ours.items():
        assert p.shape == theirs[name].shape and torch.equal(p, theirs[name]), name


def test_pair_pads_the_student_and_decodes_on_teacher_kv(width_pair):
    """OverFill greedy: the padded student decodes on the (aligned, untouched) teacher's KV exactly."""
    teacher, student = width_pair.teacher, width_pair.student
    plain = ModelPair.load(teacher, student, None, "float32", "cpu", BLOCK_SIZE)
    padded = ModelPair.load(teacher, student, None, "float32", "cpu", BLOCK_SIZE, pad_to_multiple=64)
    assert padded.layout == plain.layout
    assert type(padded.teacher.spec) is ModelSpec and padded.teacher.spec == plain.teacher.spec
    assert (padded.student.spec.hidden_size, padded.student.spec.intermediate_size) == (64, 128)
    tokens, logits = _overfill_greedy(plain.teacher, plain.student, PROMPT, STEPS)
    padded_tokens, padded_logits = _overfill_greedy(padded.teacher, padded.student, PROMPT, STEPS)
    assert padded_tokens == tokens
    torch.testing.assert_close(padded_logits, logits, atol=1e-5, rtol=0)


def test_bf16_norm_scaling_is_computed_in_float32(width_pair):
    """Each bf16 weight is the float32 padded weight rounded once (not the bf16 weight scaled in bf16)."""
    f32 = load_model(width_pair.student, pad_to_multiple=64)
    bf16 = load_model(width_pair.student, dtype="bfloat16", pad_to_multiple=64)
    for (name, p), (_, q) in zip(f32.named_parameters(), bf16.named_parameters()):
        assert q.dtype == torch.bfloat16 and torch.equal(q, p.to(torch.bfloat16)), name


def test_mis_shaped_tensor_is_named_with_its_checkpoint_shape(tmp_path, width_pair):
    name = "model.layers.0.mlp.up_proj.weight"
    broken = edited_checkpoint(
        width_pair.student, tmp_path / "shape", lambda t: t.update({name: t[name][:-1]})
    )
    with pytest.raises(WeightLoadError, match=r"up_proj.weight has shape \(159, 42\), expected \(160, 42\)"):
        load_model(broken, pad_to_multiple=64)
