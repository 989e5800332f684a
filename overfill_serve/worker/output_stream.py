"""`OutputStream`: one request's outputs, written by the engine thread, read by a thread or an asyncio task."""

from __future__ import annotations

import asyncio
import queue
from typing import Any

END = object()  # the stream's last item after a finished output


class OutputStream:
    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """With `loop`, items are read with `aget()` on that event loop; without, with blocking `get()`."""
        self._loop = loop
        self._async: asyncio.Queue[Any] | None = asyncio.Queue() if loop is not None else None
        self._sync: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def put(self, item: Any) -> None:
        """Thread-safe: a StepOutput, an exception to raise in the reader, or END."""
        if self._loop is not None:
            assert self._async is not None
            self._loop.call_soon_threadsafe(self._async.put_nowait, item)
        else:
            self._sync.put(item)

    def get(self) -> Any:
        return self._sync.get()

    async def aget(self) -> Any:
        assert self._async is not None, "this stream was opened without an event loop"
        return await self._async.get()
