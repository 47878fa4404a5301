"""aegis.v1.LedgerService: read, follow, verify, report on, export and prune the audit trail."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import grpc

from aegisd.api.aegis.v1 import ledger_pb2 as pb
from aegisd.api.aegis.v1 import ledger_pb2_grpc
from aegisd.cancellation import outlive_cancellation
from aegisd.control.errors import rpc, stream_rpc
from aegisd.errors import FailedPrecondition, InvalidArgument, ShuttingDown, StorageUnavailable, VaultUninitialized
from aegisd.ledger import (
    Dropped,
    Group,
    KeyMissing,
    LedgerEntry,
    LedgerError,
    LedgerReplaced,
    LedgerRow,
    PruneRefused,
    PruneResult,
    Replaced,
    Subscription,
    ledger_stats,
    now_ms,
    open_reader,
    prune,
    query_rows,
)
from aegisd.ledger.chain import Tip
from aegisd.ledger.entry import ENTRY_FIELDS, MAX_TEXT_CHARS, iso_time, truncate
from aegisd.ledger.integrity import describe, integrity_problems
from aegisd.ledger.query import nth_newest_id
from aegisd.runtime import Runtime

Ctx = grpc.aio.ServicerContext[Any, Any]
log = logging.getLogger("aegisd.control")
MAX_LIMIT = 100_000
EXPORT_BATCH = 1000  # rows per message: ~150 KB of typical rows
# Bytes per message, so rows near their size cap (entry.MAX_TEXT_CHARS per field, or larger ones an older
# aegisd stored) never make one larger than the 4 MiB every gRPC client accepts by default.
EXPORT_BYTES = 1 << 20
LIST_BYTES = 3 << 20
PAGE_ROWS = 1000  # rows per query while filling a ListEntries reply
TIP_MAC_BYTES = 32  # a row's MAC: HMAC-SHA256


def record(row: LedgerRow) -> pb.LedgerRecord:
    try:
        return pb.LedgerRecord(
            id=row.id, time_ms=row.time_ms, request_id=row.request_id, agent=row.agent, credential=row.credential,
            service=row.service, method=row.method, path=row.path, target_host=row.target_host,
            decision=row.decision, reason=row.reason, status=row.status, duration_ms=row.duration_ms,
            bytes_in=row.bytes_in, bytes_out=row.bytes_out, kind=row.kind, flags=row.flags, detail=row.detail)
    except (TypeError, ValueError):  # a value of a type aegisd never stores: the slow path, only then
        return _edited_record(row)


def _edited_record(row: LedgerRow) -> pb.LedgerRecord:
    """A row edited in the file (text in a number column, say), which no reply could carry: each value the message
    refuses is left empty (0 or ""), so `show`, `export` and `follow` still answer; verify names the row."""
    rec = pb.LedgerRecord()
    refused = []
    for name in ("id", *ENTRY_FIELDS):
        try:
            setattr(rec, name, getattr(row, name))
        except (TypeError, ValueError):
            refused.append(name)
    _log_edited(f"row {row.id}: its {', '.join(refused)} of a type aegisd never stores, shown as 0 or empty")
    return rec


def _stored_time(time_ms: object, which: str) -> int:
    """A first or last time for `ledger stats`: 0 (none) unless an integer, as aegisd stores it."""
    if isinstance(time_ms, int) or time_ms is None:
        return time_ms or 0
    _log_edited(f"the {which} time_ms of the rows counted is of a type aegisd never stores; `ledger stats` shows none")
    return 0


_edited_logged = False


def _log_edited(what: str) -> None:
    """Warn once per process: every later read of the same row would repeat it."""
    global _edited_logged
    if not _edited_logged:
        _edited_logged = True
        log.warning("ledger: %s: ledger.db was edited behind aegisd's back; `aegisctl ledger verify` names the row. "
                    "Further such values are not logged", what)


def _bounds(f: pb.LedgerFilter) -> tuple[int | None, int | None]:
    """(since_ms, until_ms), None where unset: by presence, so a bound at the epoch (0) still bounds."""
    return (f.since_ms if f.HasField("since_ms") else None), (f.until_ms if f.HasField("until_ms") else None)


def _text(f: pb.LedgerFilter, name: Literal["agent", "service", "credential"]) -> str | None:
    """A text filter's value, by presence: set to "" it selects rows with none (an unauthenticated refusal has no
    agent); unset, as every client before presence sends it, it is no filter."""
    return str(getattr(f, name)) if f.HasField(name) else None


def _filters(f: pb.LedgerFilter) -> dict[str, Any]:
    since_ms, until_ms = _bounds(f)
    return {"agent": _text(f, "agent"), "service": _text(f, "service"), "credential": _text(f, "credential"),
            "denied_only": f.blocked, "since_ms": since_ms, "until_ms": until_ms}


def _matches(row: LedgerRow, f: pb.LedgerFilter) -> bool:
    since_ms, until_ms = _bounds(f)
    agent, service, credential = _text(f, "agent"), _text(f, "service"), _text(f, "credential")
    return ((agent is None or row.agent == agent) and (service is None or row.service == service)
            and (credential is None or row.credential == credential)
            and (not f.blocked or row.decision == "denied")
            and (since_ms is None or row.time_ms >= since_ms) and (until_ms is None or row.time_ms < until_ms))


def _groups(groups: list[Group]) -> list[pb.StatsGroup]:
    """Breakdowns for the reply; a key an older aegisd stored uncapped is cut like a new row's would be."""
    return [pb.StatsGroup(key=truncate(g.key, MAX_TEXT_CHARS), count=g.count, denied=g.denied) for g in groups]


