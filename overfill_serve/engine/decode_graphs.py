"""`DecodeGraphs`: decode steps over static buffers, one per batch-size bucket, replayed as CUDA graphs.

A decode step of b sequences runs in the smallest bucket >= b (1, 2, 4, 8, then steps of 8 up to the
engine's max_num_seqs); the rows past b are padding: token 0 at position 0, slot -1 (writes nothing) and
context length 0 (reads nothing), and their logits are dropped. Each step's inputs reach the buffers in one
copy from pinned memory: one int32 buffer holds the per-sequence fields [token, position, slot, context
length] x rows, then the block tables row by row, so a bucket's inputs are one prefix of it.

On a GPU each bucket is captured once (largest first, sharing one memory pool) and a step is a replay:
about 1,400 kernel launches become one. Without capture (on CPU) the same buffers and padding run eagerly,
which is how the tests cover the bookkeeping.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from overfill_serve.engine.batch import Batch
from overfill_serve.kv.paged_cache import blocks_for
from overfill_serve.model.attention import AttentionMetadata
from overfill_serve.model.llama import CausalLM

Forward = Callable[[], torch.Tensor]
TOKEN, POSITION, SLOT, CONTEXT = range(4)  # rows of the per-sequence fields
PADDING = (0, 0, -1, 0)  # a padded row: token 0 at position 0, writes nothing, reads nothing


def buckets(max_num_seqs: int) -> list[int]:
    small = [b for b in (1, 2, 4) if b < max_num_seqs]
    return small + list(range(8, max_num_seqs + 8, 8))


class DecodeGraphs:
    def __init__(
        self,
        model: CausalLM,
        kv: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        max_num_seqs: int,
        max_model_len: int,
        backend: str,
        capture: bool,
    ) -> None:
        self.model, self.kv, self.block_size, self.backend = model, kv, block_size, backend
        self.buckets = buckets(max_num_seqs)
        width = blocks_for(max_model_len, block_size)  # block-table columns: the longest context's
        rows, device, pinned = self.buckets[-1], model.device, model.device.type == "cuda"
        self._fields_end = len(PADDING) * rows
        self.buffer = torch.zeros(self._fields_end + rows * width, dtype=torch.int32, device=device)
        self._host = torch.zeros(self.buffer.shape, dtype=torch.int32, pin_memory=pinned)
        self.fields = self.buffer[: self._fields_end].view(len(PADDING), rows)
        self.tables = self.buffer[self._fields_end :].view(rows, width)
        self._logits_index = torch.arange(rows, device=device)
        self._query_start = torch.arange(rows + 1, dtype=torch.int32, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if capture:
            self._capture()

    def fits(self, batch: Batch) -> bool:
        """A decode step (one token and a sample per sequence) no larger than the largest bucket."""
        seqs = batch.seqs
        return len(seqs) <= self.buckets[-1] and all(len(s.token_ids) == 1 and s.needs_logits for s in seqs)

    def run(self, batch: Batch) -> torch.Tensor:
        """Logits [len(batch.seqs), vocab] of a decode step."""
        n = len(batch.seqs)
        b = next(size for size in self.buckets if size >= n)
        self._fill(batch, b)
        if b in self._graphs:
            graph, logits = self._graphs[b]
            graph.replay()
            return logits[:n]
        return self._forward(b, [s.context_len for s in batch.seqs])()[:n]

    def _fill(self, batch: Batch, b: int) -> None:
        host = self._host.numpy()
        fields = host[: self._fields_end].reshape(self.fields.shape)
        tables = host[self._fields_end :].reshape(self.tables.shape)
        fields[:, :b] = np.array(PADDING)[:, None]
        for i, s in enumerate(batch.seqs):
            pos = s.context_len - 1
            blocks = blocks_for(s.context_len, self.block_size)
            slot = s.block_table[pos // self.block_size] * self.block_size + pos % self.block_size
            fields[:, i] = (s.token_ids[0], pos, slot, s.context_len)
            tables[i, :blocks] = s.block_table[:blocks]
        end = self._fields_end + b * self.tables.shape[1]
        self.buffer[:end].copy_(self._host[:end], non_blocking=True)

    def _forward(self, b: int, context_lens: list[int]) -> Forward:
        """The model over the first b rows of the buffers; `context_lens` (the real rows') only feed the torch
        backend's host-side bookkeeping, which a captured graph never runs."""
        fields = self.fields[:, :b]
        meta = AttentionMetadata(
            backend=self.backend,
            slot_mapping=fields[SLOT],
            block_tables=self.tables[:b],
            context_lens=fields[CONTEXT],
            query_start=self._query_start[: b + 1],
            block_size=self.block_size,
            max_query_len=1,
            query_lens=(1,) * len(context_lens),
            context_lens_host=tuple(context_lens),
        )
        tokens, positions = fields[TOKEN], fields[POSITION]
        return lambda: self.model(tokens, positions, self.kv, meta, self._logits_index[:b])

    def _capture(self) -> None:
        pool = None
        for b in reversed(self.buckets):
            self.fields[:, :b] = torch.tensor((0, 0, -1, 1), dtype=torch.int32)[:, None]  # reads block 0 only
            forward = self._forward(b, [1] * b)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                forward()  # compiles the kernels and settles the allocator before capture
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = forward()
            pool = graph.pool()
            self._graphs[b] = (graph, logits)
