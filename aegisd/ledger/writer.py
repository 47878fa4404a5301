"""The group-commit writer: one thread owns the SQLite connection and commits whatever is queued at once.

`append` resolves only after its row's transaction has committed, so an audited request is never
answered before its record is durable; batching many appenders into one commit keeps that cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from aegisd.ledger.chain import GENESIS, SELECT_CHAIN, RowMac, VerifyResult, Written, row_mac, span, verify
from aegisd.ledger.checkpoint import latest_checkpoint
from aegisd.ledger.entry import ENTRY_FIELDS, LedgerEntry, LedgerRow, entry_values, normalize
from aegisd.ledger.query import not_utf8
from aegisd.ledger.schema import LedgerError, open_writable
from aegisd.text import plural

log = logging.getLogger(__name__)

MAX_BATCH = 4096  # rows per transaction; bounds commit latency under a flood
# WAL checkpoints run between commits, after their appenders have been answered: once the queue is
# empty and at least this many commits went by, and after this many commits regardless.
CHECKPOINT_WHEN_IDLE = 32
CHECKPOINT_ALWAYS = 256
MIN_KEY_SIZE = 16
MAX_HELD = 1000  # system rows held for the key (policy reloads while locked); more are counted, not kept
# While commits fail, the writer retries this often on its own, with the row that records the outage.
RETRY_SECONDS = 1.0
# Rows per INSERT statement: one statement step (and GIL hand-off) per batch of up to this many rows
# instead of one per row. A batch of n rows uses the n-row statement, so up to this many shapes get
# prepared and cached by sqlite3 (under half a MiB in all; 40 would take 2.4 MiB).
_ROWS_PER_INSERT = 16
_ROW_WIDTH = len(ENTRY_FIELDS) + 2  # id, the fields, mac
_PLACEHOLDERS = f"({', '.join('?' * _ROW_WIDTH)})"
_INSERT = f"INSERT INTO ledger (id, {', '.join(ENTRY_FIELDS)}, mac) VALUES "  # noqa: S608 - constant columns
_INSERTS = tuple(_INSERT + ", ".join([_PLACEHOLDERS] * rows) for rows in range(1, _ROWS_PER_INSERT + 1))
# Last id ever used (AUTOINCREMENT never reuses one), last id present, and the chain's tip.
_STATE = (
    "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'ledger'), 0), "
    "coalesce((SELECT max(id) FROM ledger), 0), "
    "(SELECT id FROM ledger WHERE mac IS NOT NULL ORDER BY id DESC LIMIT 1), "
    "(SELECT mac FROM ledger WHERE mac IS NOT NULL ORDER BY id DESC LIMIT 1)"
)
_COUNT_AFTER = "SELECT count(*) FROM ledger WHERE id > ?"
_MAC_SIZE = len(GENESIS)  # HMAC-SHA256
_STOP = object()
_FileId = tuple[int, int]  # (st_dev, st_ino)
_Future = asyncio.Future[int]
_Append = tuple[LedgerEntry, _Future | None]
T = TypeVar("T")
# A job gets the writer's connection and the chain key (None until the vault has been unlocked).
Job = Callable[[sqlite3.Connection, bytes | None], T]


class _ChainTip:
    """Where the next commit continues: read from the file once, then carried from commit to commit.

    Reading it costs a four-part query per commit (one that walks every row stored without a MAC after the
    newest chained one); carrying it costs one `PRAGMA data_version`, which tells whether any other
    connection has written since. The writer drops it after a failed commit, a job or a replace: it is
    then read afresh.
    """

    __slots__ = ("data_version", "next_id", "prev_mac")

    def __init__(self, data_version: int, next_id: int, prev_mac: bytes) -> None:
        self.data_version = data_version  # the file's PRAGMA data_version when this was true
        self.next_id = next_id  # AUTOINCREMENT never reuses an id, not even a deleted row's
        self.prev_mac = prev_mac  # the newest chained row's MAC, or the chain's origin if there is none


class _Unchained:
    """The rows this writer stored without a MAC because it had no key yet: the only rows it ever chains later.

    A row without a MAC that this process did not write (one an earlier run wrote before its vault was
    unlocked, or one edited and stripped of its MAC) is never chained: MACing it would vouch for whatever it
    says now, so it is left for `ledger verify` to report. The ranges are ids (a few: a new one only when
    another connection wrote in between); `witness` chains the rows as they were written under a random
    key that never leaves this process, so rows edited in the file before the key arrives are not chained
    either. Immutable: a commit builds a new one, kept only once the commit succeeded.
    """

    __slots__ = ("ranges", "rows", "witness")

    def __init__(self, ranges: tuple[tuple[int, int], ...], rows: int, witness: bytes) -> None:
        self.ranges = ranges  # (first id, last id), ascending
        self.rows = rows
        self.witness = witness

    def after(self, first_id: int, count: int, witness: bytes) -> _Unchained:
        """These rows plus `count` more from first_id on, whose witness chain now ends at `witness`."""
        last_id = first_id + count - 1
        ranges = self.ranges
        if ranges and ranges[-1][1] == first_id - 1:
            ranges = (*ranges[:-1], (ranges[-1][0], last_id))
        else:
            ranges = (*ranges, (first_id, last_id))
        return _Unchained(ranges, self.rows + count, witness)

    def rows_after(self, row_id: int) -> int:
        """How many of these rows have an id above row_id."""
        return sum(max(0, last - max(first, row_id + 1) + 1) for first, last in self.ranges)

    def describe(self) -> str:
        return ", ".join(span(first, last) for first, last in self.ranges)


_NO_UNCHAINED = _Unchained((), 0, GENESIS)


class _Outage:
    """Since when commits fail and how many rows they lost; the commit that ends it records it as a row."""

    __slots__ = ("commits", "rows", "since")

    def __init__(self) -> None:
        self.since = time.monotonic()
        self.commits = 0  # failed commits that held rows (not the outage row's own retries)
        self.rows = 0

    def entry(self) -> LedgerEntry:
        return LedgerEntry.system(self.summary(), reason="ledger_unavailable")

    def summary(self) -> str:
        missing = (f"{plural(self.rows, 'row')} from {plural(self.commits, 'failed commit')} "
                   f"{'is' if self.rows == 1 else 'are'} missing" if self.rows else "no rows are missing")
        return f"the ledger could not be written for {time.monotonic() - self.since:.1f} s: {missing}"


class LedgerReplaced(LedgerError):
    """ledger.db at its path is no longer the file the writer has open: renamed over (a copy, say) or removed.

    Committing on would put rows where nobody can read them (`ledger show`, verify and the next start all open
    the path), so the writer fails closed until aegisd restarts (or a restore puts a file in place)."""


class ReplaceIncomplete(LedgerError):
    """A restore's ledger was moved into place, but a step after the move failed (making the rename durable): the
    old file is gone, and with it the old chain key."""


class _SetKey:
    __slots__ = ("key",)

    def __init__(self, key: bytes) -> None:
        self.key = key


class _Job:
    __slots__ = ("fn", "future")

    def __init__(self, fn: Job[Any], future: asyncio.Future[Any]) -> None:
        self.fn = fn
        self.future = future


class _Replace:
    __slots__ = ("future", "staged")

    def __init__(self, staged: Path, future: asyncio.Future[Any]) -> None:
        self.staged = staged
        self.future = future


class Dropped:
    """In a subscription, where rows were left out because its reader fell behind: how many (so far)."""

    __slots__ = ("rows",)

    def __init__(self) -> None:
        self.rows = 0


class Replaced:
    """In a subscription: the ledger file was replaced (a restore); the rows after this come from the restored
    file, whose ids start again below those before it."""

    __slots__ = ()


REPLACED = Replaced()
Event = LedgerRow | Dropped | Replaced


class Subscription:
    """Rows as they commit, for `ledger follow`, with a marker wherever rows were lost or the file replaced.

    At most maxsize rows wait for a slow reader; the matching rows that find no room are counted in one
    Dropped marker at the place where they are missing (so the reader can say so), and in `dropped`.
    """

    def __init__(self, writer: LedgerWriter, maxsize: int, match: Callable[[LedgerRow], bool] | None) -> None:
        self._writer = writer
        self._maxsize = maxsize
        self._match = match
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self._gap: Dropped | None = None  # the queued marker that later drops still add to
        self._ended = False
        self.dropped = 0
        self.replacements = 0  # how many times the file was replaced since the subscription began

    def close(self) -> None:
        """Stop receiving rows and end the iteration."""
        self._writer._unsubscribe(self)
        self._end()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)  # stay ended for any later call
            raise StopAsyncIteration
        if item is self._gap:  # handed out: rows dropped from now on belong to a new gap
            self._gap = None
        return item

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _offer(self, rows: list[LedgerRow]) -> None:
        if self._ended:
            return
        match, put, gap = self._match, self._queue.put_nowait, self._gap
        room = self._maxsize - self._queue.qsize()
        for row in rows:
            if match is not None and not match(row):
                continue
            if room > 0:
                put(row)
                room -= 1
                gap = None
                continue
            if gap is None:  # one marker per gap, even past maxsize: a gap must never go unreported
                gap = Dropped()
                put(gap)
            gap.rows += 1
            self.dropped += 1
        self._gap = gap

    def _replaced(self) -> None:
        self.replacements += 1
        if not self._ended:
            self._queue.put_nowait(REPLACED)
            self._gap = None

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._queue.put_nowait(None)


class LedgerWriter:
    """The ledger's only writer. Use from one event loop: start, append..., close."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_s: float = 5.0) -> None:
        self._path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._key: bytes | None = None
        self._closed = False
        self._subscribers: tuple[Subscription, ...] = ()
        self._following = True  # subscriptions are taken (until end_subscriptions)
        # System rows appended before the chain's key exists; see append_nowait.
        self._held: list[LedgerEntry] = []
        self._held_dropped = 0
        self._held_lock = threading.Lock()
        # Appends made during one event-loop iteration, handed to the thread together: one wake-up
        # of the writer thread per batch instead of one per row.
        self._pending: list[_Append] = []
        self.last_commit_seconds = 0.0  # duration of the latest group commit
        # Group commits of new rows, and those rows, since start: rows per commit shows how well appends batch.
        self.commits = 0
        self.rows_committed = 0
        self.commit_failures = 0  # group commits that failed; their appenders got a LedgerError
        self._outage: _Outage | None = None  # set by a failed commit, cleared by the next good one (writer thread)
        self._serving = False  # the writer thread has its connection and has not ended (cheaper than is_alive)
        # The writer thread's connection; None after a restore's swap could not open the file, until a retry can.
        self._conn: sqlite3.Connection | None = None
        # Writer thread: the rows this process stored without a MAC, which it alone may chain once the key comes,
        # and the keyed hash vouching that they are still as written (its key never leaves this process).
        self._unchained = _NO_UNCHAINED
        self._witness_of = row_mac(os.urandom(32))
        self._reported_foreign: tuple[int, int] | None = None  # the last (tip id, count) logged by _report_foreign
        # Writer thread: (st_dev, st_ino) of the ledger.db the connection has open, checked against the path at each
        # commit and job; once they differ, why (failing for good: see LedgerReplaced).
        self._file: _FileId | None = None
        self._wal: _FileId | None = None  # and of its -wal, once there is one
        self._lost: str | None = None
        # The newest row this writer committed to the file in place, and its MAC (None: stored without one), so
        # `ledger verify` can tell a file that lacks it; and whether the writer saw that row cut off.
        self._written: Written | None = None
        self._ran_from: int | None = None  # the first row it committed to that file (see `verify`'s ran_from)
        self._cut: str | None = None
        self.restores = 0  # files a restore moved into place: a verify that read `written` before one drops it
        self._data_version = 0  # the connection's PRAGMA data_version at the latest commit: moves if another writes

    @property
    def queue_depth(self) -> int:
        """Batches and jobs waiting for the writer thread, plus rows not yet handed to it."""
        return self._queue.qsize() + len(self._pending)

    async def start(self) -> None:
        """Open (create, migrate) the ledger in the writer thread; raises LedgerError if it cannot."""
        if self._thread is not None or self._closed:
            raise LedgerError("the ledger writer was already started")
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._loop, self._stopped = loop, loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="aegis-ledger", daemon=True)
        self._thread.start()
        try:
            await ready
        except BaseException:
            self._closed = True
            self._queue.put(_STOP)  # if the open succeeded after all, let the thread end
            raise

    async def append(self, entry: LedgerEntry) -> int:
        """Queue a row and return its id once the transaction holding it has committed."""
        entry = normalize(entry)
        loop = self._check_open()
        future: _Future = loop.create_future()
        self._pending.append((entry, future))
        if len(self._pending) == 1:
            loop.call_soon(self._hand_over)
        return await future

    def _hand_over(self) -> None:
        """Give the thread every row appended since the last hand-over (runs in the loop thread)."""
        if self._pending:
            batch, self._pending = self._pending, []
            self._queue.put(batch)

    def append_nowait(self, entry: LedgerEntry) -> None:
        """Queue a row without waiting (system events); a failed commit is logged, not raised.

        Before the chain has its key (the first unlock of this run) the row is held in memory and queued
        with the key: a run that stops before any unlock then leaves no row without a MAC behind, which
        the next run could not tell from one stripped of its MAC. Nobody waits on these rows, and the gate
        serves nothing before that unlock, so holding them loses nothing but their place in id order.
        """
        entry = normalize(entry)
        self._check_open()
        with self._held_lock:
            if self._key is None:
                if len(self._held) < MAX_HELD:
                    self._held.append(entry)
                else:
                    self._held_dropped += 1
                return
        self._queue.put((entry, None))

    def set_key(self, key: bytes) -> None:
        """Give the chain its key; rows written while there was none get chained right away."""
        if not isinstance(key, bytes) or len(key) < MIN_KEY_SIZE:
            raise ValueError(f"the ledger key must be at least {MIN_KEY_SIZE} bytes")
        if self._key is not None:
            if hmac.compare_digest(self._key, key):
                return
            raise LedgerError("the ledger already has a different key")
        if self._closed:
            raise LedgerError("the ledger writer is closed")
        with self._held_lock:
            self._key = key
            self._queue.put(_SetKey(key))
            held, self._held = self._held, []
            for entry in held:
                self._queue.put((entry, None))

    @property
    def key(self) -> bytes | None:
        """The chain key, for `ledger verify` after the vault has locked again."""
        return self._key

    @property
    def failing(self) -> bool:
        """Whether a row written now would likely fail: the latest commit failed, or the writer is not running.

        The gate forwards nothing meanwhile. The writer retries every RETRY_SECONDS with a row recording
        the outage; any other row retries it too.
        """
        return self._outage is not None or self._lost is not None or self._closed or not self._serving

    @property
    def written(self) -> Written | None:
        """The newest row this writer has committed to the file now in place, as (id, MAC or None); None before its
        first row (and after a restore). `ledger verify` fails a file that does not hold it."""
        return self._written

    @property
    def tampered(self) -> str | None:
        """What the writer saw done to its file while it ran (replaced or removed, its newest row cut off), for
        `ledger verify` to report until aegisd restarts; None if nothing."""
        return self._lost or self._cut

    @property
    def has_key(self) -> bool:
        """Whether new rows are chained as they commit (for status output)."""
        return self._key is not None

    async def run_exclusive(self, fn: Job[T]) -> T:
        """Run fn(connection, key) in the writer thread between two group commits, and return its result.

        Nothing else writes meanwhile, so maintenance (prune) never races a commit; fn owns its transaction.
        Keep each call short: appends wait for it.
        """
        loop = self._check_open()
        future: asyncio.Future[T] = loop.create_future()
        self._hand_over()  # rows appended before the job commit before it
        self._queue.put(_Job(fn, future))
        return await future

    async def verify_file(self, key: bytes, **options: Any) -> tuple[VerifyResult, str | None]:
        """`verify` of the file at the path (`options`: its keywords), also failing a file that lacks the newest row
        this writer committed; and what the writer saw done to its file (`tampered`). Both are read before the
        file, which can then only be ahead of them, unless a restore moves another file in meanwhile: then the file
        is verified on its own, and nothing the writer knew of the old one is reported."""
        pending = self._unchained.rows if self._key is not None else 0  # settle() tried to chain them, and failed
        tampered, written, ran_from, restores = self.tampered, self.written, self._ran_from, self.restores
        result = await asyncio.to_thread(functools.partial(verify, self._path, key, written=written,
                                                           ran_from=None if pending else ran_from, **options))
        if pending and result.unchained_only:  # those rows may be all that is wrong: no verdict until they are chained
            raise LedgerError(f"{plural(pending, 'row')} this aegisd wrote before its vault was unlocked cannot be "
                              "chained yet: the ledger's commits are failing (see aegisd's log); verify once they "
                              "work again")
        if written is not None and self.restores != restores:
            return await asyncio.to_thread(functools.partial(verify, self._path, key, **options)), None
        return result, tampered

    async def settle(self) -> None:
        """Wait until everything queued so far has been committed, the chaining of rows written before the key
        included, so `ledger verify` right after an unlock does not find this process's own rows unchained.

        Returns at once if the writer is not running (verify reads the file as it is).
        """
        with contextlib.suppress(LedgerError):
            await self.run_exclusive(_nothing)

    async def replace_file(self, staged: Path) -> None:
        """Swap in another ledger file (a restore) between commits; rows queued later go to the new file.

        The chain key is forgotten: the new file's chain belongs to the vault restored with it, whose key
        arrives with the next unlock. The caller must keep the vault from unlocking until this returns.
        """
        loop = self._check_open()
        future: asyncio.Future[None] = loop.create_future()
        self._hand_over()
        self._queue.put(_Replace(staged, future))
        try:
            await future
        except ReplaceIncomplete:
            self._key = None  # the file was swapped all the same: the old key must not chain the new one
            raise
        self._key = None

    def subscribe(self, maxsize: int = 1000, match: Callable[[LedgerRow], bool] | None = None) -> Subscription:
        """Live committed rows (only those `match` accepts) from now on; at most maxsize wait for the reader."""
        self._check_open()
        sub = Subscription(self, maxsize, match)
        if self._following:
            self._subscribers = (*self._subscribers, sub)
        else:
            sub._end()
        return sub

    def end_subscriptions(self) -> None:
        """End every subscription after the rows already offered to it, and any made from now on at once: aegisd
        is stopping, and a `ledger follow` would otherwise hold the control server's stop for its whole grace."""
        self._following = False
        for sub in self._subscribers:
            sub._end()
        self._subscribers = ()

    async def close(self, *, served: bool = True) -> None:
        """Commit everything already queued, then close the connection and end subscriptions.

        The system rows still held for the chain key (the vault was never unlocked) go to the log instead; with
        `served` False (a start that failed, and never served anything) they are dropped quietly: the start's
        error is what its log must say, not what a run that never happened did not record."""
        if not self._closed:
            self._closed = True
            with self._held_lock:
                held, self._held = self._held, []
            level = logging.INFO if served else logging.DEBUG
            for entry in held:  # the vault was never unlocked in this run: the log keeps what they said
                log.log(level, "not written to the ledger, the vault was never unlocked in this run: %s (%s)",
                        entry.detail, entry.reason)
            if self._held_dropped and served:
                log.warning("%d more system rows were dropped while waiting for an unlock", self._held_dropped)
            if self._thread is not None:
                self._hand_over()
                self._queue.put(_STOP)
        if self._stopped is not None:
            await asyncio.shield(self._stopped)
        self.end_subscriptions()

    def _check_open(self) -> asyncio.AbstractEventLoop:
        if self._closed or self._loop is None or self._thread is None:
            raise LedgerError("the ledger writer is not running")
        if not self._thread.is_alive():
            raise LedgerError("the ledger writer thread has stopped")
        return self._loop

    def _unsubscribe(self, sub: Subscription) -> None:
        self._subscribers = tuple(s for s in self._subscribers if s is not sub)

    # ---- everything below runs in the writer thread, except the callbacks it posts to the loop ----

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is already closed; nobody is left to wake
            self._loop.call_soon_threadsafe(callback, *args)

    def _run(self, ready: asyncio.Future[None]) -> None:
        try:
            self._conn = self._open()
        except Exception as exc:
            error = exc if isinstance(exc, LedgerError) else LedgerError(f"cannot open ledger: {exc}")
            self._post(_settle, ready, error)
            self._post(_settle, self._stopped, None)
            return
        self._serving = True
        self._post(_settle, ready, None)
        key: bytes | None = None
        mac_of: RowMac | None = None  # row_mac(key), keyed once per key rather than once per commit
        tip: _ChainTip | None = None
        since_checkpoint = 0  # commits
        try:
            running = True
            while running:
                try:
                    # No retries once the file was replaced: they could never succeed.
                    retry = self._outage is not None and self._lost is None
                    items = [self._queue.get(timeout=RETRY_SECONDS if retry else None)]
                except queue.Empty:  # failing, and nothing came: retry with the outage's own row
                    tip = self._commit(mac_of, [], tip)
                    continue
                while len(items) < MAX_BATCH:
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                appends: list[_Append] = []
                new_key = False
                for item in items:
                    if item is _STOP:
                        running = False
                    elif isinstance(item, _SetKey):
                        key, mac_of, new_key = item.key, row_mac(item.key), True
                    elif isinstance(item, list):
                        appends.extend(item)
                    elif isinstance(item, tuple):
                        appends.append(item)
                    elif isinstance(item, _Job | _Replace):
                        if appends or new_key:  # what was queued before the job commits before it
                            tip = self._commit(mac_of, appends, tip)
                            appends, new_key = [], False
                        key = self._run_job(key, item)
                        if key is None:
                            mac_of = None
                        tip = None  # a prune has written through this connection, or a replace swapped files
                if appends or new_key:
                    tip = self._commit(mac_of, appends, tip)
                    since_checkpoint += 1
                if since_checkpoint >= CHECKPOINT_ALWAYS or (
                    since_checkpoint >= CHECKPOINT_WHEN_IDLE and self._queue.empty()
                ):
                    if self._conn is not None and self._lost is None:
                        _checkpoint(self._conn)
                    since_checkpoint = 0
        finally:
            self._serving = False
            if self._outage is not None:  # stopping mid-outage: one last try to put it on record
                tip = self._commit(mac_of, [], tip)
            if self._outage is not None:
                log.error("stopping with the ledger still unwritable: %s (in this log only)", self._outage.summary())
            # Not once the file was replaced: closing checkpoints the WAL and deletes the -wal and -shm at the path by
            # name, which now belong to the other file. The process is ending; the orphaned file goes with it.
            if self._conn is not None and self._lost is None:
                self._conn.close()
            self._fail_queued()
            self._post(_settle, self._stopped, None)

    def _run_job(self, key: bytes | None, job: _Job | _Replace) -> bytes | None:
        """Run one job; return the chain key the writer goes on with (None after a replace)."""
        result: Any = None
        conn: sqlite3.Connection | None = None  # a job's, to roll back if it fails mid-transaction
        try:
            if isinstance(job, _Replace):
                moved, error = self._swap_file(job.staged)
                if moved:
                    key = None
                if error is not None:
                    raise error
            else:
                conn = self._connection()
                result = job.fn(conn, key)
        except Exception as exc:
            with contextlib.suppress(sqlite3.Error):
                if conn is not None and conn.in_transaction:
                    conn.rollback()
            self._post(_settle, job.future, exc)
        else:
            self._post(_resolve, job.future, result)
        return key

    def _swap_file(self, staged: Path) -> tuple[bool, LedgerError | None]:
        """Fold the file's write-ahead log in, close it, move the staged one over it, and open that (migrating it if
        it is older).

        Returns whether the staged file was moved into place, and the error to report. SQLite applies whatever -wal
        lies beside a file to it (nothing ties a log to its file), so the old file's log is folded in and its -wal
        and -shm removed before the move, never after it: a crash in between then leaves the old file whole, or the
        new one alone. If that cannot be done (a reader keeps the log from being emptied, a -wal that cannot be
        removed) or the move fails, nothing moves, and the old file, still whole, is reopened. Once it has moved,
        the old file is gone whatever fails next: the caller is told so (ReplaceIncomplete) and the old chain key is
        dropped. If the open fails (a migration on a full disk, say), the writer is failing until a retry opens it.
        """
        if self._conn is not None:
            # Not once the file was replaced under the writer (_lost): its log belongs to the orphaned file, and
            # whatever lies at the path is the intruder's, which the restore is there to replace.
            if self._lost is None:
                refused = self._fold_in_log(self._conn)
                if refused is not None:
                    return False, refused  # the connection stays open on the old file, which nothing changed
            self._conn.close()
            self._conn = None
        error: LedgerError | None = None
        moved = False
        try:
            self._unlink_wal()
        except OSError as exc:
            error = LedgerError(f"the ledger's write-ahead log cannot be removed ({exc.strerror or exc}), so the "
                                "restored ledger was not moved into place: SQLite would apply the old log to it")
        else:
            try:
                os.replace(staged, self._path)
            except OSError as exc:
                error = LedgerError(f"cannot move the restored ledger into place: {exc.strerror or exc}")
            else:
                moved = True
                # What this process wrote without a key was in the old file; the new one's rows are nobody's to chain.
                self._unchained, self._reported_foreign = _NO_UNCHAINED, None
                self._written = self._ran_from = self._cut = self._lost = None  # the restored file is the ledger now
                self.restores += 1
                self._post(_replaced, self._subscribers)
                try:
                    fsync_directory(self._path.parent)
                except OSError as exc:
                    error = ReplaceIncomplete("the restored ledger was moved into place, but making the move durable "
                                              f"(fsync of the data directory) failed: {exc.strerror or exc}")
        try:
            self._connection()
        except LedgerError as exc:
            if self._outage is None:
                self._outage = _Outage()
                log.error("cannot reopen the ledger after a restore: %s; the gate forwards nothing until it can "
                          "(retried every %.0f s)", exc, RETRY_SECONDS)
        return moved, error

    def _fold_in_log(self, conn: sqlite3.Connection) -> LedgerError | None:
        """Copy every frame of the write-ahead log into the file and empty the log; why not, if it could not be.

        A reader in a transaction (`ledger verify`, `stats`, `export`, or another process) keeps the log from being
        emptied: the checkpoint waits for it as long as the connection's busy timeout (in this thread, never the
        event loop: those readers are short), then reports it busy, and the swap is refused rather than lose the
        frames still in the log or leave them beside the restored file.
        """
        try:
            busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.Error as exc:
            return LedgerError(f"the ledger's write-ahead log cannot be folded into {self._path.name} ({exc}), so the "
                               "restored ledger was not moved into place")
        if busy:
            return LedgerError(f"{self._path} is being read (`aegisctl ledger verify`, `stats` or `export`, or "
                               f"another process) and still was after {self._busy_timeout_s:g} s, so its "
                               "write-ahead log cannot be folded in; run the restore again once that is done")
        return None

    def _unlink_wal(self) -> None:
        """Remove the -wal and -shm beside the file (raises OSError if one is there and cannot be removed)."""
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self._path}{suffix}")

    def _connection(self) -> sqlite3.Connection:
        """The open connection, or a new one if a restore's swap left none (raises LedgerError if it cannot)."""
        if self._conn is None:
            self._conn = self._open()
        else:
            self._check_file()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        """open_writable, noting which file it opened: the path's (st_dev, st_ino) before and after, which must agree
        (else the file was swapped while it opened, and the connection may have either)."""
        try:
            before = _file_id(self._path)
            conn = open_writable(self._path, busy_timeout_s=self._busy_timeout_s)
            after = _file_id(self._path)
        except OSError as exc:  # the stat: the data directory cannot be searched
            raise LedgerError(f"cannot open ledger {self._path}: {exc.strerror or exc}") from None
        if after is None or (before is not None and before != after):
            conn.close()
            raise LedgerError(f"{self._path} was replaced or removed while aegisd was opening it")
        self._file, self._wal = after, None
        return conn

    def _check_file(self) -> None:
        """Raise LedgerReplaced if the path no longer names the file the connection writes.

        One stat per commit batch (or job), in this thread: the gate's event loop never waits on it. A swap
        between this check and the COMMIT puts one batch in the orphaned file; the next commit fails, and
        `ledger verify` says the file lacks that batch's newest row (self._written).
        """
        if self._lost is None:
            wal = Path(f"{self._path}-wal")
            try:
                now = _file_id(self._path)
                if self._wal is None and now == self._file:
                    self._wal = _file_id(wal)
            except OSError as exc:  # the data directory made unreadable, say: this commit fails, a retry may not
                raise LedgerError(f"cannot check that {self._path} is the file aegisd opened: "
                                  f"{exc.strerror or exc}") from None
            if now == self._file:
                return
            what = "is gone" if now is None else "is another file than the one aegisd opened"
            self._lost = (f"ledger.db was replaced or removed while aegisd was running: {self._path} {what}; aegisd "
                          "writes nothing more to the file it had open, and the gate forwards nothing until aegisd "
                          "is restarted or a backup is restored")
            log.error("%s. Rows aegisd wrote after any copy of it was taken are missing from the file at that path: "
                      "keep it as evidence, check it with `aegisctl ledger verify`, and find out who can write the "
                      "data directory", self._lost)
            self._empty_own_wal(wal)
        raise LedgerReplaced(self._lost)

    def _empty_own_wal(self, wal: Path) -> None:
        """If only ledger.db was replaced, the -wal at the path is still this connection's: move its pages into the
        file they belong to (the one this connection has open) and empty it. Left as it was, readers and the next
        start would apply the old file's pages to the new one, damaging it."""
        try:
            if self._wal is None or _file_id(wal) != self._wal or self._conn is None:
                return
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except (OSError, sqlite3.Error) as exc:
            log.error("could not empty the write-ahead log of the ledger.db aegisd had open (%s): %s; the next start "
                      "may apply its pages to the file now at %s", type(exc).__name__, exc, self._path)

    def _fail_queued(self) -> None:
        """Reject whatever is still queued when the thread ends, so no appender waits forever."""
        futures: list[_Future | None] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, list):
                futures.extend(future for _, future in item)
            elif isinstance(item, tuple):
                futures.append(item[1])
            elif isinstance(item, _Job | _Replace):
                self._post(_settle, item.future, LedgerError("the ledger writer has stopped"))
        if futures:
            self._post(_fail, futures, "the ledger writer has stopped")

    def _commit(self, mac_of: RowMac | None, appends: list[_Append], tip: _ChainTip | None) -> _ChainTip | None:
        """Commit the batch and return the chain's new tip, or None (read it afresh) if the commit failed.

        After failed commits the batch starts with a row recording the outage, so the ledger says what it
        is missing.
        """
        started = time.perf_counter()
        outage = self._outage
        if outage is not None:
            appends = [(normalize(outage.entry()), None), *appends]
        entries = [entry for entry, _ in appends]
        futures = [future for _, future in appends]
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                tip, unchained, written = self._write(conn, mac_of, entries, tip)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.rollback()
                raise
        except Exception as exc:
            self.commit_failures += 1
            lost = len(entries) - (outage is not None)  # the outage's own row is no lost row
            # The message names the failure, never the rows (they may be sensitive metadata). Logged when the
            # outage begins; later failures, which the outage's row and the recovery line sum up, at debug.
            if outage is None:
                outage = self._outage = _Outage()
                if not isinstance(exc, LedgerReplaced):  # that one, _check_file has logged as it found it
                    what = (f"ledger commit of {plural(lost, 'row')}" if lost
                            else "chaining the rows written while locked")
                    log.error("%s failed: %s: %s; the gate forwards nothing until the ledger can be written again",
                              what, type(exc).__name__, exc)
            else:
                log.debug("ledger commit of %s failed: %s: %s", plural(lost, "row"), type(exc).__name__, exc)
            if lost:
                outage.commits += 1
                outage.rows += lost
            self._post(_fail, futures, f"ledger write failed: {exc}")
            return None
        self.last_commit_seconds = time.perf_counter() - started
        self._unchained, self._written, self._data_version = unchained, written, tip.data_version
        first_id = tip.next_id - len(entries)
        if self._ran_from is None and entries:
            self._ran_from = first_id
        if entries:  # not the commit that only chains rows written before the key came
            self.commits += 1
            self.rows_committed += len(entries)
        if outage is not None:  # after the counts: whoever sees the outage end sees its commit counted
            self._outage = None
            log.warning("ledger writable again: %s (recorded as row %d)", entries[0].detail, first_id)
        rows: list[LedgerRow] = []
        subscribers = self._subscribers
        if subscribers:
            rows = [_to_row(first_id + i, entry) for i, entry in enumerate(entries)]
        self._post(_deliver, futures, first_id, subscribers, rows)
        return tip

    def _write(self, conn: sqlite3.Connection, mac_of: RowMac | None, entries: list[LedgerEntry],
               tip: _ChainTip | None) -> tuple[_ChainTip, _Unchained, Written | None]:
        """Insert the batch (chaining it if there is a key: mac_of); return the tip, the unchained rows it leaves and
        the newest row this writer has written (see `written`).

        The carried tip is checked after BEGIN IMMEDIATE, so no other connection can write between the check
        and the insert. The writer's own state is left alone: the caller keeps the result once COMMIT worked.
        """
        (data_version,) = conn.execute("PRAGMA data_version").fetchone()
        written = self._written
        if written is not None and data_version != self._data_version:  # another connection wrote since: is this
            self._check_written(conn, written)                           # writer's newest row still there?
        if tip is None or tip.data_version != data_version:
            tip = self._read_tip(conn, data_version)
        first_id, prev_mac = tip.next_id, tip.prev_mac
        unchained = self._unchained
        if mac_of is not None and unchained.rows:
            prev_mac, chained = _chain_own(conn, mac_of, self._witness_of, unchained, prev_mac)
            if chained and written is not None and written[1] is None:  # the newest unchained row is the newest row
                written = (written[0], prev_mac)
            unchained = _NO_UNCHAINED
        params: list[Any] = []
        if mac_of is not None:
            for row_id, entry in enumerate(entries, first_id):
                values = entry_values(entry)
                prev_mac = mac_of(prev_mac, row_id, values)
                params += (row_id, *values, prev_mac)
        elif entries:  # no key yet: stored with a NULL MAC, witnessed, and chained once the key arrives
            witness, witness_of = unchained.witness, self._witness_of
            for row_id, entry in enumerate(entries, first_id):
                values = entry_values(entry)
                witness = witness_of(witness, row_id, values)
                params += (row_id, *values, None)
            unchained = unchained.after(first_id, len(entries), witness)
        _insert(conn, params)
        if entries:
            written = (first_id + len(entries) - 1, prev_mac if mac_of is not None else None)
        return _ChainTip(data_version, first_id + len(entries), prev_mac), unchained, written

    def _check_written(self, conn: sqlite3.Connection, written: Written) -> None:
        """Note (once) and log if the newest row this writer committed is gone from the file: rows cut from its end.

        Run only when another connection has written since the last commit (PRAGMA data_version moved), which
        nothing of aegisd's does (prune and restore go through the writer): the writer goes on from whatever the
        file now holds, so without this note `ledger verify` would miss the cut once the writer has committed past
        it. (A row edited in place fails its MAC: the chain says so.)
        """
        if self._cut is not None or conn.execute("SELECT 1 FROM ledger WHERE id = ?", (written[0],)).fetchone():
            return
        self._cut = (f"row {written[0]}, the newest row aegisd had written then, was deleted from ledger.db while "
                     "aegisd was running: rows were cut from its end by another program")
        log.error("%s; aegisd goes on from what the file holds now, and `aegisctl ledger verify` reports it until "
                  "aegisd is restarted", self._cut)

    def _read_tip(self, conn: sqlite3.Connection, data_version: int) -> _ChainTip:
        """The tip as the file has it: at start, and whenever the carried one may be stale."""
        seq, max_id, tip_id, tip_mac = conn.execute(_STATE).fetchone()
        if not isinstance(seq, int):  # the id counter: an edit could make it text
            raise LedgerError(f"the ledger's id counter is not a number ({type(seq).__name__}): it was edited; "
                              "restore a good backup")
        if tip_id is not None and not (isinstance(tip_mac, bytes) and len(tip_mac) == _MAC_SIZE):
            raise LedgerError(f"the ledger's newest chained row ({tip_id}) has a MAC that is not the {_MAC_SIZE}-byte "
                              "value aegisd writes, so no row can be chained after it: it was edited; restore a good "
                              "backup")
        prev_mac: bytes = tip_mac if tip_id is not None else _chain_origin(conn)
        tip_id = tip_id or 0
        if max_id > tip_id:
            self._report_foreign(conn, tip_id)
        return _ChainTip(data_version, max(seq, max_id) + 1, prev_mac)

    def _report_foreign(self, conn: sqlite3.Connection, tip_id: int) -> None:
        """Log rows without a MAC after the chain's tip that this process did not write, once per state of the file.

        They are never chained (see _Unchained); the chain goes on from the newest chained row, past them.
        """
        (after,) = conn.execute(_COUNT_AFTER, (tip_id,)).fetchone()
        foreign = after - self._unchained.rows_after(tip_id)
        if foreign <= 0 or self._reported_foreign == (tip_id, foreign):
            return
        self._reported_foreign = (tip_id, foreign)
        log.error("ledger: %s after row %d %s no MAC and %s not written by this aegisd: an earlier run stored "
                  "them before its vault was unlocked, or they were edited and their MACs removed. They are never "
                  "chained after the fact; `aegisctl ledger verify` reports them", plural(foreign, "row"), tip_id,
                  "has" if foreign == 1 else "have", "was" if foreign == 1 else "were")



