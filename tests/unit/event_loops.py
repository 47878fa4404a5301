"""Running the asyncio tests of the gate's two connection sides on both loops the daemon may use."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable, Coroutine
from typing import Any

# A test that hangs fails after this rather than after pytest's two minutes. Far above what any test here
# takes (a second or two at most), so a loaded CI machine (three workers on two cores) cannot reach it.
GUARD_SECONDS = 30.0


class Run:
    """Runs a test's coroutine to the end on a fresh loop, under the guard, and fails the test if the loop
    reported an error nobody handled (a connection task that died, an exception never retrieved, a
    callback that raised): a connection that leaves those behind fills the daemon's log with tracebacks."""

    def __init__(self, loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
        self._loop_factory = loop_factory

    def __call__(self, coro: Coroutine[Any, Any, None]) -> None:
        reports: list[str] = []
        with asyncio.Runner(loop_factory=self._loop_factory) as runner:
            runner.get_loop().set_exception_handler(lambda _, context: reports.append(str(context["message"])))
            runner.run(asyncio.wait_for(coro, GUARD_SECONDS))
            gc.collect()  # a connection and its parser refer to each other: their futures die in a collection
        assert reports == []


async def eventually(condition: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    """Wait until `condition` holds: for states a connection (or the ledger's thread) reaches between two events.
    They take milliseconds, or a read timeout of at most 0.3 s: the default leaves room for a loaded machine."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.005)
