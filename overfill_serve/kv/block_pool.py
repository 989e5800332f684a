"""`BlockPool`: which KV blocks are free, in pure Python (the scheduler's view; tensors live elsewhere)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable


class BlockPool:
    """A free list of block ids.

    Thread-safe: in a disaggregated worker the engine thread and the KV-channel threads allocate from the same
    pool. Double frees and foreign ids are internal bugs, so they assert.
    """

    def __init__(self, num_blocks: int) -> None:
        assert num_blocks > 0
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._used = [False] * num_blocks
        self._lock = threading.Lock()
        self._on_free: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener` after each free (under the pool's lock: it must only schedule work), so a waiter
        for blocks sleeps until some come back; returns the function that unsubscribes it."""
        with self._lock:
            self._on_free.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                self._on_free.remove(listener)

        return unsubscribe

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """Take n free blocks, or None (and nothing) when fewer than n are free."""
        with self._lock:
            if n > len(self._free):
                return None
            blocks = [self._free.popleft() for _ in range(n)]
            for b in blocks:
                self._used[b] = True
            return blocks

    def free(self, blocks: list[int]) -> None:
        with self._lock:
            for b in blocks:
                assert self._used[b], f"block {b} freed twice"
                self._used[b] = False
                self._free.append(b)
            for listener in self._on_free:
                listener()
