"""`PagedKVCache`: the KV tensors, one (K, V) pair of [num_blocks, block_size, kv_heads, head_dim] per layer."""

from __future__ import annotations

import warnings

import numpy as np
import torch


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


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

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensor[i, 0], self.tensor[i, 1]

    def layers(self, kept_layers: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(K, V) views for a model whose layer j uses cache layer kept_layers[j] (a depth-pruned student)."""
        return [self.layer(i) for i in kept_layers]

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer's K (or V)."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.tensor.element_size()

    def read_blocks(self, layer: int, block_ids: list[int]) -> torch.Tensor:
        """A contiguous copy of one layer's blocks, [2 (K, V), n, block_size, kv_heads, head_dim]."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.tensor.device)
        return self.tensor[layer].index_select(1, index)

    def write_blocks(self, layer: int, block_ids: list[int], data: torch.Tensor) -> None:
        """Inverse of `read_blocks`: data [2, n, block_size, kv_heads, head_dim] into the given blocks."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.tensor.device)
        self.tensor[layer].index_copy_(1, index, data.to(self.tensor.device))

    def block_bytes_parts(self, layer: int, block_ids: list[int]) -> list[memoryview]:
        """One layer's blocks as raw bytes (K blocks, then V blocks), the inverse of `write_block_bytes`. On
        CPU: views of the pool itself, one per run of consecutive block ids, so a reader copies them once;
        elsewhere: one host copy."""
        if self.tensor.device.type != "cpu":
            host = self.read_blocks(layer, block_ids).cpu().contiguous()
            return [host.view(-1).view(torch.uint8).numpy().data]
        runs: list[tuple[int, int]] = []
        for block in block_ids:
            if runs and runs[-1][1] == block:
                runs[-1] = (runs[-1][0], block + 1)
            else:
                runs.append((block, block + 1))
        pool = self._bytes_view()
        return [pool[layer, kind, start:stop].data.cast("B") for kind in (0, 1) for start, stop in runs]

    def write_block_bytes(self, layer: int, block_ids: list[int], payload: bytes | memoryview) -> None:
        """`write_blocks` from raw bytes (K blocks, then V blocks), as the gRPC channel receives them."""
        n = len(block_ids)
        if self.tensor.device.type == "cpu":
            # A plain copy per block: no temporary tensor, and no thread pool spinning up for a memcpy.
            src = np.frombuffer(payload, dtype=np.uint8).reshape(2, n, self.block_bytes)
            pool = self._bytes_view()
            for j, block in enumerate(block_ids):
                pool[layer, :, block] = src[:, j]
            return
        with warnings.catch_warnings():  # read-only bytes: only copied from, never written
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(payload, dtype=torch.uint8)
        shape = (2, n, self.block_size, self.num_kv_heads, self.head_dim)
        self.write_blocks(layer, block_ids, raw.view(self.tensor.dtype).view(shape))

    def _bytes_view(self) -> np.ndarray:
        """The CPU pool as bytes: [layers, 2, num_blocks, block_bytes], sharing memory with `tensor`."""
        flat = self.tensor.view(-1).view(torch.uint8).numpy()
        return flat.reshape(self.num_layers, 2, self.num_blocks, self.block_bytes)

    def block_address(self, layer: int, kind: int, block: int) -> int:
        """Memory address of one block of one layer's K (kind 0) or V (kind 1): what an RDMA reader needs."""
        index = (layer * 2 + kind) * self.num_blocks + block
        return self.tensor.data_ptr() + index * self.block_bytes
