"""`ModelRunner`: turns a `Batch` into tensors and runs one model over the paged KV cache.

Runners hold no queues; a runner knows its model, the cache and which cache layer each model layer uses
(`kept_layers`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from overfill_serve.engine.batch import Batch
from overfill_serve.kv.paged_cache import PagedKVCache
from overfill_serve.model.attention import AttentionMetadata
from overfill_serve.model.llama import CausalLM


class ModelRunner:
    def __init__(self, model: CausalLM, cache: PagedKVCache, kept_layers: tuple[int, ...]) -> None:
        assert len(kept_layers) == model.spec.num_layers
        self.model = model
        self.cache = cache
        self.kv = cache.layers(kept_layers)
        self.device = model.device

    def run(self, batch: Batch, on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Logits [rows, vocab] (float32) for the sequences with `needs_logits`, in batch order."""
        seqs = batch.seqs
        tokens = [t for s in seqs for t in s.token_ids]
        positions = [p for s in seqs for p in range(s.start, s.context_len)]
        ends = torch.tensor([len(s.token_ids) for s in seqs]).cumsum(0) - 1
        logits_index = ends[torch.tensor([s.needs_logits for s in seqs])]
        meta = AttentionMetadata.build(
            [len(s.token_ids) for s in seqs],
            [s.context_len for s in seqs],
            [list(s.block_table) for s in seqs],
            self.cache.block_size,
            self.device,
        )
        return self.model(
            torch.tensor(tokens, dtype=torch.long, device=self.device),
            torch.tensor(positions, dtype=torch.long, device=self.device),
            self.kv,
            meta,
            logits_index.to(self.device),
            on_layer,
        )
