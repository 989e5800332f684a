from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from overfill_serve.errors import ModelConfigError
from overfill_serve.model.random_model import (
    ENDOFTEXT_ID,
    IM_END_ID,
    IM_START_ID,
    make_random_model,
    make_tokenizer,
)
from overfill_serve.model.spec import ModelSpec

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

CASES: dict[str, dict[str, Any]] = {
    "llama-tied": dict(model_type="llama"),
    "llama-untied-llama3-bias": dict(
        model_type="llama",
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling=LLAMA3_SCALING,
        attention_bias=True,
        head_dim=32,  # not hidden // heads: the config must carry it explicitly
        num_layers=2,
        max_position_embeddings=4096,
        eos_token_id=[ENDOFTEXT_ID, IM_END_ID],
    ),
    "qwen2-tied": dict(model_type="qwen2", num_heads=8, num_kv_heads=2, rms_norm_eps=1e-5),
    "qwen2-untied": dict(model_type="qwen2", tie_word_embeddings=False, rope_theta=1e6, vocab_size=600),
}


def _all_tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {name: make_random_model(tmp_path_factory.mktemp(name), **kw) for name, kw in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_spec_reads_every_field(models: dict[str, Path], name: str) -> None:
    kw = CASES[name]
    spec = ModelSpec.from_dir(models[name])
    heads = kw.get("num_heads", 4)
    eos = kw.get("eos_token_id", ENDOFTEXT_ID)
    assert spec.model_type == kw["model_type"]
    assert spec.vocab_size == kw.get("vocab_size", 512)
    assert (spec.hidden_size, spec.intermediate_size) == (64, 128)
    assert spec.num_layers == kw.get("num_layers", 4)
    assert (spec.num_heads, spec.num_kv_heads) == (heads, kw.get("num_kv_heads", 2))
    assert spec.head_dim == kw.get("head_dim", 64 // heads)
    assert spec.rms_norm_eps == kw.get("rms_norm_eps", 1e-6)
    assert spec.max_position_embeddings == kw.get("max_position_embeddings", 2048)
    assert spec.tie_word_embeddings == kw.get("tie_word_embeddings", True)
    assert spec.rope.theta == kw.get("rope_theta", 10000.0)
    scaling = kw.get("rope_scaling")
    if scaling is None:
        assert spec.rope.scaling_type is None
    else:
        assert spec.rope.scaling_type == "llama3"
        assert spec.rope.factor == scaling["factor"]
        assert spec.rope.low_freq_factor == scaling["low_freq_factor"]
        assert spec.rope.high_freq_factor == scaling["high_freq_factor"]
        assert spec.rope.original_max_position_embeddings == scaling["original_max_position_embeddings"]
    bias = kw.get("attention_bias", False)
    is_qwen = kw["model_type"] == "qwen2"
    assert spec.qkv_bias == (is_qwen or bias)
    assert spec.o_bias == (bias and not is_qwen)
    assert spec.bos_token_id == ENDOFTEXT_ID
    assert spec.eos_token_ids == (tuple(eos) if isinstance(eos, list) else (eos,))
    assert spec.torch_dtype == "float32"
    assert spec.kept_layers is None
    config = json.loads((models[name] / "config.json").read_text())
    assert config["head_dim"] == spec.head_dim  # explicit, whatever transformers would infer


@pytest.mark.parametrize("name", list(CASES))
def test_weights_match_spec_and_transformers_runs(models: dict[str, Path], name: str) -> None:
    spec = ModelSpec.from_dir(models[name])
    tensors = _all_tensors(models[name])
    assert ("lm_head.weight" in tensors) == (not spec.tie_word_embeddings)
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (
        spec.num_kv_heads * spec.head_dim,
        spec.hidden_size,
    )
    assert ("model.layers.0.self_attn.q_proj.bias" in tensors) == spec.qkv_bias
    assert ("model.layers.0.self_attn.o_proj.bias" in tensors) == spec.o_bias
    # Norm weights and biases are not the trivial 1 / 0 a forward pass could silently ignore.
    assert not torch.allclose(tensors["model.norm.weight"], torch.ones(spec.hidden_size))
    if spec.qkv_bias:
        assert tensors["model.layers.0.self_attn.q_proj.bias"].abs().max() > 0
    ids = torch.arange(3, 40).unsqueeze(0)
    logits = _logits(models[name], ids)
    assert logits.shape == (ids.shape[1], spec.vocab_size)
    assert torch.isfinite(logits).all()


def test_logits_are_peaked(models: dict[str, Path]) -> None:
    tok = make_tokenizer()
    ids = tok("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt")["input_ids"]
    top2 = _logits(models["llama-tied"], ids).topk(2, dim=-1).values
    gaps = top2[:, 0] - top2[:, 1]
    assert gaps.median() > 0.05  # greedy decoding is not decided by float noise


def test_sharded_save_has_index_and_same_weights(tmp_path: Path) -> None:
    plain = make_random_model(tmp_path / "plain", num_layers=2, seed=3)
    sharded = make_random_model(tmp_path / "sharded", num_layers=2, seed=3, shard=True)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((sharded / s).is_file() for s in shards)
    assert not (sharded / "model.safetensors").exists()
    a, b = _all_tensors(plain), _all_tensors(sharded)
    assert a.keys() == b.keys() == index["weight_map"].keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.arange(5, 20).unsqueeze(0)
    assert torch.equal(_logits(plain, ids), _logits(sharded, ids))


def test_seed_determines_weights(tmp_path: Path) -> None:
    a = _all_tensors(make_random_model(tmp_path / "a", num_layers=1, seed=7))
    b = _all_tensors(make_random_model(tmp_path / "b", num_layers=1, seed=7))
    c = _all_tensors(make_random_model(tmp_path / "c", num_layers=1, seed=8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_bfloat16(tmp_path: Path) -> None:
    path = make_random_model(tmp_path, num_layers=1, dtype="bfloat16")
    assert ModelSpec.from_dir(path).torch_dtype == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in _all_tensors(path).values())


def test_tokenizer(tmp_path: Path) -> None:
    tok = make_tokenizer(tmp_path, vocab_size=512)
    assert len(tok) == 512
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ENDOFTEXT_ID,) * 3
    text = "def f(x):\n    return x ** 2  # héllo, wörld ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(text.encode())  # merges were learned
    assert tok.decode(ids) == text  # byte-level: lossless, also for non-ASCII
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(chat, add_special_tokens=False)["input_ids"]
    assert ids[0] == IM_START_ID and IM_END_ID in ids
    assert (tmp_path / "tokenizer.json").is_file()
    assert make_tokenizer(vocab_size=512).get_vocab() == tok.get_vocab()  # cached, deterministic


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="model_type"):
        make_random_model(tmp_path, model_type="gpt2")
    with pytest.raises(ModelConfigError, match="dtype"):
        make_random_model(tmp_path, dtype="int8")
    with pytest.raises(ModelConfigError, match="vocab_size"):
        make_random_model(tmp_path, vocab_size=100)
    with pytest.raises(ModelConfigError, match="vocab_size"):
        make_tokenizer(vocab_size=100)
