"""The independent reference: transformers' own Llama / Qwen2 with a DynamicCache.

OverFill by hand: the teacher prefills the prompt into a DynamicCache, the first token comes from the
teacher's logits, then the student decodes on a cache holding the teacher's KV of its kept layers.
Nothing here imports the code under test.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


def load_hf(model_dir: str | Path) -> torch.nn.Module:
    """Build the transformers model from config.json by hand: transformers' own loader refuses some OverFill
    student shapes (hidden size not a multiple of the head count), so the config is patched in directly."""
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k != "overfill_kept_layers"}
    config_cls, model_cls = (
        (Qwen2Config, Qwen2ForCausalLM) if cfg["model_type"] == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    )
    # Validate with a hidden size the checker accepts, then put the real one back.
    config = config_cls(**{**cfg, "hidden_size": cfg["num_attention_heads"] * cfg["head_dim"]})
    config.hidden_size = cfg["hidden_size"]
    model = model_cls(config)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.float().eval()


@torch.no_grad()
def overfill_greedy(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    prompt: list[int],
    max_tokens: int,
    kept_layers: list[int] | None = None,
    edit: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy OverFill decode; returns the tokens and the float32 logits that chose each of them.
    `edit(i, logits)`, when given, returns the logits the i-th token is chosen from (e.g. a bias added)."""
    pick = (lambda i, lg: int(edit(i, lg.clone()).argmax())) if edit else (lambda i, lg: int(lg.argmax()))
    out = teacher(input_ids=torch.tensor([prompt]), cache=DynamicCache(), use_cache=True)
    teacher_cache = out.cache
    logits = out.logits[0, -1].float()
    tokens, all_logits = [pick(0, logits)], [logits]
    kept = kept_layers if kept_layers is not None else list(range(len(teacher_cache.layers)))
    cache = DynamicCache()
    for j, i in enumerate(kept):
        cache.update(teacher_cache.layers[i].keys.clone(), teacher_cache.layers[i].values.clone(), j)
    for _ in range(max_tokens - 1):
        out = student(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True)
        cache = out.cache
        logits = out.logits[0, -1].float()
        tokens.append(pick(len(tokens), logits))
        all_logits.append(logits)
    return tokens, all_logits


@torch.no_grad()
def overfill_prompt_scores(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    prompt: list[int],
    split: int,
    kept_layers: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OverFill scoring by hand: the teacher runs prompt[:split] and its logits score tokens 1..split; the
    student, on the teacher's KV of its kept layers, runs prompt[split:] and scores the rest. Returns the
    log-softmax rows that scored prompt tokens 1..n-1 ([n-1, V]) and the logits after the last token."""
    out = teacher(input_ids=torch.tensor([prompt[:split]]), cache=DynamicCache(), use_cache=True)
    rows = [out.logits[0].float()]
    if split < len(prompt):
        kept = kept_layers if kept_layers is not None else list(range(len(out.cache.layers)))
        cache = DynamicCache()
        for j, i in enumerate(kept):
            cache.update(out.cache.layers[i].keys.clone(), out.cache.layers[i].values.clone(), j)
        rows.append(
            student(input_ids=torch.tensor([prompt[split:]]), cache=cache, use_cache=True).logits[0].float()
        )
    logits = torch.cat(rows)
    return torch.log_softmax(logits[:-1], dim=-1), logits[-1]
