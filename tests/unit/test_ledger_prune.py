"""Ledger retention and reports: prune keeps the chain verifiable through an authenticated checkpoint,
forged or missing checkpoints are caught, stats count with GROUP BY, and the writer's maintenance hooks."""

from __future__ import annotations

import asyncio
import errno
import importlib
import logging
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import aegisd.ledger.writer as writer_module
from aegisctl.cli import root
from aegisd.ledger import (
    KeyMissing,
    LedgerEntry,
    LedgerError,
    LedgerReplaced,
    LedgerWriter,
    PruneRefused,
    ReplaceIncomplete,
    ledger_stats,
    prune,
    query_rows,
    verify,
)
from aegisd.ledger import schema as schema_module
from aegisd.ledger import stats as stats_module
from aegisd.ledger.checkpoint import all_checkpoints, checkpoint_mac
from aegisd.ledger.query import filter_clauses
from aegisd.ledger.stats import _stats, _unfiltered_stats
from tests.unit.event_loops import eventually

KEY = bytes(range(100, 132))
prune_module = importlib.import_module("aegisd.ledger.prune")  # `aegisd.ledger.prune` as an attribute is the function
T0 = 1_700_000_000_000


def entry(i: int, **kw: Any) -> LedgerEntry:
    fields: dict[str, Any] = {"kind": "request", "time_ms": T0 + i, "request_id": f"r{i}", "agent": f"agent{i % 3}",
                              "service": "openai", "method": "GET", "path": "/v1/models", "decision": "allowed",
                              "status": 200}
    fields.update(kw)
    return LedgerEntry(**fields)


async def started(path: Path, key: bytes | None = KEY) -> LedgerWriter:
    writer = LedgerWriter(path)
    await writer.start()
    if key is not None:
        writer.set_key(key)
    return writer


