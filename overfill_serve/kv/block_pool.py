"""`BlockPool`: which KV blocks are free, in pure Python (the scheduler's view; tensors live elsewhere)."""

from __future__ import annotations

from collections import deque


class BlockPool:
    """A free list of block ids with reference counts.

    A block returns to the free list when its last reference is released. Double frees and foreign ids are
    internal bugs, so they assert.
    """

    def __init__(self, num_blocks: int) -> None:
        assert num_blocks > 0
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take n free blocks (reference count 1). The caller checks `can_allocate` first."""
        assert n <= len(self._free), f"asked for {n} blocks, {len(self._free)} free"
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        """Add a reference to blocks already in use (a second holder, e.g. a transfer lease)."""
        for b in blocks:
            assert self._refs[b] > 0, f"block {b} is free"
            self._refs[b] += 1

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self._refs[b] > 0, f"block {b} freed twice"
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)