def _take(rows: list[LedgerRow], records: list[pb.LedgerRecord], budget: int) -> int:
    """Append rows' records until the next would take them past `budget` bytes (the first always goes);
    return the bytes left, negative once a row did not fit."""
    for row in rows:
        rec = record(row)
        size = rec.ByteSize()
        if records and size > budget:
            return -1
        records.append(rec)
        budget -= size
    return budget


def _list_page(path: Path, filters: dict[str, Any], limit: int, before_id: int | None
               ) -> tuple[list[pb.LedgerRecord], bool]:
    """Up to `limit` rows older than before_id, newest first, within LIST_BYTES; True if it stopped for size.

    Read PAGE_ROWS at a time, so a reply cut short by size never read the rows it leaves out.
    """
    records: list[pb.LedgerRecord] = []
    budget = LIST_BYTES
    conn = open_reader(path)
    try:
        while len(records) < limit:
            want = min(limit - len(records), PAGE_ROWS)
            rows = query_rows(conn, limit=want, after_id=before_id, newest_first=True, **filters)
            budget = _take(rows, records, budget)
            if budget < 0:
                return records, True
            if len(rows) < want:
                break
            before_id = rows[-1].id
    finally:
        conn.close()
    return records, False


def _export_page(path: Path, filters: dict[str, Any], after_id: int, end_id: int | None
                 ) -> tuple[pb.ExportBatch, int, int | None]:
    """One batch after `after_id` (in a worker thread, on its own connection, so a cancelled export
    leaves nothing shared behind): the batch, the last id in it (0: done), and the export's end id.

    A batch holds at most EXPORT_BATCH rows and, unless one row alone is larger, EXPORT_BYTES."""
    conn = open_reader(path)
    try:
        if end_id is None:  # the first page fixes the end, so rows committed meanwhile are not chased
            try:
                end_id = int(conn.execute("SELECT coalesce(max(id), 0) FROM ledger").fetchone()[0])
            except sqlite3.Error as exc:  # damaged pages: said as show, stats and verify say it
                raise LedgerError(f"cannot read the ledger: {exc}") from None
        rows = query_rows(conn, limit=EXPORT_BATCH, after_id=after_id, newest_first=False, **filters)
    finally:
        conn.close()
    kept = [r for r in rows if r.id <= end_id]
    records: list[pb.LedgerRecord] = []
    if _take(kept, records, EXPORT_BYTES) < 0:  # cut for size: the next batch goes on after the last row sent
        return pb.ExportBatch(records=records), records[-1].id, end_id
    last = kept[-1].id if kept and len(kept) == len(rows) == EXPORT_BATCH else 0
    return pb.ExportBatch(records=records), last, end_id


