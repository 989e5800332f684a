"""`BlockPool`: which KV blocks are free, shared or cached, in pure Python (the scheduler's view; tensors live
elsewhere).

Prefix caching: a block whose KV is complete can be indexed by its `block_hash` (`register`); requests whose
prompts start with the same blocks then share it (`acquire` takes a reference, `free` drops one). A cached
block nobody references is not lost: it waits in a least-recently-used list and is only reused for other
KV (its hash dropped) when the pool has no never-cached block left. It counts as free.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence


class BlockPool:
    """Block ids with reference counts; a block is free at zero references.

    Thread-safe: in a disaggregated worker the engine thread and the KV-channel threads allocate from the same
    pool. Freeing an unreferenced block and foreign ids are internal bugs, so they assert.
    """

    def __init__(self, num_blocks: int) -> None:
        assert num_blocks > 0
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # unreferenced, not cached
        self._refs = [0] * num_blocks
        self._block_of: dict[bytes, int] = {}  # the prefix cache's index
        self._hash_of: dict[int, bytes] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced: the next to go first
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
        """Blocks an allocation can take: never-cached ones and cached ones nobody references."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def allocate(self, n: int) -> list[int] | None:
        """Take n free blocks (one reference each), or None (and nothing) when fewer than n are free. Blocks
        never cached go first; then the least recently used cached ones, whose hashes are dropped."""
        with self._lock:
            return self._take(n) if n <= self.num_free else None

    def acquire(self, hashes: Sequence[bytes], n: int) -> tuple[list[int], int] | None:
        """n blocks for one request: first the cached blocks of the longest prefix of `hashes` (shared: one
        more reference each), then new ones; and how many were shared. None (and nothing taken) when the
        pool is short of the new ones."""
        with self._lock:
            shared = []
            for block_hash in hashes:
                block = self._block_of.get(block_hash)
                if block is None:
                    break
                shared.append(block)
            assert len(shared) <= n, "a request shares no more blocks than it needs"
            reclaimed = sum(1 for block in shared if not self._refs[block])  # evictable now, not once shared
            if n - len(shared) > self.num_free - reclaimed:
                return None
            for block in shared:
                if not self._refs[block]:
                    del self._evictable[block]
                self._refs[block] += 1
            return shared + self._take(n - len(shared)), len(shared)

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block. A cached block left without any stays cached; the table's last
        blocks become the first to be evicted (their prefix is worth more to later prompts)."""
        with self._lock:
            released = []
            for block in blocks:
                assert self._refs[block] > 0, f"block {block} freed twice"
                self._refs[block] -= 1
                if not self._refs[block]:
                    released.append(block)
            self._free.extend(b for b in released if b not in self._hash_of)
            self._evictable.update((b, None) for b in reversed(released) if b in self._hash_of)
            for listener in self._on_free:
                listener()

    def register(self, block: int, block_hash: bytes) -> None:
        """Index a referenced block whose KV is complete under its hash; a no-op if either is indexed already
        (another request computed the same block first)."""
        with self._lock:
            assert self._refs[block] > 0, f"block {block} registered while free"
            if block_hash not in self._block_of and block not in self._hash_of:
                self._block_of[block_hash] = block
                self._hash_of[block] = block_hash

    def _take(self, n: int) -> list[int]:
        """n free blocks, the caller holding the lock and having checked there are enough."""
        blocks = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._block_of[self._hash_of.pop(block)]
            self._refs[block] = 1
            blocks.append(block)
        return blocks
