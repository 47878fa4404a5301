"""Work a cancelled control call cannot stop, and must see to its end.

A gRPC call is cancelled when its client goes away or its deadline passes, but work already handed to a worker
thread runs on. What the call does after that work (log the change, record it in the ledger, release a lock or a
scratch directory) must happen all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def outlive_cancellation(work: Awaitable[T], orphaned: Callable[[asyncio.Future[Any]], None] | None = None
                               ) -> T:
    """Await `work` to its end even if the caller is cancelled meanwhile (its client went away, or the
    deadline passed), then let the cancellation go on; `orphaned` is told how work ended in that case.

    Work in a worker thread cannot be stopped. Returning at once would remove a backup's scratch directory
    under it and release the backup's or restore's lock while it still reads or moves files (a restore would be
    left half done, with its error lost), or skip the log line and ledger row of a change that was made.
    """
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await finished(task)
        if orphaned is not None:
            orphaned(task)
        elif not task.cancelled():
            task.exception()  # retrieved: nobody is left to report it to
        raise


async def to_thread_to_the_end(func: Callable[..., T], /, *args: Any) -> T:
    """`asyncio.to_thread(func, *args)`, except that a caller cancelled while `func` runs still gets its result, and
    its cancellation is put back for its next await: a change made in the thread is then logged by the lines that
    follow, as for a caller that stayed. Plain to_thread returned at once, and the change went unlogged."""
    work = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await finished(work)
        task = asyncio.current_task()
        if task is not None:
            task.cancel()
        return work.result()


async def finished(work: asyncio.Future[Any]) -> None:
    """Wait until `work` has ended, however often the waiting caller is cancelled meanwhile."""
    while not work.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([work])
