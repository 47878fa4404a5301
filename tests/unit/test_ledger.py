"""The audit ledger: group commit, the HMAC chain and its verifier, queries, and refusing bad files."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar

import pytest

from aegisd.ledger import LedgerEntry, LedgerError, LedgerRow, LedgerWriter, VerifyResult, query_rows, to_dict, verify
from aegisd.ledger.schema import SCHEMA_VERSION

KEY = bytes(range(32))
T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def req(i: int = 0, **kw: Any) -> LedgerEntry:
    fields: dict[str, Any] = {
        "kind": "request",
        "time_ms": 1_700_000_000_000 + i,
        "request_id": f"req-{i}",
        "agent": f"agent{i % 3}",
        "credential": "openai-prod",
        "service": "openai",
        "method": "POST",
        "path": "/v1/chat/completions",
        "target_host": "api.openai.com",
        "decision": "allowed",
        "status": 200,
        "duration_ms": 12.5,
        "bytes_in": 100,
        "bytes_out": 2000,
    }
    fields.update(kw)
    return LedgerEntry(**fields)


async def write(path: Path, entries: list[LedgerEntry], key: bytes | None = KEY) -> list[int]:
    writer = LedgerWriter(path)
    await writer.start()
    if key is not None:
        writer.set_key(key)
    ids = [await writer.append(e) for e in entries]
    await writer.close()
    return ids


def raw(path: Path, sql: str, params: tuple[Any, ...] = ()) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(sql, params)
    conn.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


def test_append_commit_and_read_back(db: Path) -> None:
    ids = run(write(db, [req(1), req(2, path="/v1/x?api_key=sk-123#frag", decision="denied", reason="r")]))
    assert ids == [1, 2]
    rows = query_rows(db, newest_first=False)
    assert [r.id for r in rows] == [1, 2]
    assert rows[0].request_id == "req-1" and rows[0].duration_ms == 12.5
    assert rows[1].path == "/v1/x"  # the query string never reaches the ledger
    assert rows[1].decision == "denied" and rows[1].reason == "r"


def test_file_is_private(db: Path) -> None:
    async def main() -> None:
        writer = LedgerWriter(db)
        await writer.start()
        await writer.append(req())
        for name in (db, Path(f"{db}-wal")):
            assert stat.S_IMODE(name.stat().st_mode) == 0o600, name
        await writer.close()

    run(main())


def test_append_resolves_only_after_commit(db: Path) -> None:
    async def main() -> None:
        writer = LedgerWriter(db)
        await writer.start()
        for i in range(20):
            row_id = await writer.append(req(i))
            conn = sqlite3.connect(db)  # another connection sees only committed data
            row = conn.execute("SELECT request_id FROM ledger WHERE id = ?", (row_id,)).fetchone()
            assert row == (f"req-{i}",)
            conn.close()
        await writer.close()

    run(main())


def test_to_dict_shape() -> None:
    entry = req(7, time_ms=1_700_000_000_123, flags="body_inspection_warn,response_redacted")
    row = LedgerRow(id=1, **dataclasses.asdict(entry))
    d = to_dict(row)
    assert list(d) == [
        "id", "time", "request_id", "agent", "credential", "service", "method", "path", "target_host",
        "decision", "reason", "status", "duration_ms", "bytes_in", "bytes_out", "kind", "flags", "detail",
    ]  # fmt: skip
    assert d["time"] == "2023-11-14T22:13:20.123Z"
    assert d["id"] == 1 and d["flags"] == "body_inspection_warn,response_redacted"


class Reason(enum.StrEnum):
    X = "not_granted"


def test_bad_entries_are_refused_at_the_caller(db: Path) -> None:
    async def main() -> None:
        writer = LedgerWriter(db)
        await writer.start()
        with pytest.raises(ValueError):
            await writer.append(req(kind="other"))
        with pytest.raises(ValueError):
            await writer.append(req(decision=""))
        with pytest.raises(ValueError):
            await writer.append(req(status=-1))
        with pytest.raises(ValueError):
            await writer.append(req(duration_ms=float("nan")))
        # Coerced to plain types, so what is hashed is exactly what is stored and read back.
        assert await writer.append(req(duration_ms=3, status=HTTPStatus.OK, reason=Reason.X)) == 1
        assert await writer.append(LedgerEntry.system("policy reload: 3 files")) == 2
        await writer.close()

    run(main())
    rows = query_rows(db, newest_first=False)
    assert rows[0].duration_ms == 3.0 and type(rows[0].status) is int and rows[0].reason == "not_granted"
    assert rows[1].kind == "system" and rows[1].decision == "" and rows[1].detail == "policy reload: 3 files"
    assert verify(db, KEY).ok is False  # never keyed: the rows are not chained
    assert run(chain_now(db)).ok


async def chain_now(path: Path) -> VerifyResult:
    writer = LedgerWriter(path)
    await writer.start()
    writer.set_key(KEY)
    await writer.close()
    return verify(path, KEY)


# ---- the chain ----


def test_chain_verifies(db: Path) -> None:
    run(write(db, [req(i) for i in range(10)]))
    result = verify(db, KEY)
    assert result.ok and result.rows_checked == 10 and result.first_bad_id is None


def test_empty_ledger_verifies(db: Path) -> None:
    run(write(db, []))
    assert verify(db, KEY).ok


def test_edited_row_is_named(db: Path) -> None:
    run(write(db, [req(i) for i in range(10)]))
    raw(db, "UPDATE ledger SET status = 500 WHERE id = 4")
    result = verify(db, KEY)
    assert not result.ok and result.first_bad_id == 4 and result.rows_checked == 3
    assert "edited" in result.reason


def test_deleted_row_is_detected(db: Path) -> None:
    run(write(db, [req(i) for i in range(10)]))
    raw(db, "DELETE FROM ledger WHERE id = 5")
    result = verify(db, KEY)
    assert not result.ok and result.first_bad_id == 6 and "missing" in result.reason


def test_rows_deleted_from_the_end_are_detected(db: Path) -> None:
    run(write(db, [req(i) for i in range(10)]))
    raw(db, "DELETE FROM ledger WHERE id > 8")
    result = verify(db, KEY)
    assert not result.ok and result.first_bad_id == 9 and result.rows_checked == 8
    assert "deleted from the end" in result.reason


def test_deleted_row_with_renumbering_is_detected(db: Path) -> None:
    run(write(db, [req(i) for i in range(10)]))
    raw(db, "DELETE FROM ledger WHERE id = 5")
    raw(db, "UPDATE ledger SET id = id - 1 WHERE id > 5")
    result = verify(db, KEY)
    assert not result.ok and result.first_bad_id == 5


def test_swapped_rows_are_detected(db: Path) -> None:
    run(write(db, [req(i) for i in range(10)]))
    conn = sqlite3.connect(db)
    with conn:  # swap everything but the ids, MACs included
        conn.execute("UPDATE ledger SET id = -1 WHERE id = 3")
        conn.execute("UPDATE ledger SET id = 3 WHERE id = 4")
        conn.execute("UPDATE ledger SET id = 4 WHERE id = -1")
    conn.close()
    result = verify(db, KEY)
    assert not result.ok and result.first_bad_id == 3


def test_removed_mac_is_detected(db: Path) -> None:
    run(write(db, [req(i) for i in range(10)]))
    raw(db, "UPDATE ledger SET mac = NULL WHERE id = 6")
    result = verify(db, KEY)
    assert not result.ok and result.first_bad_id == 6 and "MAC removed" in result.reason


def test_wrong_key_fails(db: Path) -> None:
    run(write(db, [req(i) for i in range(3)]))
    result = verify(db, b"x" * 32)
    assert not result.ok and result.first_bad_id == 1 and "key" in result.reason


def test_rows_before_the_key_are_chained_when_it_is_set(db: Path) -> None:
    async def main() -> None:
        writer = LedgerWriter(db)
        await writer.start()
        for i in range(5):
            await writer.append(req(i))  # the vault is still locked
        result = verify(db, KEY)
        assert not result.ok and result.first_bad_id == 1 and "not chained yet" in result.reason
        writer.set_key(KEY)
        writer.set_key(KEY)  # setting the same key again is harmless
        with pytest.raises(LedgerError):
            writer.set_key(b"y" * 32)
        assert await writer.append(req(5)) == 6  # queued after the key, so it is chained too
        assert verify(db, KEY).ok
        await writer.close()

    run(main())
    assert verify(db, KEY).rows_checked == 6


def test_chain_continues_across_restarts(db: Path) -> None:
    run(write(db, [req(i) for i in range(3)]))
    run(write(db, [req(i) for i in range(3, 5)], key=None))  # restarted locked, never unlocked
    assert not verify(db, KEY).ok
    assert run(write(db, [req(5)])) == [6]  # unlocked on the next start
    result = verify(db, KEY)
    assert result.ok and result.rows_checked == 6


def test_ids_are_never_reused_after_the_last_row_is_deleted(db: Path) -> None:
    run(write(db, [req(i) for i in range(3)]))
    raw(db, "DELETE FROM ledger WHERE id = 3")
    assert run(write(db, [req(3)])) == [4]
    result = verify(db, KEY)
    assert not result.ok and result.first_bad_id == 4


def test_killed_process_keeps_every_acknowledged_row(db: Path) -> None:
    script = (
        "import asyncio, sys\n"
        "from aegisd.ledger import LedgerEntry, LedgerWriter\n"
        "async def main():\n"
        "    w = LedgerWriter(sys.argv[1]); await w.start(); w.set_key(bytes(range(32)))\n"
        "    entries = [LedgerEntry(kind='request', decision='allowed', request_id=str(i)) for i in range(500)]\n"
        "    ids = await asyncio.gather(*(w.append(e) for e in entries))\n"
        "    print(max(ids), flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "500"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    result = verify(db, KEY)
    assert result.ok and result.rows_checked == 500


# ---- files that are not (or no longer) ours ----


def test_corrupt_file_is_refused(db: Path) -> None:
    db.write_bytes(os.urandom(8192))
    with pytest.raises(LedgerError, match="not an Aegis ledger or is corrupt"):
        run(write(db, [req()]))
    with pytest.raises(LedgerError, match="not an Aegis ledger or is corrupt"):
        verify(db, KEY)
    with pytest.raises(LedgerError, match="not an Aegis ledger or is corrupt"):
        query_rows(db)


def test_foreign_database_is_refused(db: Path) -> None:
    raw(db, "CREATE TABLE notes (body TEXT)")
    with pytest.raises(LedgerError, match="not an Aegis ledger; refusing"):
        run(write(db, [req()]))
    with pytest.raises(LedgerError, match="not an Aegis ledger"):
        verify(db, KEY)
    conn = sqlite3.connect(db)  # left untouched
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    conn.close()


def test_newer_schema_is_refused(db: Path) -> None:
    run(write(db, [req()]))
    raw(db, "UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(LedgerError, match=r"newer than .* upgrade aegisd"):
        run(write(db, [req()]))
    with pytest.raises(LedgerError, match="newer"):
        query_rows(db)


def test_missing_file_for_readers(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="no ledger at"):
        verify(tmp_path / "nope.db", KEY)


def test_reopen_is_idempotent(db: Path) -> None:
    run(write(db, [req()]))
    run(write(db, [req()]))
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    conn.close()


# ---- failures while running ----


def test_locked_database_rejects_waiting_appends_then_recovers(db: Path) -> None:
    async def main() -> None:
        writer = LedgerWriter(db, busy_timeout_s=0.2)
        await writer.start()
        writer.set_key(KEY)
        assert await writer.append(req(0)) == 1
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        results = await asyncio.wait_for(
            asyncio.gather(*(writer.append(req(i)) for i in range(1, 6)), return_exceptions=True), 10
        )
        assert all(isinstance(r, LedgerError) for r in results), results
        assert "database is locked" in str(results[0])
        blocker.execute("ROLLBACK")
        blocker.close()
        assert await writer.append(req(6)) == 2  # the failed rows did not use up ids
        await writer.close()

    run(main())
    assert verify(db, KEY).rows_checked == 2


def test_failing_insert_rejects_the_batch_then_recovers(db: Path) -> None:
    async def main() -> None:
        writer = LedgerWriter(db)
        await writer.start()
        writer.set_key(KEY)
        await writer.append(req(0))
        raw(db, "CREATE TRIGGER fail BEFORE INSERT ON ledger BEGIN SELECT RAISE(ABORT, 'simulated'); END")
        results = await asyncio.wait_for(
            asyncio.gather(*(writer.append(req(i)) for i in range(1, 50)), return_exceptions=True), 10
        )
        assert all(isinstance(r, LedgerError) and "simulated" in str(r) for r in results)
        writer.append_nowait(req(99))  # a fire-and-forget row fails too, but only in the log
        raw(db, "DROP TRIGGER fail")
        assert await writer.append(req(50)) in (2, 3)
        await writer.close()

    run(main())
    result = verify(db, KEY)
    assert result.ok and result.rows_checked in (2, 3)


def test_close_flushes_queued_rows_and_refuses_more(db: Path) -> None:
    async def main() -> None:
        writer = LedgerWriter(db)
        await writer.start()
        writer.set_key(KEY)
        for i in range(100):
            writer.append_nowait(req(i))
        await writer.close()
        await writer.close()
        with pytest.raises(LedgerError):
            await writer.append(req())

    run(main())
    assert verify(db, KEY).rows_checked == 100


def test_many_concurrent_appenders(db: Path) -> None:
    total, workers = 20_000, 500

    async def main() -> float:
        writer = LedgerWriter(db)
        await writer.start()
        writer.set_key(KEY)
        entries = [req(i) for i in range(total)]
        per = total // workers

        async def worker(k: int) -> list[int]:
            return [await writer.append(e) for e in entries[k * per : (k + 1) * per]]

        started = time.perf_counter()
        ids = await asyncio.gather(*(worker(k) for k in range(workers)))
        elapsed = time.perf_counter() - started
        assert sorted(i for chunk in ids for i in chunk) == list(range(1, total + 1))
        assert writer.queue_depth == 0 and writer.last_commit_seconds > 0
        await writer.close()
        return total / elapsed

    rate = run(main())
    print(f"ledger: {rate:,.0f} rows/s with {workers} concurrent appenders")
    result = verify(db, KEY)
    assert result.ok and result.rows_checked == total


# ---- reading ----


def test_query_filters_and_paging(db: Path) -> None:
    entries = [req(i, decision="denied" if i % 5 == 0 else "allowed") for i in range(30)]
    entries.append(req(30, service="github", credential="gh"))
    run(write(db, entries))
    assert [r.id for r in query_rows(db, agent="agent1", limit=3)] == [29, 26, 23]
    page = query_rows(db, agent="agent1", limit=3, after_id=23)
    assert [r.id for r in page] == [20, 17, 14]
    assert [r.id for r in query_rows(db, newest_first=False, after_id=28)] == [29, 30, 31]
    assert [r.id for r in query_rows(db, service="github")] == [31]
    assert [r.id for r in query_rows(db, credential="gh")] == [31]
    assert {r.id for r in query_rows(db, denied_only=True)} == {1, 6, 11, 16, 21, 26}
    since = 1_700_000_000_000 + 10
    assert [r.id for r in query_rows(db, since_ms=since, until_ms=since + 3, newest_first=False)] == [11, 12, 13]
    assert query_rows(db, agent="nobody") == []
    with pytest.raises(ValueError):
        query_rows(db, limit=0)


@pytest.mark.parametrize(
    ("filters", "index"),
    [
        ({"agent": "a"}, "ledger_agent"),
        ({"service": "s"}, "ledger_service"),
        ({"credential": "c"}, "ledger_credential"),
        ({"denied_only": True}, "ledger_denied"),
    ],
)
def test_queries_use_an_index(db: Path, filters: dict[str, Any], index: str) -> None:
    """`--agent X --limit 50` must stay an index walk on a million rows: no scan, no sort."""
    run(write(db, [req()]))
    seen: list[str] = []
    conn = sqlite3.connect(db)
    conn.set_trace_callback(seen.append)  # receives the SQL with its parameters filled in
    query_rows(conn, **filters, limit=50)
    conn.set_trace_callback(None)
    plan = " ".join(str(step[-1]) for step in conn.execute(f"EXPLAIN QUERY PLAN {seen[-1]}"))
    conn.close()
    assert index in plan and "TEMP B-TREE" not in plan, plan


def test_subscribers_get_committed_rows_and_slow_ones_drop(db: Path) -> None:
    async def main() -> None:
        writer = LedgerWriter(db)
        await writer.start()
        sub = writer.subscribe()
        slow = writer.subscribe(maxsize=2)
        ids = [await writer.append(req(i)) for i in range(5)]
        got = [await anext(sub) for _ in range(5)]
        assert [r.id for r in got] == ids and got[0].request_id == "req-0"
        assert slow.dropped == 3
        sub.close()
        assert [r async for r in sub] == []
        await writer.close()
        assert [r.id async for r in slow] == [1, 2]  # the writer's close ends every subscription

    run(main())


def test_writer_can_be_iterated_by_a_follower_task(db: Path) -> None:
    async def main() -> None:
        writer = LedgerWriter(db)
        await writer.start()
        seen: list[int] = []

        async def follow() -> None:
            with writer.subscribe() as sub:
                async for row in sub:
                    seen.append(row.id)

        task = asyncio.create_task(follow())
        await asyncio.sleep(0)
        await asyncio.gather(*(writer.append(req(i)) for i in range(50)))
        await writer.close()
        await asyncio.wait_for(task, 5)
        assert seen == list(range(1, 51))

    run(main())
