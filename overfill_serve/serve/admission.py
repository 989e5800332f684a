"""`Admission`: the ingress's count of requests in flight, refused past `max_inflight_requests`.

A slot is released exactly once however its request ends: finished, failed, closed mid-stream, or never
started at all (a client gone before the response body was iterated leaves a generator nobody runs; its
finalizer releases the slot when it is collected).
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator
from typing import TypeVar

from overfill_serve.errors import OverloadedError

T = TypeVar("T")


class Slot:
    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission.inflight -= 1
            self._admission = None


class Admission:
    def __init__(self, limit: int, retry_after_s: float = 1.0) -> None:
        self.limit, self.retry_after_s = limit, retry_after_s
        self.inflight = 0

    def admit(self) -> Slot:
        """A slot for one request, or `OverloadedError` (503 / RESOURCE_EXHAUSTED with a retry hint)."""
        if self.inflight >= self.limit:
            raise OverloadedError(
                f"{self.inflight} requests in flight (limit {self.limit})", self.retry_after_s
            )
        self.inflight += 1
        return Slot(self)

    def hold(self, slot: Slot, stream: AsyncIterator[T]) -> AsyncIterator[T]:
        """`stream`, releasing `slot` when it ends or, if it never runs, when it is collected."""
        held = _released_after(slot, stream)
        weakref.finalize(held, slot.release)
        return held


async def _released_after(slot: Slot, stream: AsyncIterator[T]) -> AsyncIterator[T]:
    try:
        async for item in stream:
            yield item
    finally:
        slot.release()
