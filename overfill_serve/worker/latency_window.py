"""`LatencyWindow`: the mean of the latencies observed in the last few seconds, for the autoscaler's TTFT and
TPOT signals. An idle replica reports 0 (nothing recent), never a stale figure from the last burst."""

from __future__ import annotations

import threading
import time
from collections import deque


class LatencyWindow:
    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()  # (when, seconds)
        self._lock = threading.Lock()  # added on the engine thread, read by the replica's stats calls

    def add(self, seconds: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._samples.append((now, seconds))
            self._trim(now)

    def mean(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            return sum(s for _, s in self._samples) / len(self._samples) if self._samples else 0.0

    def _trim(self, now: float) -> None:
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()
