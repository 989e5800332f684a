"""`until_changed`: wait on an event loop, holding no thread, for a condition on state that other threads change
(the transfer registry, a block pool), woken by the owner's change notifications instead of polling."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
Subscribe = Callable[[Callable[[], None]], Callable[[], None]]  # listener -> unsubscribe


async def until_changed(subscribe: Subscribe, check: Callable[[], T | None], timeout: float) -> T | None:
    """`check()` once it is not None, re-checked after each change `subscribe` reports; None after `timeout`
    seconds. `check` runs on the loop and must not block."""
    loop = asyncio.get_running_loop()
    woken = asyncio.Event()

    def wake() -> None:  # called on the changing thread, under its owner's lock: only schedule
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(woken.set)

    unsubscribe = subscribe(wake)
    try:
        deadline = loop.time() + timeout
        while True:
            woken.clear()  # before the check: a change during it wakes the wait below
            found = check()
            left = deadline - loop.time()
            if found is not None or left <= 0:
                return found
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), left)
    finally:
        unsubscribe()
