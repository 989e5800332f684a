"""`ModelRunner`: turns a `Batch` into tensors and runs one model over the paged KV cache.

Runners hold no queues; a runner knows its model, the cache and which cache layer each model layer uses
(`kept_layers`). A step's inputs reach the device in one copy from pinned memory. Decode steps run through
`DecodeGraphs` (static buffers per batch-size bucket, a CUDA graph each on a GPU) when enabled; everything
else runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from overfill_serve.engine.batch import Batch
from overfill_serve.engine.decode_graphs import DecodeGraphs
from overfill_serve.kv.paged_cache import PagedKVCache, blocks_for
from overfill_serve.model.attention import AttentionMetadata
from overfill_serve.model.llama import CausalLM


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        cache: PagedKVCache,
        kept_layers: tuple[int, ...],
        backend: str = "torch",
        graphs: DecodeGraphs | None = None,
    ) -> None:
        assert len(kept_layers) == model.spec.num_layers
        self.model, self.cache, self.backend, self.graphs = model, cache, backend, graphs
        self.kv = cache.layers(kept_layers)
        self.device = model.device
        self._pinned = self.device.type == "cuda"

    def run(self, batch: Batch, on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Logits [rows, vocab] (float32): each sequence's `num_logits` last rows, in batch order."""
        if self.graphs is not None and on_layer is None and self.graphs.fits(batch):
            return self.graphs.run(batch)
        tokens, positions, meta, logits_index = self._inputs(batch)
        return self.model(tokens, positions, self.kv, meta, logits_index, on_layer)

    def _inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """A step's index tensors, built on the host and moved in one (pinned, non-blocking) copy."""
        seqs, bs = batch.seqs, self.cache.block_size
        q_lens = np.array([len(s.token_ids) for s in seqs], dtype=np.int64)
        ctx_lens = np.array([s.context_len for s in seqs], dtype=np.int64)
        positions = np.concatenate([np.arange(s.start, s.context_len) for s in seqs])
        width = blocks_for(int(ctx_lens.max()), bs)
        tables = np.zeros((len(seqs), width), dtype=np.int64)
        for i, s in enumerate(seqs):
            n = blocks_for(s.context_len, bs)
            tables[i, :n] = s.block_table[:n]
        rows = np.repeat(np.arange(len(seqs)), q_lens)
        slots = tables[rows, positions // bs] * bs + positions % bs
        ends = np.cumsum(q_lens)
        parts = [
            np.fromiter((t for s in seqs for t in s.token_ids), np.int64, count=int(ends[-1])),
            positions,
            slots,
            ctx_lens,
            np.concatenate([[0], ends]),
            np.concatenate([np.arange(e - s.num_logits, e) for s, e in zip(seqs, ends)]),
            tables.ravel(),
        ]
        host = torch.from_numpy(np.concatenate(parts))
        flat = (host.pin_memory() if self._pinned else host).to(self.device, non_blocking=True)
        tokens, pos, slot, ctx, start, logits_index, table = flat.split([len(p) for p in parts])
        meta = AttentionMetadata(
            backend=self.backend,
            slot_mapping=slot,
            block_tables=table.view(len(seqs), width),
            context_lens=ctx,
            query_start=start,
            block_size=bs,
            max_query_len=int(q_lens.max()),
            query_lens=tuple(q_lens.tolist()),
            context_lens_host=tuple(ctx_lens.tolist()),
        )
        return tokens, pos, meta, logits_index
