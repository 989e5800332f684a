"""`EngineLoop`: runs an engine's steps on a thread of its own, off any event loop.

Other threads never touch engine state: they post callables to the inbox, which the loop runs between
steps. An idle loop sleeps on the inbox instead of spinning.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(
        self, name: str, step: Callable[[], bool], on_crash: Callable[[BaseException], None]
    ) -> None:
        """`step()` runs one engine step and says whether there was work; `on_crash` fails what is in flight."""
        self.name = name
        self._step, self._on_crash = step, on_crash
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(lambda: None)  # wake an idle loop
        self._thread.join(timeout=10)

    def call(self, fn: Callable[[], None]) -> None:
        """Run fn on the engine thread before its next step."""
        self._inbox.put(fn)

    def _run(self) -> None:
        busy = False
        while not self._stop.is_set():
            try:
                self._drain(block=not busy)  # idle: sleep until something arrives (or a periodic wake-up)
                busy = self._step()
            except Exception as e:  # a bug or a device error: fail what is in flight, stay visible
                log.exception("engine loop %s crashed", self._thread.name)
                self.error = e
                self._on_crash(e)
                return

    def _drain(self, block: bool) -> None:
        try:
            while True:
                self._inbox.get(block=block, timeout=0.5 if block else None)()
                block = False
        except queue.Empty:
            pass
