"""Progress bars for long commands, on stderr (stdout stays the command's result).

tqdm comes with transformers. Bars are drawn only when stderr is a terminal, so logs and pipes get no
carriage-return spam; `TQDM_DISABLE=1` turns them off on a terminal too (tqdm reads its `TQDM_*` variables).

- `bar(total, desc, unit)`: one bar; `update(n)` as work completes, `close()` (or `with`) when done.
- `StageBars()`: a callable `(stage, done, total)` for library code that reports progress through a callback
  and knows nothing of tqdm (`prune_model(progress=...)`, `fetch_default(progress=...)`): a bar per stage.
"""

from __future__ import annotations

import sys
from typing import Any


def bar(total: int | None, desc: str, unit: str = "it") -> Any:
    """A tqdm bar on stderr, disabled (a no-op object with the same methods) when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=not _is_terminal(),
        dynamic_ncols=True,
        leave=True,
    )


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


class StageBars:
    """Progress callback `(stage, done, total)`: opens a bar when a new stage starts, moves it to `done`,
    closes it when `done` reaches `total` or the next stage begins. `unit` names what a stage counts."""

    def __init__(self, units: dict[str, str] | None = None) -> None:
        self._units = units or {}
        self._stage: str | None = None
        self._finished: str | None = None
        self._bar: Any = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage == self._finished:
            return  # a repeated end of the stage just closed
        if stage != self._stage:
            self.close()
            self._stage = stage
            self._bar = bar(total, stage, self._units.get(stage, "it"))
        self._bar.update(done - self._bar.n)
        if done >= total:
            self.close()
            self._finished = stage

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._stage, self._finished = None, None, None

    def __enter__(self) -> StageBars:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
