"""Tiny random-weight Llama / Qwen2 models in Hugging Face layout, for tests and benchmarks.

The models are built with transformers' own classes and saved with `save_pretrained`, so a test that compares
overfill-serve's forward against transformers compares against the reference implementation, not a copy.
Nothing is downloaded: the tokenizer is a byte-level BPE trained on documentation text that ships with Python.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from overfill_serve.errors import ModelConfigError

# SmolLM2's layout: ids 0..2 are the special tokens, so tests can name them without looking them up.
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 0, 1, 2
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Enough text for a few thousand merges while keeping training well under a second.
_TRAIN_CHARS = 300_000
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def reference_text(max_chars: int | None = None) -> str:
    """English technical prose that ships with every CPython (the pydoc topic pages), in a fixed order."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text if max_chars is None else text[:max_chars]


@functools.lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int) -> str:
    # Cached as JSON rather than as an object: each caller gets its own mutable tokenizer.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = reference_text(_TRAIN_CHARS)
    tok.train_from_iterator((text[i : i + 4096] for i in range(0, len(text), 4096)), trainer=trainer)
    return tok.to_str()


def make_tokenizer(out_dir: str | Path | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ChatML special tokens (ids 0..2), saved into out_dir when given.

    `<|endoftext|>` (id 0) is bos, eos, pad and unk; `<|im_start|>` / `<|im_end|>` are 1 / 2. The vocabulary
    may come out slightly smaller than vocab_size if the training text runs out of merges; use len(tok).
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ModelConfigError(f"vocab_size={vocab_size} is too small for a byte-level BPE (need >= 259)")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
    )
    tok.chat_template = CHATML_TEMPLATE
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok


@dataclass(frozen=True)
class RandomModel:
    """What `make_random_model` builds: a tiny model of a real architecture (Llama or Qwen2).

    Weights are re-drawn from a seeded generator with `init_std` (default 0.2): with transformers' 0.02 a
    tiny model's logits are nearly uniform and greedy decoding hits near-ties that make exact comparisons
    between implementations flaky. Norm weights are drawn around 1 and biases are non-zero so that a forward
    pass that ignores either is caught. `attention_bias` applies to Llama only (Qwen2 always has q/k/v
    biases). vocab_size defaults to the tokenizer's size; a larger one pads the embedding as real
    checkpoints do. `shard=True` writes several safetensors files plus model.safetensors.index.json.
    """

    model_type: str = "llama"  # or "qwen2"
    hidden_size: int = 64  # tiny by default: a test builds one in a second
    intermediate_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    vocab_size: int | None = None
    tokenizer_vocab_size: int = 512
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    eos_token_id: int | list[int] = ENDOFTEXT_ID
    init_std: float = 0.2
    seed: int = 0
    dtype: str = "float32"
    shard: bool = False

    def __post_init__(self) -> None:
        if self.model_type not in ("llama", "qwen2"):
            raise ModelConfigError(
                f"model_type={self.model_type!r} is not supported (use 'llama' or 'qwen2')"
            )
        if self.dtype not in _DTYPES:
            raise ModelConfigError(f"dtype={self.dtype!r} is not supported (use one of {sorted(_DTYPES)})")

    def build(self, vocab_size: int) -> PreTrainedModel:
        """The transformers model, its weights drawn as the class docstring says."""
        rope = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": float(self.rope_theta)}
        config: dict[str, Any] = {
            "vocab_size": vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim or self.hidden_size // self.num_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": ENDOFTEXT_ID,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": ENDOFTEXT_ID,
            "initializer_range": self.init_std,
        }
        if self.model_type == "llama":
            model: PreTrainedModel = LlamaForCausalLM(
                LlamaConfig(attention_bias=self.attention_bias, **config)
            )
        else:
            model = Qwen2ForCausalLM(Qwen2Config(**config))
        _reinit(model, self.init_std, self.seed)
        model.to(_DTYPES[self.dtype])  # type: ignore[arg-type]  # transformers mistypes its wrapped .to
        model.generation_config = GenerationConfig(
            bos_token_id=ENDOFTEXT_ID, eos_token_id=self.eos_token_id, pad_token_id=ENDOFTEXT_ID
        )
        return model


def make_random_model(out_dir: str | Path, **settings: Any) -> Path:
    """Build a random-weight model with transformers and save it (weights, config, tokenizer) to out_dir.
    `settings`: `RandomModel` fields."""
    spec = RandomModel(**settings)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out, spec.tokenizer_vocab_size)
    vocab = len(tok) if spec.vocab_size is None else spec.vocab_size
    if vocab < len(tok):
        raise ModelConfigError(f"vocab_size={vocab} is smaller than the tokenizer's {len(tok)} tokens")
    model = spec.build(vocab)
    # Sharded: about three files, whatever the model size.
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(str(out), max_shard_size=max(total // 3, 1) if spec.shard else "50GB")
    return out


@torch.no_grad()
def _reinit(model: torch.nn.Module, std: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    depth = sum(1 for n, _ in model.named_parameters() if n.endswith("input_layernorm.weight"))
    # Sorted names: the same seed gives the same weights whatever order modules were registered in.
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.endswith("norm.weight"):
            p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=gen))
            continue
        p.copy_(torch.randn(p.shape, generator=gen) * std)
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            # Residual-branch outputs scaled by 1/sqrt(depth) keep deeper models' activations bounded.
            p.mul_(1.0 / math.sqrt(max(depth, 1)))
