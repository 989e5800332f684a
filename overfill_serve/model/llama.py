"""The Llama / Qwen2 decoder forward over a paged KV cache.

One class covers both families; `ModelSpec` carries the differences (qkv bias, tied embeddings, rope). The LM
head runs only on the rows that need logits (the last token of each request whose step ends a prompt or
decodes), which is most of the saving of a prefill.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from overfill_serve.model.attention import AttentionMetadata
from overfill_serve.model.layers import DecoderLayer, RMSNorm, RotaryEmbedding
from overfill_serve.model.spec import ModelSpec


class CausalLM(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.rotary: RotaryEmbedding | None = None  # built after the weights are materialised

    def init_rotary(self, device: torch.device) -> None:
        self.rotary = RotaryEmbedding(
            self.spec.rope, self.spec.head_dim, self.spec.max_position_embeddings, device
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        logits_index: torch.Tensor,
        on_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """input_ids/positions: [T]; kv_caches[j]: (K, V) cache of model layer j; returns float32 logits for
        the rows `logits_index` selects. `on_layer(j)` runs once layer j's KV is in the cache (on a GPU, its
        kernels are queued on the current stream, so a reader on that stream sees them)."""
        assert self.rotary is not None, "init_rotary() was not called"
        assert len(kv_caches) == len(self.layers)
        x = self.embed_tokens(input_ids)
        cos_sin = self.rotary(positions, x.dtype)
        for j, (layer, kv) in enumerate(zip(self.layers, kv_caches)):
            x = layer(x, cos_sin, kv, meta)
            if on_layer is not None:
                on_layer(j)
        x = self.norm(x[logits_index])
        return self.lm_head(x).float()