def _backlog_page(path: Path, filters: dict[str, Any], backlog: int, after_id: int | None, end_id: int
                  ) -> tuple[list[LedgerRow], int, int]:
    """Up to PAGE_ROWS rows of a follow's backlog (the newest `backlog` matching rows, oldest first) after
    `after_id` (None: from where the backlog starts), the id to go on after (0: done), and the backlog's last id.
    The first page fixes that end, so rows committed since come live only: a follower that fell behind them is
    told exactly the rows it missed."""
    conn = open_reader(path)
    try:
        if after_id is None:
            try:
                end_id = int(conn.execute("SELECT coalesce(max(id), 0) FROM ledger").fetchone()[0])
            except sqlite3.Error as exc:
                raise LedgerError(f"cannot read the ledger: {exc}") from None
            after_id = max(nth_newest_id(conn, backlog, **filters) - 1, 0)
        rows = query_rows(conn, limit=PAGE_ROWS, after_id=after_id, newest_first=False, **filters)
    finally:
        conn.close()
    kept = [row for row in rows if row.id <= end_id]
    return kept, kept[-1].id if len(kept) == len(rows) == PAGE_ROWS else 0, end_id


def _integrity(path: Path) -> str:
    """What SQLite's full integrity check finds wrong with the ledger file, or "" if nothing."""
    conn = open_reader(path)
    try:
        problems = integrity_problems(conn)
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot read ledger {path}: {exc}") from None
    finally:
        conn.close()
    return f"ledger.db fails SQLite's integrity check: {describe(problems)}" if problems else ""


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidArgument(f"limit must be between 1 and {MAX_LIMIT}")