def sql(path: Path, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        with conn:
            return conn.execute(statement, params).fetchall()
    finally:
        conn.close()


def fill(path: Path, count: int) -> None:
    async def main() -> None:
        writer = await started(path)
        await asyncio.gather(*(writer.append(entry(i)) for i in range(count)))
        await writer.close()

    asyncio.run(main())


def prune_once(path: Path, before_ms: int, chunk_rows: int = 10_000) -> tuple[int, int, int | None]:
    async def main() -> tuple[int, int, int | None]:
        writer = await started(path)
        try:
            result = await prune(writer, before_ms, chunk_rows=chunk_rows)
        finally:
            await writer.close()
        return result.pruned, result.first_kept_id, result.checkpoint_id

    return asyncio.run(main())


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


def test_prune_then_verify(db: Path) -> None:
    fill(db, 100)
    assert prune_once(db, T0 + 40, chunk_rows=7) == (40, 41, 1)  # rows 1..40 have time T0+0..T0+39
    result = verify(db, KEY)
    assert result.ok and result.rows_checked == 60 and result.first_id == 41, result
    assert "pruned" in result.reason
    assert [r.id for r in query_rows(db, newest_first=False, limit=1)] == [41]
    [cp] = all_checkpoints(db_conn := sqlite3.connect(db))
    db_conn.close()
    assert (cp.first_kept_id, cp.pruned) == (41, 40) and len(cp.mac) == 32
    fill(db, 5)  # the chain goes on from the kept rows
    assert verify(db, KEY).ok and verify(db, KEY).rows_checked == 65
    assert prune_once(db, T0 + 40) == (0, 41, None)  # nothing older left: no new checkpoint
    assert prune_once(db, T0 + 60)[:2] == (20, 61)
    assert len(sql(db, "SELECT id FROM checkpoints")) == 2 and verify(db, KEY).ok


def test_an_earlier_tip_across_a_prune(db: Path) -> None:
    """A tip the prune deleted cannot be compared (and verify says so), except the last pruned row, whose MAC
    the authentic checkpoint keeps; with no row after the prune that row is the tip."""
    fill(db, 20)
    tips = {row_id: mac for row_id, mac in sql(db, "SELECT id, mac FROM ledger")}
    assert prune_once(db, T0 + 20)[:2] == (20, 21)  # every row
    result = verify(db, KEY)
    assert result.ok and (result.last_id, result.last_mac) == (20, tips[20]), result
    fill(db, 3)
    assert verify(db, KEY, expect=(20, tips[20])).reason.endswith("it holds row 20, the tip of an earlier verify, "
                                                                  "unchanged")
    assert not verify(db, KEY, expect=(20, tips[19])).ok
    pruned = verify(db, KEY, expect=(5, tips[5]))
    assert pruned.ok and pruned.reason.endswith("row 5, the tip of an earlier verify, has been pruned since (the chain "
                                                "now starts at row 21), so it cannot be compared"), pruned


def test_prune_interleaves_with_appends(db: Path) -> None:
    fill(db, 300)

    async def main() -> None:
        writer = await started(db)
        appended = asyncio.gather(*(writer.append(entry(1000 + i)) for i in range(200)))
        result, ids = await asyncio.gather(prune(writer, T0 + 250, chunk_rows=16), appended)
        assert result.pruned == 250 and result.first_kept_id == 251
        assert sorted(ids) == list(range(301, 501))
        await writer.close()

    asyncio.run(main())
    result = verify(db, KEY)
    assert result.ok and result.rows_checked == 250 and result.first_id == 251
    assert len(sql(db, "SELECT id FROM checkpoints")) == 1  # one checkpoint per prune, moved along per chunk


def test_prune_everything_then_the_chain_continues_from_the_checkpoint(db: Path) -> None:
    fill(db, 10)
    assert prune_once(db, T0 + 10**6) == (10, 11, 1)
    assert sql(db, "SELECT count(*) FROM ledger") == [(0,)]
    assert verify(db, KEY).ok

    async def locked_restart() -> None:  # no key: rows wait unchained, then link to the checkpoint
        writer = await started(db, key=None)
        assert await writer.append(entry(11)) == 11
        assert not verify(db, KEY).ok
        writer.set_key(KEY)
        assert await writer.append(entry(12)) == 12
        await writer.close()

    asyncio.run(locked_restart())
    result = verify(db, KEY)
    assert result.ok and result.rows_checked == 2 and result.first_id == 11


@pytest.mark.parametrize("column, value", [("first_kept_id", 30), ("prev_mac", b"\0" * 32), ("pruned", 1),
                                           ("time_ms", T0), ("mac", b"\1" * 32), ("id", 7)])
def test_altered_checkpoint_fails_verify(db: Path, column: str, value: Any) -> None:
    fill(db, 50)
    prune_once(db, T0 + 20)
    assert verify(db, KEY).ok
    sql(db, f"UPDATE checkpoints SET {column} = ?", (value,))  # noqa: S608 - test-controlled column
    result = verify(db, KEY)
    assert not result.ok and ("checkpoint" in result.reason or "missing" in result.reason), result


def test_forged_checkpoint_cannot_hide_a_deletion(db: Path) -> None:
    fill(db, 50)
    prev_mac = sql(db, "SELECT mac FROM ledger WHERE id = 20")[0][0]
    sql(db, "DELETE FROM ledger WHERE id <= 20")
    result = verify(db, KEY)
    assert not result.ok and result.first_bad_id == 21 and "missing" in result.reason
    # The attacker knows everything except the key: a checkpoint with the right values and a guessed MAC.
    wrong_key = b"k" * 32
    mac = checkpoint_mac(wrong_key, 1, T0, 21, prev_mac, 20)
    sql(db, "INSERT INTO checkpoints (id, time_ms, first_kept_id, prev_mac, pruned, mac) VALUES (1, ?, 21, ?, 20, ?)",
        (T0, prev_mac, mac))
    result = verify(db, KEY)
    assert not result.ok and "checkpoint 1" in result.reason and "forged" in result.reason
    # With the right key the same checkpoint is what a prune writes, and verifies.
    sql(db, "UPDATE checkpoints SET mac = ?", (checkpoint_mac(KEY, 1, T0, 21, prev_mac, 20),))
    assert verify(db, KEY).ok


def test_deleting_rows_or_checkpoints_after_a_prune_fails_verify(tmp_path: Path, db: Path) -> None:
    fill(db, 60)
    prune_once(db, T0 + 20)
    prune_once(db, T0 + 40)
    assert verify(db, KEY).ok
    pristine = tmp_path / "pristine.db"
    shutil.copy(db, pristine)

    sql(db, "DELETE FROM ledger WHERE id = 41")  # the first kept row
    result = verify(db, KEY)
    assert not result.ok and result.first_bad_id == 42 and "missing" in result.reason

    shutil.copy(pristine, db)
    sql(db, "DELETE FROM checkpoints WHERE id = 2")  # roll back to the older checkpoint
    result = verify(db, KEY)
    assert not result.ok and result.first_bad_id == 41 and "rows 21..40 are missing" in result.reason

    # Found by a cold review: removing an older checkpoint went unnoticed, though the docs said it was caught.
    shutil.copy(pristine, db)
    sql(db, "DELETE FROM checkpoints WHERE id = 1")
    result = verify(db, KEY)
    assert not result.ok and result.first_bad_id is None, result
    assert result.reason == "prune checkpoint 1 is missing before checkpoint 2: removed from the file", result

    shutil.copy(pristine, db)
    sql(db, "DELETE FROM checkpoints")
    assert not verify(db, KEY).ok

    shutil.copy(pristine, db)
    sql(db, "UPDATE checkpoints SET id = 3 WHERE id = 1")  # reorder: the older one now looks newest
    assert not verify(db, KEY).ok

    shutil.copy(pristine, db)  # a row slipped in before the chain's start
    sql(db, "INSERT INTO ledger SELECT 5, kind, time_ms, request_id, agent, credential, service, method, path, "
        "target_host, decision, reason, status, duration_ms, bytes_in, bytes_out, flags, detail, mac "
        "FROM ledger WHERE id = 41")
    result = verify(db, KEY)
    assert not result.ok and result.first_bad_id == 5 and "precedes the last prune" in result.reason


def test_checkpoints_are_numbered_without_gaps_whatever_the_id_counter_says(db: Path) -> None:
    """Verify requires checkpoint ids 1, 2, 3 ...: a prune numbers its checkpoint after the newest, not by SQLite's
    counter, so one edited to jump ahead cannot make the next genuine checkpoint look like a removal."""
    fill(db, 30)
    prune_once(db, T0 + 10)
    sql(db, "UPDATE sqlite_sequence SET seq = 7 WHERE name = 'checkpoints'")
    prune_once(db, T0 + 20)
    assert sql(db, "SELECT id, first_kept_id FROM checkpoints") == [(1, 11), (2, 21)]
    assert verify(db, KEY).ok


def test_prune_refuses_to_start_from_a_forged_checkpoint(db: Path) -> None:
    """Found by a cold review: prune started from the newest checkpoint without checking its MAC. Rows 1..5 deleted
    and a forged checkpoint put in their place (the real MAC of row 5, a junk MAC of its own): a prune to row 11
    checked rows 6..10 against it, deleted them and wrote a genuine checkpoint, and with the forged one then removed
    the ledger verified. Every checkpoint is checked first now, as verify checks them."""
    fill(db, 20)
    row_5 = sql(db, "SELECT mac FROM ledger WHERE id = 5")[0][0]
    sql(db, "DELETE FROM ledger WHERE id <= 5")
    sql(db, "INSERT INTO checkpoints (time_ms, first_kept_id, prev_mac, pruned, mac) VALUES (?, 6, ?, 5, ?)",
        (T0, row_5, b"\1" * 32))
    with pytest.raises(PruneRefused) as refused:
        prune_once(db, T0 + 10)
    assert str(refused.value) == ("prune checkpoint 1 does not match its MAC: it was forged or altered, or the key is "
                                  "wrong; the prune was refused to keep the evidence; see `aegisctl ledger verify`")
    assert sql(db, "SELECT count(*) FROM ledger") == [(15,)] and sql(db, "SELECT count(*) FROM checkpoints") == [(1,)]
    assert not verify(db, KEY).ok


def test_prune_refuses_to_launder_a_tampered_range(db: Path) -> None:
    fill(db, 30)
    sql(db, "UPDATE ledger SET status = 500 WHERE id = 5")
    with pytest.raises(PruneRefused, match="row 5 does not verify"):
        prune_once(db, T0 + 20)
    assert sql(db, "SELECT count(*) FROM ledger") == [(30,)] and sql(db, "SELECT count(*) FROM checkpoints") == [(0,)]
    assert verify(db, KEY).first_bad_id == 5

    sql(db, "UPDATE ledger SET status = 200 WHERE id = 5")
    sql(db, "DELETE FROM ledger WHERE id = 8")
    with pytest.raises(PruneRefused, match="row 8 does not verify"):
        prune_once(db, T0 + 20)
    assert sql(db, "SELECT count(*) FROM ledger") == [(29,)]


def test_a_tampered_row_in_a_later_chunk_refuses_the_prune_before_anything_is_deleted(db: Path) -> None:
    """Found at the 29th stop: chunks were verified as they were deleted, so a prune refused at row 15 of 20 (the
    third chunk of 7) had already deleted rows 1-14, with no record, and said it was refused."""
    fill(db, 30)
    sql(db, "UPDATE ledger SET status = 500 WHERE id = 15")
    with pytest.raises(PruneRefused, match="row 15 does not verify"):
        prune_once(db, T0 + 20, chunk_rows=7)
    assert sql(db, "SELECT count(*) FROM ledger") == [(30,)] and sql(db, "SELECT count(*) FROM checkpoints") == [(0,)]


def interrupted_prune(db: Path, after_calls: int, interrupt: Any) -> Any:
    """A prune of rows before T0 + 20 in chunks of 7, with `interrupt(writer)` run after the `after_calls`-th chunk
    (the first pass takes three)."""

    async def main() -> Any:
        writer = await started(db)
        real = writer.run_exclusive
        calls = 0

        async def run_exclusive(job: Any) -> Any:
            nonlocal calls
            done = await real(job)
            calls += 1
            if calls == after_calls:
                interrupt(writer)
            return done

        writer.run_exclusive = run_exclusive  # type: ignore[method-assign,assignment]
        try:
            return await prune(writer, T0 + 20, chunk_rows=7)
        finally:
            await writer.close()

    return asyncio.run(main())


def test_a_chunk_that_fails_after_others_were_deleted_returns_what_was_done(db: Path) -> None:
    """The second pass checks each chunk again; should one fail there (the file edited between the passes), the
    chunks already deleted are reported, for the caller to record, and the ledger verifies from the cut."""
    fill(db, 30)
    # The first pass's three chunks of 7 (rows 1-20), then the first deletion; then row 15 is edited.
    result = interrupted_prune(db, 3 + 1, lambda writer: sql(db, "UPDATE ledger SET status = 500 WHERE id = 15"))
    assert (result.pruned, result.first_kept_id, result.checkpoint_id) == (14, 15, 1)  # rows 1-7 and 8-14 went
    assert isinstance(result.stopped, PruneRefused) and "row 15 does not verify" in str(result.stopped)
    assert sql(db, "SELECT min(id), count(*) FROM ledger") == [(15, 16)]
    assert verify(db, KEY).first_bad_id == 15 and verify(db, KEY).first_id == 15


def test_a_sqlite_error_after_some_chunks_is_reported_with_what_was_done(
        db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From the review of the two-pass prune: SQLite's own errors (a lock held past the busy timeout, a full disk)
    escaped as they were, so the chunks already deleted went unrecorded and the caller got an internal error."""
    fill(db, 30)
    real = prune_module._delete_chunk

    def failing(conn: sqlite3.Connection, key: bytes, progress: Any, chunk_rows: int) -> bool:
        if progress.pruned:
            raise sqlite3.OperationalError("database or disk is full")
        return bool(real(conn, key, progress, chunk_rows))

    monkeypatch.setattr(prune_module, "_delete_chunk", failing)
    result = interrupted_prune(db, 0, lambda writer: None)
    assert (result.pruned, result.first_kept_id) == (7, 8)
    assert type(result.stopped) is LedgerError and "database or disk is full" in str(result.stopped)
    assert sql(db, "SELECT min(id) FROM ledger") == [(8,)] and verify(db, KEY).ok


def test_a_restore_during_a_prune_stops_it_on_the_file_it_began_on(db: Path) -> None:
    """From the review of the two-pass prune: a restore between chunks left the prune going on the restored
    ledger with the old one's bounds, and its ledger_pruned row described a prune the restored file never saw."""
    fill(db, 30)

    def restored(writer: LedgerWriter) -> None:
        writer.restores += 1  # what replace_file counts, in the same thread as the chunks

    result = interrupted_prune(db, 4, restored)  # after the first deletion
    assert result.pruned == 7 and isinstance(result.stopped, LedgerReplaced)
    with pytest.raises(LedgerReplaced):
        interrupted_prune(db, 1, restored)  # in the first pass: nothing deleted, and the error is raised
    assert sql(db, "SELECT min(id) FROM ledger") == [(8,)]


def test_prune_needs_the_key_and_the_writer_survives_a_failed_job(db: Path) -> None:
    fill(db, 5)

    async def main() -> None:
        writer = await started(db, key=None)
        with pytest.raises(KeyMissing, match="unlock"):
            await prune(writer, T0 + 3)

        def boom(conn: sqlite3.Connection, key: bytes | None) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM ledger")
            raise RuntimeError("job failed")

        with pytest.raises(RuntimeError, match="job failed"):
            await writer.run_exclusive(boom)
        assert await writer.append(entry(5)) == 6  # rolled back, and the writer goes on
        assert await writer.run_exclusive(lambda conn, key: key) is None
        writer.set_key(KEY)
        assert await writer.run_exclusive(lambda conn, key: key) == KEY
        await writer.close()
        with pytest.raises(LedgerError):
            await writer.run_exclusive(lambda conn, key: None)

    asyncio.run(main())
    assert sql(db, "SELECT count(*) FROM ledger") == [(6,)] and verify(db, KEY).ok


def test_replace_file_swaps_between_commits_and_forgets_the_key(tmp_path: Path, db: Path) -> None:
    other = tmp_path / "other.db"
    fill(other, 3)
    staged = tmp_path / "staged.db"
    shutil.copy(other, staged)

    async def main() -> None:
        writer = await started(db)
        await writer.append(entry(0))
        await writer.replace_file(staged)
        assert writer.key is None and not staged.exists()
        assert await writer.append(entry(99)) == 4  # continues the restored file's ids
        assert sql(db, "SELECT mac FROM ledger WHERE id = 4") == [(None,)]  # not chained with the old key
        writer.set_key(KEY)  # the restored vault's key (here the same test key)
        await writer.append(entry(100))
        await writer.close()

    asyncio.run(main())
    assert [r.request_id for r in query_rows(db, newest_first=False)] == ["r0", "r1", "r2", "r99", "r100"]
    assert verify(db, KEY).ok


def test_a_replace_whose_file_cannot_be_opened_fails_until_a_retry_can(
        tmp_path: Path, db: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A file moved into place that will not open (a migration on a full disk, say) leaves the writer failing
    and retrying, not holding a closed connection until a restart; the reopen's commit records the outage."""
    monkeypatch.setattr(writer_module, "RETRY_SECONDS", 0.05)
    good = tmp_path / "good.db"
    fill(good, 3)
    staged = tmp_path / "staged.db"
    staged.write_bytes(os.urandom(8192))

    async def main() -> None:
        writer = await started(db)
        await writer.append(entry(0))
        await writer.replace_file(staged)  # the move itself succeeded
        assert writer.failing
        with pytest.raises(LedgerError, match="not an Aegis ledger or is corrupt"):
            await writer.append(entry(1))
        with pytest.raises(LedgerError, match="not an Aegis ledger or is corrupt"):
            await writer.run_exclusive(lambda conn, key: None)
        shutil.copy(good, db)  # the cause goes away; no restart, no request needed
        await eventually(lambda: not writer.failing, "the reopen", 10)
        writer.set_key(KEY)
        assert await writer.append(entry(9)) == 5
        await writer.close()

    asyncio.run(main())
    rows = query_rows(db, newest_first=False)
    assert [(r.kind, r.request_id, r.reason) for r in rows] == [
        ("request", "r0", ""), ("request", "r1", ""), ("request", "r2", ""),
        ("system", "", "ledger_unavailable"), ("request", "r9", "")]
    assert "1 row from 1 failed commit is missing" in rows[3].detail
    assert verify(db, KEY).ok
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("cannot reopen the ledger after a restore"), errors


def test_a_second_replace_recovers_from_a_file_that_would_not_open(tmp_path: Path, db: Path) -> None:
    """The operator's way out: run the restore again with a good backup."""
    bad, good = tmp_path / "bad.db", tmp_path / "good.db"
    bad.write_bytes(os.urandom(8192))
    fill(good, 2)

    async def main() -> None:
        writer = await started(db)
        await writer.replace_file(bad)
        assert writer.failing
        await writer.replace_file(good)
        writer.set_key(KEY)
        assert await writer.append(entry(7)) == 4  # after the restored rows and the outage's row
        await writer.close()

    asyncio.run(main())
    assert [r.kind for r in query_rows(db, newest_first=False)] == ["request", "request", "system", "request"]
    assert verify(db, KEY).ok


def test_stats_group_by(db: Path) -> None:
    async def main() -> None:
        writer = await started(db)
        rows = [entry(i, agent="claude", service="github") for i in range(5)]
        rows += [entry(10 + i, agent="cursor", service="openai", decision="denied", reason="not_granted",
                       status=403) for i in range(3)]
        rows += [entry(20, agent="cursor", service="github", decision="denied", reason="rate_limited", status=429,
                       bytes_in=10, bytes_out=7)]
        rows += [LedgerEntry.system("aegisd started")]
        for row in rows:
            await writer.append(row)
        await writer.close()

    asyncio.run(main())
    stats = ledger_stats(db)
    assert (stats.rows, stats.requests, stats.system_events, stats.allowed, stats.denied) == (10, 9, 1, 5, 4)
    assert (stats.bytes_in, stats.bytes_out) == (10, 7) and stats.first_time_ms == T0
    assert [(g.key, g.count, g.denied) for g in stats.by_decision] == [("allowed", 5, 0), ("denied", 4, 4)]
    assert [(g.key, g.count, g.denied) for g in stats.by_service] == [("github", 6, 1), ("openai", 3, 3)]
    assert [(g.key, g.count) for g in stats.by_reason] == [("not_granted", 3), ("rate_limited", 1)]
    assert [(g.key, g.count, g.denied) for g in stats.top_agents] == [("claude", 5, 0), ("cursor", 4, 4)]
    assert [g.key for g in ledger_stats(db, top=1).top_agents] == ["claude"]
    only = ledger_stats(db, agent="cursor", since_ms=T0 + 11)
    assert (only.rows, only.denied) == (3, 3) and [g.key for g in only.by_service] == ["openai", "github"]
    blocked = ledger_stats(db, denied_only=True)
    assert blocked.rows == 4 and blocked.by_decision[0].key == "denied"
    assert ledger_stats(db, agent="nobody").rows == 0 and ledger_stats(db, agent="nobody").first_time_ms is None
    with pytest.raises(ValueError, match="top"):
        ledger_stats(db, top=0)


@pytest.mark.parametrize(("filters", "index"), [({"service": "openai"}, "ledger_service"),
                                               ({"agent": "cursor"}, "ledger_agent")])
def test_stats_group_without_walking_a_column_index(db: Path, filters: dict[str, Any], index: str | None) -> None:
    """Grouping by walking, say, the service index looks up every row it names, twice as slow on a million
    rows as one scan into a temporary B-tree; filters still use their own index."""
    async def main() -> None:
        writer = await started(db)
        for i in range(20):
            await writer.append(entry(i, agent=("claude", "cursor")[i % 2], service=("github", "openai")[i % 3 == 0]))
        await writer.close()

    asyncio.run(main())
    seen: list[str] = []
    conn = sqlite3.connect(db)
    conn.set_trace_callback(seen.append)  # receives the SQL with its parameters filled in
    clauses, params = filter_clauses(**filters)
    _stats(conn, clauses, params, 10)
    conn.set_trace_callback(None)
    plans = [" ".join(str(step[-1]) for step in conn.execute(f"EXPLAIN QUERY PLAN {sql}")) for sql in seen]
    conn.close()
    assert len(plans) == 4  # totals (with the decisions), services, reasons, agents
    for plan in plans:
        used = {word for word in plan.split() if word.startswith("ledger_")}
        assert used == ({index} if index else set()), plan


def test_stats_without_a_filter_count_from_the_indexes_and_agree_with_the_general_count(db: Path) -> None:
    """Unfiltered stats count services and agents from their covering indexes and denied rows from the partial
    index, never sorting every row; on a varied ledger they must give exactly what the filtered path does."""
    async def main() -> None:
        writer = await started(db)
        for i in range(300):
            denied = i % 7 == 0
            await writer.append(entry(i, agent=("claude", "cursor", "", "ci")[i % 4],
                                      service=("github", "openai", "", "slack", "x")[i % 5],
                                      decision="denied" if denied else "allowed", status=403 if denied else 200,
                                      reason=("not_granted" if denied else ("dry_run" if i % 11 == 0 else "")),
                                      bytes_in=i, bytes_out=2 * i))
            if i % 50 == 0:
                await writer.append(LedgerEntry.system(f"event {i}", reason="policy_reloaded"))
        await writer.close()

    asyncio.run(main())
    # Rows the gate does not write but the schema allows: a request with no decision, system rows naming an
    # agent and a service (one of them denied), and one service whose every row is a system event.
    insert = ("INSERT INTO ledger (kind, time_ms, request_id, agent, credential, service, method, path, "
              "target_host, decision, reason, status, duration_ms, bytes_in, bytes_out, flags, detail) "
              "VALUES (?, ?, 'r', ?, '', ?, '', '', '', ?, '', 0, 0, 5, 6, '', '')")
    for kind, agent, service, decision in (("request", "claude", "github", ""), ("system", "cursor", "openai", ""),
                                           ("system", "ci", "github", "denied"), ("system", "ci", "only-system", ""),
                                           ("system", "", "", "allowed")):
        sql(db, insert, (kind, T0 - 1, agent, service, decision))
    conn = sqlite3.connect(db)
    for top in (1, 2, 10):
        assert _unfiltered_stats(conn, top) == _stats(conn, [], [], top)
    stats = ledger_stats(db)
    assert stats == _stats(conn, [], [], 10) and stats.system_events == 10 and stats.first_time_ms == T0 - 1
    assert "only-system" not in [g.key for g in stats.by_service]
    assert ("", 1, 0) in [(g.key, g.count, g.denied) for g in stats.by_decision]
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    _unfiltered_stats(conn, 10)
    conn.set_trace_callback(None)
    plans = " | ".join(" ".join(str(step[-1]) for step in conn.execute(f"EXPLAIN QUERY PLAN {statement}"))
                       for statement in seen)
    conn.close()
    assert "COVERING INDEX ledger_service" in plans and "COVERING INDEX ledger_agent" in plans, plans
    assert "USING INDEX ledger_denied" in plans, plans


@pytest.mark.parametrize("original", ["CREATE INDEX ledger_agent ON ledger (agent, id)",
                                      "CREATE INDEX ledger_service ON ledger (service, id)",
                                      "CREATE INDEX ledger_denied ON ledger (id) WHERE decision = 'denied'"])
def test_unfiltered_stats_do_not_believe_an_index_that_lacks_rows(
        db: Path, original: str, caplog: pytest.LogCaptureFixture) -> None:
    """An index rebuilt without some rows (its CREATE INDEX text put back, docs/SECURITY.md) hides them from
    reads through it; unfiltered stats check the indexes' counts against the table and count from the table."""
    async def main() -> None:
        writer = await started(db)
        for i in range(12):
            evil = i % 4 == 0
            await writer.append(entry(i, agent="evil" if evil else "good", service="exfil" if evil else "openai",
                                      decision="denied" if i % 3 == 0 else "allowed"))
        await writer.close()

    asyncio.run(main())
    honest = ledger_stats(db)
    name = original.split()[2]
    hiding = original + (" AND" if " WHERE " in original else " WHERE") + " agent != 'evil'"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute(f"DROP INDEX {name}")
    conn.execute(hiding)
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute("UPDATE sqlite_master SET sql = ? WHERE name = ?", (original, name))
    conn.execute("PRAGMA writable_schema = OFF")
    conn.close()
    caplog.set_level(logging.WARNING, logger="aegisd.ledger.stats")
    assert ledger_stats(db) == honest
    assert [g.key for g in honest.top_agents] == ["good", "evil"] and "exfil" in [g.key for g in honest.by_service]
    assert "indexes disagree with its table" in caplog.text


def test_a_time_range_holding_every_row_is_counted_as_no_filter(db: Path) -> None:
    """`ledger stats --since 30d` on a younger ledger matches every row: counted from the indexes, as without a
    filter (the general path reads every row through the time index: 5 s on a million), with the same result.
    A range that leaves a row out, or a range beside another filter, takes the general path."""
    async def main() -> None:
        writer = await started(db)
        for i in range(30):
            await writer.append(entry(i, agent=("claude", "cursor")[i % 2], decision=("allowed", "denied")[i % 5 == 0]))
        await writer.close()

    asyncio.run(main())
    everything = ledger_stats(db)
    seen: list[str] = []
    real_open = schema_module.open_reader

    def traced(path: Any) -> sqlite3.Connection:
        conn = real_open(path)
        conn.set_trace_callback(seen.append)
        return conn

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stats_module, "open_reader", traced)
        assert ledger_stats(db, since_ms=T0 - 1, until_ms=T0 + 30) == everything
        assert any("GROUP BY service" in sql for sql in seen) and not any("GROUP BY +service" in sql for sql in seen)
        seen.clear()
        later = ledger_stats(db, since_ms=T0 + 10)
        assert later.rows == 20 and any("GROUP BY +service" in sql for sql in seen)
        assert ledger_stats(db, since_ms=T0, until_ms=T0 + 29).rows == 29
        assert ledger_stats(db, since_ms=T0, agent="claude").rows == 15


def test_a_time_index_that_lacks_rows_does_not_widen_a_time_range(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Found by a review: the every-row shortcut read the first and last times from the time index; rebuilt
    without the oldest row, it let `--since` count that row. The table's own first and last times must agree."""
    async def main() -> None:
        writer = await started(db)
        for i in range(10):
            await writer.append(entry(i))
        await writer.close()

    asyncio.run(main())
    original = "CREATE INDEX ledger_time ON ledger (time_ms)"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("DROP INDEX ledger_time")
    conn.execute(f"{original} WHERE time_ms > {T0}")
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute("UPDATE sqlite_master SET sql = ? WHERE name = 'ledger_time'", (original,))
    conn.execute("PRAGMA writable_schema = OFF")
    conn.close()
    caplog.set_level(logging.WARNING, logger="aegisd.ledger.stats")
    later = ledger_stats(db, since_ms=T0 + 1)
    assert later.rows == 9 and later.first_time_ms == T0 + 1
    assert "time index disagrees with its table" in caplog.text


def test_a_replace_whose_rename_is_not_made_durable_says_the_file_moved_and_drops_the_key(
        tmp_path: Path, db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a cold review: when the rename succeeded but the directory's fsync failed, the caller heard
    "cannot move the restored ledger into place" (so the restore said nothing was restored) and the writer
    kept the old vault's chain key for the new file. The move is now told apart from what follows it."""
    other = tmp_path / "other.db"
    fill(other, 3)
    staged = tmp_path / "staged.db"
    shutil.copy(other, staged)

    def fsync_fails(directory: Path) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    async def main() -> None:
        writer = await started(db)
        await writer.append(entry(0))
        monkeypatch.setattr(writer_module, "fsync_directory", fsync_fails)
        with pytest.raises(ReplaceIncomplete, match="^the restored ledger was moved into place, but making the "
                           r"move durable \(fsync of the data directory\) failed: Input/output error$"):
            await writer.replace_file(staged)
        assert writer.key is None and not writer.failing and not staged.exists()
        assert await writer.append(entry(99)) == 4  # into the restored file, not chained with the old key
        assert sql(db, "SELECT mac FROM ledger WHERE id = 4") == [(None,)]
        writer.set_key(KEY)  # the restored vault's key, at its unlock
        await writer.close()

    asyncio.run(main())
    assert [r.request_id for r in query_rows(db, newest_first=False)] == ["r0", "r1", "r2", "r99"]
    assert verify(db, KEY).ok


def test_a_replace_whose_old_wal_cannot_be_removed_moves_nothing_and_keeps_the_old_file(
        tmp_path: Path, db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite would apply the old file's write-ahead log to the new file, so it is removed before the move: while
    it cannot be, nothing moves (the restore says nothing was restored), and the old file goes on with its key."""
    other = tmp_path / "other.db"
    fill(other, 3)
    staged = tmp_path / "staged.db"
    shutil.copy(other, staged)
    real_unlink = os.unlink
    stuck = [True]

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if stuck[0] and str(path) == f"{db}-wal":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        real_unlink(path, *args, **kwargs)

    async def main() -> None:
        writer = await started(db)
        await writer.append(entry(0))
        monkeypatch.setattr(os, "unlink", unlink)
        with pytest.raises(LedgerError, match=r"^the ledger's write-ahead log cannot be removed \(Permission denied\), "
                           "so the restored ledger was not moved into place") as refused:
            await writer.replace_file(staged)
        assert not isinstance(refused.value, ReplaceIncomplete)
        assert writer.key == KEY and not writer.failing and staged.exists() and writer.restores == 0
        assert await writer.append(entry(1)) == 2  # into the old file, chained with its key
        stuck[0] = False
        await writer.replace_file(staged)
        writer.set_key(KEY)
        await writer.append(entry(9))
        await writer.close()

    asyncio.run(main())
    assert [r.request_id for r in query_rows(db, newest_first=False)] == ["r0", "r1", "r2", "r9"]
    assert verify(db, KEY).ok


def test_a_replace_while_a_reader_holds_the_log_moves_nothing_and_never_leaves_the_old_log_beside_the_new_file(
        tmp_path: Path, db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a review: a reader in a transaction (aegisd's own `ledger verify`, `stats`, `export`) kept the
    checkpoint before the swap from emptying the log, which went unnoticed; the file was moved in and only then
    were the old -wal and -shm removed. A crash between the two left the restored ledger.db beside the old file's
    log, which SQLite applies at the next open: a damaged file, or rows written after the backup back in it.

    Each rename is followed at once by a copy of the data directory: what a SIGKILL right after it would leave.
    That copy must be the restored ledger alone. With the reader there, the swap is refused instead (nothing
    moved, the old file whole and written on); once it is gone, the retry goes through."""
    other = tmp_path / "other.db"
    fill(other, 3)
    staged = tmp_path / "staged.db"
    shutil.copy(other, staged)
    real_replace = os.replace
    crashes: list[Path] = []

    def replace_then_crash(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        if Path(dst) == db:
            crashed = tmp_path / f"crash{len(crashes)}"
            crashed.mkdir()
            for suffix in ("", "-wal", "-shm"):
                if Path(f"{db}{suffix}").exists():
                    shutil.copy(f"{db}{suffix}", crashed / f"{db.name}{suffix}")
            crashes.append(crashed / db.name)

    def assert_only_the_restored_ledger(path: Path) -> None:
        assert sql(path, "PRAGMA integrity_check") == [("ok",)]
        assert [r.request_id for r in query_rows(path, newest_first=False)] == ["r0", "r1", "r2"]

    async def main() -> None:
        writer = LedgerWriter(db, busy_timeout_s=0.2)  # how long the swap waits for the reader
        await writer.start()
        writer.set_key(KEY)
        for i in range(10, 15):
            await writer.append(entry(i))
        reader = sqlite3.connect(db)
        try:
            reader.execute("BEGIN")
            assert reader.execute("SELECT count(*) FROM ledger").fetchone() == (5,)
            for i in range(15, 20):  # frames the reader keeps in the log: past its snapshot
                await writer.append(entry(i))
            monkeypatch.setattr(os, "replace", replace_then_crash)
            try:
                await writer.replace_file(staged)
            except LedgerError as exc:
                refused: LedgerError | None = exc
            else:
                refused = None
            for crashed in crashes:
                assert_only_the_restored_ledger(crashed)
            assert refused is not None and not isinstance(refused, ReplaceIncomplete), "the swap was not refused"
            assert str(refused) == (f"{db} is being read (`aegisctl ledger verify`, `stats` or `export`, or another "
                                    "process) and still was after 0.2 s, so its write-ahead log cannot be folded in; "
                                    "run the restore again once that is done")
            assert crashes == [] and staged.exists() and writer.restores == 0
            assert writer.key == KEY and not writer.failing
            assert await writer.append(entry(20)) == 11  # the old file, written on with its key
        finally:
            reader.close()
        await writer.replace_file(staged)  # the reader is gone: the retry goes through
        assert len(crashes) == 1
        assert_only_the_restored_ledger(crashes[0])
        writer.set_key(KEY)
        assert await writer.append(entry(99)) == 4
        await writer.close()

    asyncio.run(main())
    assert [r.request_id for r in query_rows(db, newest_first=False)] == ["r0", "r1", "r2", "r99"]
    assert verify(db, KEY).ok


@pytest.mark.parametrize("before", [-(10**18), 10**18, -5, 0, 253402300800000])
def test_prune_refuses_a_time_it_cannot_show_as_a_usage_error(before: int, tmp_path: Path) -> None:
    """Found by a cold review: `ledger prune --before 999999999w` crashed aegisctl with a traceback while it
    formatted the time for its question. TimeSpec may refuse such times itself; prune must not depend on it:
    whatever time reaches it (here given as epoch milliseconds, as TimeSpec passes them on), a time before 1970
    or past year 9999 is a usage error, before any question or call."""
    result = CliRunner().invoke(root, ["ledger", "prune", "--yes"],
                                default_map={"ledger": {"prune": {"before": before}}},
                                env={"AEGIS_SOCKET": str(tmp_path / "none.sock")})
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Invalid value for '--before'" in result.output and "1970-01-01" in result.output