def _insert(conn: sqlite3.Connection, params: list[Any]) -> None:
    """INSERT the rows whose columns params holds back to back, in as few statements as there are shapes.

    Whole statements of _ROWS_PER_INSERT rows, then one for the rest: a group commit under load holds a
    few rows, so it is usually one statement.
    """
    chunk = _ROW_WIDTH * _ROWS_PER_INSERT
    full = len(params) // chunk * chunk
    if full:
        conn.executemany(_INSERTS[-1], (params[i : i + chunk] for i in range(0, full, chunk)))
    if full < len(params):
        conn.execute(_INSERTS[(len(params) - full) // _ROW_WIDTH - 1], params[full:])


def _checkpoint(conn: sqlite3.Connection) -> None:
    """Copy committed pages from the WAL into the database, so the WAL restarts small.

    Small and frequent (a few dozen frames) rather than SQLite's automatic one every 1,000 pages, which
    runs inside a COMMIT and stalls a whole batch of answers for milliseconds.
    """
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    except sqlite3.Error as exc:  # a busy reader, say: the next one catches up
        log.debug("ledger checkpoint skipped: %s", exc)


def _chain_own(conn: sqlite3.Connection, mac_of: RowMac, witness_of: RowMac, unchained: _Unchained,
               prev_mac: bytes) -> tuple[bytes, bool]:
    """MAC, in id order, the rows this writer stored without a key, if they are still exactly as it wrote them.

    Returns the MAC the next row links to, and whether they were chained. If any of them was changed or deleted
    in the file meanwhile, none is chained (logged): chaining them would vouch for the change.
    """
    def own_rows() -> Iterator[Any]:
        for first, last in unchained.ranges:
            yield from conn.execute(f"{SELECT_CHAIN} WHERE id BETWEEN ? AND ? ORDER BY id", (first, last))

    witness, count = GENESIS, 0
    try:
        for row in own_rows():
            witness, count = witness_of(witness, row[0], row[1:-1]), count + 1
    except (TypeError, ValueError):  # a value of a type the writer never stores
        witness = b""
    except sqlite3.OperationalError as exc:
        if not not_utf8(exc):
            raise
        witness = b""  # text that is not UTF-8, which the writer never stores
    if count != unchained.rows or not hmac.compare_digest(witness, unchained.witness):
        log.error("ledger: rows %s, stored while the vault was locked, were changed in the file before it "
                  "unlocked; they are left unchained, and `aegisctl ledger verify` reports them", unchained.describe())
        return prev_mac, False
    updates = []
    for row in own_rows():
        prev_mac = mac_of(prev_mac, row[0], row[1:-1])
        updates.append((prev_mac, row[0]))
    conn.executemany("UPDATE ledger SET mac = ? WHERE id = ?", updates)
    log.info("ledger: chained %d rows written before the key was set", len(updates))
    return prev_mac, True


def _chain_origin(conn: sqlite3.Connection) -> bytes:
    """What the first chained row links to: the newest prune checkpoint (everything may be pruned), or genesis."""
    checkpoint = latest_checkpoint(conn)
    if checkpoint is None:
        return GENESIS
    prev_mac: object = checkpoint.prev_mac  # as stored: any type at all
    if not (isinstance(prev_mac, bytes) and len(prev_mac) == _MAC_SIZE):
        raise LedgerError(f"the ledger's newest prune checkpoint ({checkpoint.id}) has a prev_mac that is not the "
                          f"{_MAC_SIZE}-byte value aegisd writes, so no row can be chained after it: it was edited; "
                          "restore a good backup")
    return prev_mac


def _file_id(path: Path) -> _FileId | None:
    """(st_dev, st_ino) of the file at path, or None if there is none (other OSErrors raise)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _nothing(conn: sqlite3.Connection, key: bytes | None) -> None:
    """A job that only marks its place in the writer's queue."""


def _to_row(row_id: int, entry: LedgerEntry) -> LedgerRow:
    return LedgerRow(id=row_id, **dict(zip(ENTRY_FIELDS, entry_values(entry), strict=True)))


def _settle(future: asyncio.Future[Any] | None, outcome: BaseException | None) -> None:
    if future is None or future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(None)


def _resolve(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _deliver(
    futures: list[_Future | None], first_id: int, subscribers: tuple[Subscription, ...], rows: list[LedgerRow]
) -> None:
    for row_id, future in enumerate(futures, first_id):
        if future is not None and not future.done():
            future.set_result(row_id)
    for sub in subscribers:
        sub._offer(rows)


def _replaced(subscribers: tuple[Subscription, ...]) -> None:
    for sub in subscribers:
        sub._replaced()


def _fail(futures: list[_Future | None], message: str) -> None:
    for future in futures:
        if future is not None and not future.done():
            future.set_exception(LedgerError(message))