class LedgerService(ledger_pb2_grpc.LedgerServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.path = runtime.config.data_dir / "ledger.db"
        self._prune_lock = asyncio.Lock()

    async def _backlog(self, f: pb.LedgerFilter, backlog: int, live: Subscription) -> AsyncIterator[LedgerRow]:
        """The newest `backlog` rows matching `f`, oldest first, read a page at a time: a backlog of 100,000 large
        rows read whole once held hundreds of MB in aegisd until the follow ended. It stops where a restore
        replaced the file (`live` says so): its pages would go on in another ledger."""
        _check_limit(backlog)
        filters, replaced = _filters(f), live.replacements
        after_id: int | None = None
        end_id = 0
        while after_id != 0 and live.replacements == replaced:
            try:
                rows, after_id, end_id = await asyncio.to_thread(_backlog_page, self.path, filters, backlog, after_id,
                                                                 end_id)
            except LedgerError as exc:
                raise StorageUnavailable(str(exc)) from None
            for row in rows:
                yield row

    @rpc
    async def ListEntries(self, request: pb.ListEntriesRequest, context: Ctx) -> pb.ListEntriesResponse:
        """The newest matching rows, in replies of a few MiB at most (`more` asks the client to page on)."""
        limit = request.limit or 100
        _check_limit(limit)
        try:
            records, more = await asyncio.to_thread(_list_page, self.path, _filters(request.filter), limit,
                                                    request.before_id or None)
        except LedgerError as exc:
            raise StorageUnavailable(str(exc)) from None
        return pb.ListEntriesResponse(records=records, more=more)

    @stream_rpc
    async def Follow(self, request: pb.FollowRequest, context: Ctx) -> AsyncGenerator[pb.LedgerRecord, None]:
        """The backlog, then live rows; the subscription starts first, so rows committed while the backlog is
        read come twice and are skipped by id, until a restore swaps in a file whose ids start lower. It ends only
        when aegisd stops (or the client goes), once the rows committed before the stop are sent."""
        flt = request.filter
        with self.rt.ledger.subscribe(match=lambda row: _matches(row, flt)) as live:
            last_id = 0
            if request.backlog:
                async for row in self._backlog(flt, request.backlog, live):
                    last_id = row.id
                    yield record(row)
            async for item in live:
                if isinstance(item, Dropped):
                    yield pb.LedgerRecord(dropped=item.rows)
                elif isinstance(item, Replaced):
                    last_id = 0
                elif item.id > last_id:
                    yield record(item)
        raise ShuttingDown("aegisd is stopping; this follow has ended")

    @rpc
    async def Verify(self, request: pb.VerifyRequest, context: Ctx) -> pb.VerifyResponse:
        expect: Tip | None = None
        if request.expect_id or request.expect_mac:
            if request.expect_id < 1 or len(request.expect_mac) != TIP_MAC_BYTES:
                raise InvalidArgument(f"an earlier tip is a row id (1 or more) and a MAC of {TIP_MAC_BYTES} bytes, as "
                                      "verify reports them")
            expect = (request.expect_id, request.expect_mac)
        key = self.rt.ledger_key()
        if key is None:
            self._require_vault()
            raise FailedPrecondition("the ledger key derives from the vault: unlock it once to verify",
                                     reason="vault_locked")
        await self.rt.ledger.settle()  # the rows written before the unlock are chained by now
        try:  # after the settle, whose job checks that ledger.db is still the writer's file
            result, tampered = await self.rt.ledger.verify_file(key, expect=expect)
        except LedgerError as exc:
            tampered = self.rt.ledger.tampered
            raise StorageUnavailable(f"{tampered}; {exc}" if tampered else str(exc)) from None
        if tampered:  # what the writer saw happen to its file, even if what the path holds now verifies
            result = replace(result, ok=False, unchained_only=False,
                             reason=f"{tampered} (what ledger.db holds now: {result.reason})")
        return pb.VerifyResponse(ok=result.ok, rows_checked=result.rows_checked,
                                 first_bad_id=result.first_bad_id or 0, reason=result.reason,
                                 first_id=result.first_id, last_id=result.last_id, last_mac=result.last_mac,
                                 unchained_only=result.unchained_only)

    @rpc
    async def Stats(self, request: pb.StatsRequest, context: Ctx) -> pb.StatsResponse:
        try:
            stats = await asyncio.to_thread(ledger_stats, self.path, top=request.top or 10, **_filters(request.filter))
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        except LedgerError as exc:
            raise StorageUnavailable(str(exc)) from None
        return pb.StatsResponse(
            rows=stats.rows, requests=stats.requests, system_events=stats.system_events, allowed=stats.allowed,
            denied=stats.denied, bytes_in=stats.bytes_in, bytes_out=stats.bytes_out,
            first_time_ms=_stored_time(stats.first_time_ms, "first"),
            last_time_ms=_stored_time(stats.last_time_ms, "last"),
            by_decision=_groups(stats.by_decision), by_service=_groups(stats.by_service),
            by_reason=_groups(stats.by_reason), top_agents=_groups(stats.top_agents))

    @stream_rpc
    async def Export(self, request: pb.ExportRequest, context: Ctx) -> AsyncGenerator[pb.ExportBatch, None]:
        """Pages by id (the after_id cursor), so memory stays constant; gRPC flow control paces the reads."""
        filters = _filters(request.filter)
        after_id, end_id = 0, None
        while True:
            try:
                batch, after_id, end_id = await asyncio.to_thread(_export_page, self.path, filters, after_id, end_id)
            except LedgerError as exc:
                raise StorageUnavailable(str(exc)) from None
            if batch.records:
                yield batch
            if not after_id:
                return

    def _require_vault(self) -> None:
        """With no vault yet there is nothing to unlock: say to create one (the key derives from it)."""
        if self.rt.vault.state == "uninitialized":
            raise VaultUninitialized()

    @rpc
    async def Prune(self, request: pb.PruneRequest, context: Ctx) -> pb.PruneResponse:
        if request.before_ms <= 0:
            raise InvalidArgument("give the time to prune before (--before)")
        if request.before_ms > now_ms():
            raise InvalidArgument("the prune time is in the future; rows are kept until they are older than it")
        if self.rt.ledger_key() is None:
            self._require_vault()
            raise FailedPrecondition("the ledger key derives from the vault: unlock it once, then prune",
                                     reason="vault_locked")
        async with self._prune_lock:
            try:
                damage = await asyncio.to_thread(_integrity, self.path)
            except LedgerError as exc:
                raise StorageUnavailable(str(exc)) from None
            if damage:  # the prune finds its first kept row through the time index: one that hides rows misleads it
                raise FailedPrecondition(f"the prune was refused to keep the evidence: {damage}; see `aegisctl ledger "
                                         "verify`", reason="ledger_tampered")
            try:
                # Once rows go, the prune runs to its end and is recorded, even if the client has gone meanwhile.
                result = await outlive_cancellation(self._prune_and_record(request))
            except KeyMissing as exc:
                raise FailedPrecondition(str(exc), reason="vault_locked") from None
            except PruneRefused as exc:
                raise FailedPrecondition(str(exc), reason="ledger_tampered") from None
            except LedgerReplaced as exc:
                raise FailedPrecondition(f"{exc}: nothing was pruned", reason="ledger_replaced") from None
            except LedgerError as exc:
                raise StorageUnavailable(str(exc)) from None
        if isinstance(result.stopped, LedgerReplaced):
            raise FailedPrecondition(f"{result.stopped}: the {result.pruned} rows pruned before it were in the "
                                     "ledger it replaced", reason="ledger_replaced")
        if result.stopped is not None:
            done = (f"{result.pruned} rows were pruned (recorded as `ledger_pruned`; the chain now starts at row "
                    f"{result.first_kept_id}), then the prune stopped: {result.stopped}")
            if isinstance(result.stopped, PruneRefused):
                raise FailedPrecondition(done, reason="ledger_tampered")
            raise StorageUnavailable(done)
        return pb.PruneResponse(pruned=result.pruned, first_kept_id=result.first_kept_id, unchained=result.unchained)

    async def _prune_and_record(self, request: pb.PruneRequest) -> PruneResult:
        """The prune, then its log line and `ledger_pruned` row for what it deleted, also when it stopped part-way."""
        result = await prune(self.rt.ledger, request.before_ms, include_unchained=request.include_unchained)
        if isinstance(result.stopped, LedgerReplaced):  # the rows went from a file that is not the ledger now
            self.rt.log_event("ledger prune cut off by a restore", level=logging.WARNING, rows=result.pruned,
                              stopped=str(result.stopped))
            return result
        if result.pruned:
            detail = (f"ledger pruned: {result.pruned} rows recorded before {iso_time(request.before_ms)} deleted; "
                      f"the chain now starts at row {result.first_kept_id} (checkpoint {result.checkpoint_id})")
            if result.unchained:
                detail += f"; {result.unchained} of them were not chained (no MAC) and were let go by the operator"
            stopped: dict[str, Any] = {}
            if result.stopped is not None:
                stopped["stopped"] = str(result.stopped)
                detail += f"; the prune stopped there: {result.stopped}"
            self.rt.log_event("ledger pruned", rows=result.pruned, first_kept_id=result.first_kept_id,
                              unchained=result.unchained, **stopped)
            try:
                await self.rt.ledger.append(LedgerEntry.system(detail, reason="ledger_pruned"))
            except LedgerError as exc:
                done = "succeeded" if result.stopped is None else f"deleted {result.pruned} rows, then stopped"
                raise StorageUnavailable(f"the prune {done} but could not be recorded: {exc}") from None
        return result
