"""`OutputStream`: one request's outputs, written by the engine thread, read by a thread or an asyncio task."""

from __future__ import annotations

import asyncio
import queue
from typing import Any

from overfill_serve.engine.output_processor import StepOutput


class OutputStream:
    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """With `loop`, items are read with `aget()` on that event loop; without, with blocking `get()`."""
        self._loop = loop
        self._async: asyncio.Queue[Any] | None = asyncio.Queue() if loop is not None else None
        self._sync: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.done = False  # the reader has seen the finished output or the error

    def put(self, item: Any) -> None:
        """Thread-safe: a StepOutput (the last one finished), or an exception to raise in the reader."""
        if self._loop is not None:
            assert self._async is not None
            self._loop.call_soon_threadsafe(self._async.put_nowait, item)
        else:
            self._sync.put(item)

    def get(self) -> StepOutput:
        """The next output, or the request's error raised."""
        return self._read(self._sync.get())

    async def aget(self) -> StepOutput:
        assert self._async is not None, "this stream was opened without an event loop"
        return self._read(await self._async.get())

    def _read(self, item: StepOutput | BaseException) -> StepOutput:
        self.done = isinstance(item, BaseException) or item.finished
        if isinstance(item, BaseException):
            raise item
        return item
