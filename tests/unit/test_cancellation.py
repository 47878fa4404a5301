"""Work a cancelled control call cannot stop: its outcome still reaches the lines that log it.

A control call is cancelled when its client goes away, but a write already in a worker thread runs on. Plain
`asyncio.to_thread` then left the caller at once, so the change was made and its log line skipped.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from aegisd.cancellation import to_thread_to_the_end
from tests.unit.event_loops import Run


def _held(result: object, error: Exception | None = None
          ) -> tuple[threading.Event, threading.Event, Callable[[], object]]:
    started, release = threading.Event(), threading.Event()

    def work() -> object:
        started.set()
        assert release.wait(10)
        if error is not None:
            raise error
        return result

    return started, release, work


def test_a_caller_cancelled_while_its_write_runs_logs_it_then_stops(run: Run) -> None:
    async def scenario() -> None:
        started, release, work = _held("made")
        logged: list[object] = []

        async def call() -> None:
            made = await to_thread_to_the_end(work)
            logged.append(made)  # the log line that follows the write
            await asyncio.sleep(0)  # the caller's next await: its cancellation goes on here
            logged.append("went on as if nothing had happened")

        task = asyncio.ensure_future(call())
        assert await asyncio.to_thread(started.wait, 10)
        task.cancel()  # the client went away, with the write under way
        await asyncio.sleep(0.05)
        assert not task.done() and logged == []  # still waiting for the write
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert logged == ["made"]

    run(scenario())


def test_a_write_that_fails_after_its_caller_left_still_raises_its_error(run: Run) -> None:
    async def scenario() -> None:
        started, release, work = _held(None, ValueError("the write failed"))
        outcome: list[str] = []

        async def call() -> None:
            try:
                await to_thread_to_the_end(work)
            except ValueError as exc:
                outcome.append(str(exc))
                raise

        task = asyncio.ensure_future(call())
        assert await asyncio.to_thread(started.wait, 10)
        task.cancel()
        release.set()
        with pytest.raises(ValueError, match="the write failed"):
            await task
        assert outcome == ["the write failed"]

    run(scenario())
