"""`PagedKVCache`: the KV tensors, one (K, V) pair of [num_blocks, block_size, kv_heads, head_dim] per layer."""

from __future__ import annotations

import torch


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        # One allocation for the whole pool: registering it once is all a transport (NIXL) needs.
        self.tensor = torch.zeros(
            num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device
        )

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * dtype.itemsize

    @classmethod
    def blocks_for_budget(
        cls,
        memory_bytes: int,
        num_layers: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
    ) -> int:
        """How many blocks fit in a memory budget."""
        return memory_bytes // cls.bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensor[i, 0], self.tensor[i, 1]

    def layers(self, ids: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(K, V) views for a model whose layer j uses cache layer ids[j] (a depth-pruned student's map)."""
        return [self.layer(i) for i in ids]

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()
