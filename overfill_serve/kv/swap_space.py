"""`SwapSpace`: host memory for the KV of preempted decode requests.

When the decode pool runs short, the newest request's blocks are copied here and freed; when the pool has
room again they are copied back and the request resumes where it stopped. Nothing is recomputed, which for
a request whose prompt KV came from the teacher means it need not go back to the prefill pool at all.
"""

from __future__ import annotations

import torch

from overfill_serve.kv.paged_cache import PagedKVCache


class SwapSpace:
    def __init__(self, cache: PagedKVCache, num_blocks: int) -> None:
        self.cache, self.num_blocks = cache, num_blocks
        self._saved: dict[str, torch.Tensor] = {}  # request id -> [layers, 2, n, block_size, heads, head_dim]
        self.num_used = 0

    def can_hold(self, num_blocks: int) -> bool:
        return self.num_used + num_blocks <= self.num_blocks

    def blocks_of(self, request_id: str) -> int:
        return self._saved[request_id].shape[2]

    def swap_out(self, request_id: str, block_ids: list[int]) -> None:
        assert request_id not in self._saved and self.can_hold(len(block_ids))
        index = torch.tensor(block_ids, dtype=torch.long, device=self.cache.tensor.device)
        data = self.cache.tensor.index_select(2, index)
        if data.is_cuda:  # straight into pinned host memory: both copies are DMAs, no pageable staging
            data = torch.empty(data.shape, dtype=data.dtype, pin_memory=True).copy_(data)
        self._saved[request_id] = data
        self.num_used += len(block_ids)

    def swap_in(self, request_id: str, block_ids: list[int]) -> None:
        data = self._saved.pop(request_id)
        assert data.shape[2] == len(block_ids)
        index = torch.tensor(block_ids, dtype=torch.long, device=self.cache.tensor.device)
        self.cache.tensor.index_copy_(2, index, data.to(self.cache.tensor.device, non_blocking=True))
        self.num_used -= len(block_ids)

    def discard(self, request_id: str) -> None:
        data = self._saved.pop(request_id, None)
        if data is not None:
            self.num_used -= data.shape[2]
