"""The audit ledger: group commit, the HMAC chain and its verifier, queries, and refusing bad files."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import hashlib
import hmac
import json
import logging
import math
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Awaitable
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar

import pytest

import aegisd.ledger.writer as writer_module
from aegisd.ledger import (
    Dropped,
    LedgerEntry,
    LedgerError,
    LedgerRow,
    LedgerWriter,
    VerifyResult,
    query_rows,
    to_dict,
    verify,
)
from aegisd.ledger.chain import GENESIS, canonical, row_mac
from aegisd.ledger.entry import ENTRY_FIELDS, MAX_DETAIL_CHARS, MAX_TEXT_CHARS, entry_values, normalize
from aegisd.ledger.schema import SCHEMA_VERSION
from aegisd.ledger.writer import CHECKPOINT_ALWAYS, REPLACED
from tests.unit.event_loops import eventually

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


def sql(path: Path, query: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()


async def failing_writer(db: Path) -> LedgerWriter:
    """A started, keyed writer with one committed row, whose inserts fail from now on (until DROP TRIGGER fail)."""
    writer = LedgerWriter(db)
    await writer.start()
    writer.set_key(KEY)
    await writer.append(req(0))
    raw(db, "CREATE TRIGGER fail BEFORE INSERT ON ledger BEGIN SELECT RAISE(ABORT, 'simulated'); END")
    return writer


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


def test_commits_and_rows_are_counted(db: Path) -> None:
    """Rows appended in one event-loop turn share a commit; a failed commit, or one that only chains
    rows written before the key, counts nothing."""

    async def main() -> None:
        writer = LedgerWriter(db)
        await writer.start()
        await writer.append(req(0))
        assert (writer.commits, writer.rows_committed, writer.commit_failures) == (1, 1, 0)
        await asyncio.gather(*(writer.append(req(i)) for i in range(1, 41)))
        assert writer.rows_committed == 41 and 2 <= writer.commits < 10
        counts = (writer.commits, writer.rows_committed)
        writer.set_key(KEY)  # the commit that chains the 41 rows written without a key holds no new row
        await writer.run_exclusive(lambda conn, key: None)
        assert (writer.commits, writer.rows_committed) == counts
        pending = [asyncio.ensure_future(writer.append(req(i))) for i in range(100, 103)]
        await asyncio.sleep(0)  # the appends are queued; the job's commit of them comes first
        await writer.run_exclusive(lambda conn, key: None)
        await asyncio.gather(*pending)
        assert (writer.commits, writer.rows_committed) == (counts[0] + 1, 44)
        raw(db, "CREATE TRIGGER fail BEFORE INSERT ON ledger BEGIN SELECT RAISE(ABORT, 'simulated'); END")
        before = (writer.commits, writer.rows_committed)
        failed = await asyncio.gather(*(writer.append(req(i)) for i in range(41, 45)), return_exceptions=True)
        assert all(isinstance(r, LedgerError) for r in failed)
        assert (writer.commits, writer.rows_committed) == before
        assert writer.commit_failures >= 1 and writer.failing
        await writer.close()

    run(main())


def test_an_outage_is_retried_and_recorded(db: Path, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """Failed commits make the writer failing; it retries on its own with a row saying what is missing,
    and the first commit that succeeds ends the outage with that row first. One error line for the
    outage, not one per failed commit."""
    monkeypatch.setattr(writer_module, "RETRY_SECONDS", 0.05)
    caplog.set_level(logging.INFO, logger="aegisd.ledger")

    async def main() -> None:
        writer = await failing_writer(db)
        lost = await asyncio.gather(*(writer.append(req(i)) for i in range(1, 5)), return_exceptions=True)
        assert all(isinstance(r, LedgerError) for r in lost)
        failures, counts = writer.commit_failures, (writer.commits, writer.rows_committed)
        await eventually(lambda: writer.commit_failures >= failures + 2, "a retry", 10)  # no append prompts it
        assert writer.failing
        raw(db, "DROP TRIGGER fail")
        await eventually(lambda: not writer.failing, "recovery", 10)
        assert (writer.commits, writer.rows_committed) == (counts[0] + 1, counts[1] + 1)  # the outage's row alone
        assert await writer.append(req(5)) == 3
        await writer.close()

    run(main())
    rows = query_rows(db, newest_first=False)
    assert [(r.kind, r.request_id) for r in rows] == [("request", "req-0"), ("system", ""), ("request", "req-5")]
    assert rows[1].reason == "ledger_unavailable"
    assert re.fullmatch(r"the ledger could not be written for [0-9.]+ s: 4 rows from (1 failed commit|[2-4] failed "
                        r"commits) are missing", rows[1].detail), rows[1].detail
    assert verify(db, KEY).ok
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "the gate forwards nothing" in errors[0], errors
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"ledger writable again: {rows[1].detail} (recorded as row 2)"]


def test_an_outage_of_chaining_alone_is_logged_and_recorded(db: Path, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """The commit that chains rows written while locked holds no new row; its failure still opens an outage."""
    monkeypatch.setattr(writer_module, "RETRY_SECONDS", 0.05)

    async def main() -> None:
        writer = LedgerWriter(db)
        await writer.start()
        await writer.append(req(0))  # no key yet: stored unchained
        raw(db, "CREATE TRIGGER fail BEFORE UPDATE ON ledger BEGIN SELECT RAISE(ABORT, 'simulated'); END")
        writer.set_key(KEY)
        await eventually(lambda: writer.failing, "an outage", 10)
        raw(db, "DROP TRIGGER fail")
        await eventually(lambda: not writer.failing, "recovery", 10)
        await writer.close()

    run(main())
    assert any("chaining the rows written while locked failed" in r.getMessage() for r in caplog.records
               if r.levelno == logging.ERROR)
    rows = query_rows(db, newest_first=False)
    assert [(r.kind, r.reason) for r in rows] == [("request", ""), ("system", "ledger_unavailable")]
    assert rows[1].detail.endswith(": no rows are missing")
    assert verify(db, KEY).ok


def test_stopping_during_an_outage_tries_once_more(db: Path) -> None:
    """Fixing the disk and stopping before the next retry still puts the outage on record."""

    async def main() -> None:
        writer = await failing_writer(db)
        with pytest.raises(LedgerError):
            await writer.append(req(1))
        raw(db, "DROP TRIGGER fail")
        await writer.close()  # well within RETRY_SECONDS

    run(main())
    rows = query_rows(db, newest_first=False)
    assert [r.kind for r in rows] == ["request", "system"]
    assert "1 row from 1 failed commit is missing" in rows[1].detail


def test_failing_while_the_writer_is_not_running(db: Path) -> None:
    async def main() -> None:
        writer = LedgerWriter(db)
        states = [writer.failing]  # not started
        await writer.start()
        states.append(writer.failing)
        await writer.close()
        states.append(writer.failing)
        assert states == [True, False, True]

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
        assert verify(db, KEY).ok is False  # no key yet: the rows are not chained
        writer.set_key(KEY)  # they are chained from the values read back from the file
        await writer.close()

    run(main())
    rows = query_rows(db, newest_first=False)
    assert rows[0].duration_ms == 3.0 and type(rows[0].status) is int and rows[0].reason == "not_granted"
    assert rows[1].kind == "system" and rows[1].decision == "" and rows[1].detail == "policy reload: 3 files"
    assert verify(db, KEY).ok


STR_FIELDS = [f for f in ENTRY_FIELDS if f not in ("time_ms", "status", "duration_ms", "bytes_in", "bytes_out")]


def test_plain_entries_pass_normalize_unchanged() -> None:
    entry = req(1)
    assert normalize(entry) is entry
    assert normalize(LedgerEntry.system("started")).detail == "started"


@pytest.mark.parametrize("name", STR_FIELDS)
def test_every_text_field_is_coerced_to_plain_valid_text(name: str) -> None:
    """Whatever shortcut normalize takes for plain rows, it must not skip a field."""
    value = {"kind": "request", "decision": "denied"}.get(name, "x")
    value_enum = enum.StrEnum("value_enum", {"V": value})
    coerced = normalize(req(1, **{name: value_enum.V}))
    assert type(getattr(coerced, name)) is str and getattr(coerced, name) == value
    if name not in ("kind", "decision"):
        clean = getattr(normalize(req(1, **{name: "caf\xe9 \udcff"})), name)  # a lone surrogate cannot be stored
        assert clean.startswith("caf\xe9 ") and "\udcff" not in clean
        with pytest.raises(TypeError, match=name):
            normalize(req(1, **{name: 5}))


@pytest.mark.parametrize("name", ["time_ms", "status", "bytes_in", "bytes_out"])
def test_every_integer_field_is_checked_and_coerced(name: str) -> None:
    coerced = normalize(req(1, **{name: HTTPStatus.OK}))
    assert type(getattr(coerced, name)) is int and getattr(coerced, name) == 200
    for bad in (True, -1, 2**63, 1.0, "1"):
        with pytest.raises(ValueError, match=name):
            normalize(req(1, **{name: bad}))


def test_duration_time_range_and_path_are_checked() -> None:
    assert type(normalize(req(1, duration_ms=3)).duration_ms) is float
    for bad in (float("inf"), float("nan"), True, "1"):
        with pytest.raises(ValueError, match="duration_ms"):
            normalize(req(1, duration_ms=bad))
    with pytest.raises(ValueError, match="out of range"):
        normalize(req(1, time_ms=253402300799999 + 1))
    assert normalize(req(1, path="/a#frag")).path == "/a"
    assert normalize(req(1, path="/a?q=1#frag")).path == "/a"
    with pytest.raises(ValueError, match="kind"):
        normalize(req(1, kind="system ", decision=""))
    with pytest.raises(ValueError, match="decision"):
        normalize(req(1, decision="Allowed"))


EDGE_DURATIONS = (-0.0, 0.0, -5.0, 5.0, 1e300, -1e300, 2.0**63, -(2.0**63), 2.0**64, 5e-324, -1e-320,
                  1.7976931348623157e308, 0.1 + 0.2, 2**63, -3)


def test_every_finite_duration_stores_as_it_is_hashed(db: Path) -> None:
    """Found by a cold review: SQLite stores a whole-number REAL as an integer, so a duration of -0.0 read back
    as 0.0, and that row's MAC (over the JSON `-0.0`) and every later row's never verified again."""
    negative_zero = normalize(req(1, duration_ms=-0.0)).duration_ms
    assert negative_zero == 0.0 and math.copysign(1.0, negative_zero) == 1.0
    assert normalize(req(1, duration_ms=-5.0)).duration_ms == -5.0
    for bad in (10**400, -(10**400), float("-inf")):  # past the float range: refused as a value, not overflowed
        with pytest.raises(ValueError, match="duration_ms"):
            normalize(req(1, duration_ms=bad))
    run(write(db, [req(i, duration_ms=d) for i, d in enumerate(EDGE_DURATIONS)]))
    result = verify(db, KEY)
    assert result.ok and result.rows_checked == len(EDGE_DURATIONS), result
    read_back = [r.duration_ms for r in query_rows(db, newest_first=False)]
    assert read_back == [float(d) for d in EDGE_DURATIONS]
    assert [math.copysign(1.0, d) for d in read_back] == [-1.0 if d < 0 else 1.0 for d in EDGE_DURATIONS]


@pytest.mark.parametrize("name", [f for f in STR_FIELDS if f not in ("kind", "decision")])
def test_every_text_field_is_capped_with_a_visible_marker(name: str) -> None:
    """An agent chooses the path, service and host, and the gate takes 64 KiB heads: a field keeps its start,
    says how long it was, and never exceeds its cap, so normalizing twice stores and hashes the same text."""
    limit = MAX_DETAIL_CHARS if name == "detail" else MAX_TEXT_CHARS
    long = "é" + "x" * 60_000 + ("?token=1" if name == "path" else "")  # the query goes first
    entry = normalize(req(1, **{name: long}))
    value = getattr(entry, name)
    assert len(value) == limit and value.startswith("éxxx") and value.endswith("...[truncated: 60001 characters]")
    assert normalize(entry) is entry
    at_cap = normalize(req(1, **{name: "y" * limit}))
    assert getattr(at_cap, name) == "y" * limit


def test_the_cap_costs_nothing_for_ordinary_rows() -> None:
    """The fast path bounds every field with one length check on text it builds anyway."""
    plain = req(1, path="/" + "p" * 1000)
    assert normalize(plain) is plain
    both = req(1, path="/" + "p" * 1500, service="s" * 1500)  # each under the cap, together over it
    assert normalize(both) == both


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


def test_row_macs_are_pinned() -> None:
    """The chain format never changes silently: ledgers written by every earlier version must still verify."""
    gate_row = LedgerEntry(
        kind="request", time_ms=1_700_000_000_123, request_id="0123456789abcdef", agent="bot",
        credential="openai-prod", service="openai", method="POST", path="/v1/chat/completions",
        target_host="api.openai.com:443", decision="allowed", reason="", status=200, duration_ms=12.345,
        bytes_in=1024, bytes_out=65536, flags="response_redacted", detail="")  # fmt: skip
    odd_row = LedgerEntry.system("quote \" backslash \\ tab \t nl \n ctl \x01 \xe9 \u65e5\u672c \U0001f600 \u2028",
                                 reason="policy_reload")
    odd_row = dataclasses.replace(odd_row, time_ms=1_700_000_000_124, duration_ms=1e-7)
    assert canonical(1, entry_values(gate_row)) == (
        b'[1,"request",1700000000123,"0123456789abcdef","bot","openai-prod","openai","POST",'
        b'"/v1/chat/completions","api.openai.com:443","allowed","",200,12.345,1024,65536,"response_redacted",""]'
    )
    assert canonical(2, entry_values(odd_row)) == (
        b'[2,"system",1700000000124,"","","","","","","","","policy_reload",0,1e-07,0,0,"",'
        b'"quote \\" backslash \\\\ tab \\t nl \\n ctl \\u0001 \\u00e9 \\u65e5\\u672c \\ud83d\\ude00 \\u2028"]'
    )
    mac = row_mac(KEY)
    first = mac(GENESIS, 1, entry_values(gate_row))
    assert first.hex() == "d216998bcb9d10468d21fd82475c6bb1d625c8c283a4138a3aa498d8c7f8a629"
    assert mac(first, 2, entry_values(odd_row)).hex() == (
        "d1a14bd28cfdd65173c54038e83990fe94c58c38e5387a10dd6ec1afb3957583"
    )


@pytest.mark.parametrize("key_size", [16, 32, 63, 64, 65, 200])
def test_row_mac_is_hmac_sha256_of_prev_mac_and_canonical(key_size: int) -> None:
    key, prev = os.urandom(key_size), os.urandom(32)
    values = entry_values(req(3))
    expected = hmac.new(key, prev + canonical(9, values), hashlib.sha256).digest()
    assert row_mac(key)(prev, 9, values) == expected


def test_canonical_is_compact_ascii_json() -> None:
    """What verify may read from a tampered file encodes as JSON would, or fails as JSON would."""
    values = ["a\"\\\u2028\U0001f600", None, True, -0.0, 0.1, 2**70, -5, ""]
    assert canonical(7, values) == json.dumps([7, *values], separators=(",", ":")).encode("ascii")
    for bad in (b"blob", float("inf"), float("nan")):
        with pytest.raises((TypeError, ValueError)):
            canonical(1, [bad])


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


@pytest.mark.parametrize("seq", ["'9'", "x'39'", "9.5"])
def test_an_id_counter_that_is_not_an_integer_fails_verify(db: Path, seq: str) -> None:
    """Found by a cold review: an id counter edited to text made verify raise TypeError (the RPC answered INTERNAL,
    doctor said the check itself failed). It is a failure of the ledger, said as such."""
    run(write(db, [req(i) for i in range(9)]))
    raw(db, f"UPDATE sqlite_sequence SET seq = {seq} WHERE name = 'ledger'")  # noqa: S608 - test constants
    result = verify(db, KEY)
    kind = {"'9'": "str", "x'39'": "bytes", "9.5": "float"}[seq]
    assert not result.ok and result.rows_checked == 9 and result.first_bad_id is None, result
    assert result.reason == f"the ledger's id counter (sqlite_sequence) is not an integer ({kind}): it was edited"


def test_verify_reports_its_tip(db: Path) -> None:
    """The tip (the newest row that verified, and its MAC) is what a later verify compares with."""
    run(write(db, []))
    empty = verify(db, KEY)
    assert (empty.last_id, empty.last_mac) == (0, b"")
    run(write(db, [req(i) for i in range(3)]))
    first = verify(db, KEY)
    assert (first.last_id, first.last_mac) == (3, sql(db, "SELECT mac FROM ledger WHERE id = 3")[0][0])
    run(write(db, [req(3)]))
    assert verify(db, KEY).last_id == 4 and verify(db, KEY).last_mac != first.last_mac


def test_an_earlier_tip_catches_the_newest_rows_cut_with_the_counter_rewritten(db: Path) -> None:
    """Found by a cold review: the docs said such a cut is caught by comparing with an earlier verify, but verify
    gave nothing to compare. A ledger cut back to row 6 with SQLite's counter rewritten verifies on its own;
    the tip of an earlier verify does not fit it, neither at once nor once the writer has gone past it."""
    run(write(db, [req(i) for i in range(10)]))
    tip = verify(db, KEY)
    raw(db, "DELETE FROM ledger WHERE id > 6")
    raw(db, "UPDATE sqlite_sequence SET seq = 6 WHERE name = 'ledger'")
    assert verify(db, KEY).ok  # what no chain alone can tell
    gone = verify(db, KEY, expect=(tip.last_id, tip.last_mac))
    assert not gone.ok and gone.last_id == 6
    assert gone.reason == ("row 10, the tip of an earlier verify, is gone (the ledger ends at row 6): a backup taken "
                           "before that tip was restored (a restore adds a `backup_restored` row, and this ledger has "
                           "none), or rows were deleted from the end and SQLite's id counter rewritten to hide it, "
                           "unless that tip was mistyped"), gone
    run(write(db, [req(i, path="/v1/later") for i in range(10, 15)]))
    replaced = verify(db, KEY, expect=(tip.last_id, tip.last_mac))
    assert not replaced.ok and replaced.last_id == 11
    assert "row 10, the tip of an earlier verify, is not the row that verify saw (its MAC differs)" in replaced.reason
    row_6 = sql(db, "SELECT mac FROM ledger WHERE id = 6")[0][0]
    kept = verify(db, KEY, expect=(6, row_6))
    assert kept.ok and kept.reason == "11 rows verified; it holds row 6, the tip of an earlier verify, unchanged"


def test_a_tip_the_ledger_lacks_points_at_the_newest_restore_row(db: Path) -> None:
    """Found by a cold review: the message blamed only deleted rows and a rewritten counter, where a restore of an
    older backup, which the ledger records, looks the same."""
    run(write(db, [req(i) for i in range(3)]))
    run(write(db, [LedgerEntry.system("restored from a backup taken ...", reason="backup_restored")]))
    run(write(db, [req(3), req(4, reason="backup_restored"), req(5)]))  # a request's reason: not a restore
    tip = verify(db, KEY)
    raw(db, "DELETE FROM ledger WHERE id > 6")
    raw(db, "UPDATE sqlite_sequence SET seq = 6 WHERE name = 'ledger'")
    gone = verify(db, KEY, expect=(tip.last_id, tip.last_mac))
    assert not gone.ok and "(row 4, `backup_restored`, records the latest restore and when its backup was taken)" \
        in gone.reason, gone


def test_an_index_that_hides_rows_fails_verify(db: Path) -> None:
    """Found by a cold review: an index rebuilt without chosen rows, its CREATE INDEX text put back, hid them from
    every filtered read while verify (a walk of the table) called the ledger intact. SQLite's integrity check,
    run in verify's snapshot, compares every index with the table and names the rows an index lacks."""
    run(write(db, [req(i, agent="evil" if i in (2, 4) else "good") for i in range(6)]))
    conn = sqlite3.connect(db, isolation_level=None)
    conn.executescript("""
        DROP INDEX ledger_agent; CREATE INDEX ledger_agent ON ledger (agent, id) WHERE agent != 'evil';
        PRAGMA writable_schema = ON;
        UPDATE sqlite_master SET sql = 'CREATE INDEX ledger_agent ON ledger (agent, id)' WHERE name = 'ledger_agent';
        PRAGMA writable_schema = OFF;""")
    conn.close()
    assert query_rows(db, agent="evil") == []  # hidden
    result = verify(db, KEY)
    assert not result.ok and result.first_bad_id is None and result.rows_checked == 6 and result.last_id == 6
    assert result.reason.startswith("ledger.db fails SQLite's integrity check: index ledger_agent lacks rows 3, 5; "
                                    "filtered `ledger show`"), result.reason
    assert result.reason.endswith("(the chain itself verifies: 6 rows verified)"), result.reason
    assert verify(db, KEY, check_database=False).ok  # what the chain alone says
    raw(db, "UPDATE ledger SET status = 500 WHERE id = 2")  # both at once: the chain's failure first
    both = verify(db, KEY)
    assert both.first_bad_id == 2
    assert "; and ledger.db fails SQLite's integrity check: index ledger_agent" in both.reason


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
    assert not result.ok and result.first_bad_id == 6 and result.rows_checked == 5
    assert result.reason.startswith("row 6 is not chained (no MAC)") and "edited and the MAC removed" in result.reason
    assert "row 7 does not match its MAC" in result.reason  # it links to the MAC that was removed


def test_verify_goes_on_past_rows_without_a_mac(db: Path) -> None:
    """Rows without a MAC stay out of the chain for good, so verify must still check every row after them."""
    run(write(db, [req(i) for i in range(3)]))
    run(write(db, [req(i) for i in range(3, 5)], key=None))  # an earlier run, never unlocked
    run(write(db, [req(i) for i in range(5, 9)]))
    result = verify(db, KEY)
    assert (result.ok, result.first_bad_id, result.rows_checked) == (False, 4, 3)
    assert result.reason.startswith("rows 4..5 are not chained (no MAC): stored so by an earlier run of aegisd that "
                                    "stopped before its vault was unlocked, or edited"), result.reason
    assert result.reason.endswith("(the 4 chained rows after them verify)"), result.reason
    raw(db, "UPDATE ledger SET status = 500 WHERE id = 8")
    result = verify(db, KEY)
    assert (result.first_bad_id, result.rows_checked) == (4, 3)
    assert result.reason.endswith("; and row 8 does not match its MAC: it was edited or moved, a row before it was "
                                  "deleted, or the key is wrong"), result.reason


def test_verify_names_the_first_unchained_ranges_and_holds_no_more(db: Path) -> None:
    """Found by a cold review: verify kept every range of rows without a MAC, so a ledger stripped of every other
    MAC made its memory grow with its size (65 MB per million rows). It keeps the first few and counts the rest."""

    def peak_of_verify(rows: int) -> int:
        """Verify's peak memory on `rows` rows, every odd one without a MAC (the even ones chained past them)."""
        mac_of, prev_mac, stored = row_mac(KEY), GENESIS, []
        for i in range(1, rows + 1):
            values = entry_values(req(i))
            if i % 2 == 0:
                prev_mac = mac_of(prev_mac, i, values)
            stored.append((i, *values, prev_mac if i % 2 == 0 else None))
        conn = sqlite3.connect(db)
        with conn:
            conn.execute("DELETE FROM ledger")
            conn.executemany(f"INSERT INTO ledger (id, {', '.join(ENTRY_FIELDS)}, mac) VALUES "  # noqa: S608
                             f"({', '.join('?' * (len(ENTRY_FIELDS) + 2))})", stored)
        conn.close()
        peaks = []
        for _ in range(3):  # the least of three: tracemalloc counts every thread's allocations (xdist's included)
            tracemalloc.start()
            try:
                result = verify(db, KEY, check_database=False)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            peaks.append(peak)
        assert result.reason.startswith(f"rows 1, 3, 5 and {rows // 2 - 3} more ranges are not chained"), result
        assert result.first_bad_id == 1
        return min(peaks)

    run(write(db, []))
    small, large = peak_of_verify(200), peak_of_verify(20_200)  # 100 ranges, then 10,100
    assert large - small < 100_000, (small, large)  # about a million bytes when every range was kept


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
        assert not result.ok and result.first_bad_id == 1 and "rows 1..5 are not chained" in result.reason
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
    assert run(write(db, [req(i) for i in range(3, 5)])) == [4, 5]
    result = verify(db, KEY)
    assert result.ok and result.rows_checked == 5


def test_rows_an_earlier_run_stored_without_a_key_are_never_chained(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A run that stopped before its vault was unlocked left rows without a MAC. The next run cannot tell them
    from edited rows whose MACs were removed, so it never chains them: verify names them from then on, and the
    chain goes on past them."""
    run(write(db, [req(i) for i in range(3)]))
    run(write(db, [req(i) for i in range(3, 5)], key=None))  # restarted locked, never unlocked
    assert run(write(db, [req(5)])) == [6]  # unlocked on the next start
    assert sql(db, "SELECT id FROM ledger WHERE mac IS NULL") == [(4,), (5,)]
    result = verify(db, KEY)
    assert (result.ok, result.first_bad_id, result.rows_checked) == (False, 4, 3)
    assert "rows 4..5 are not chained" in result.reason and "(the 1 chained row after them verifies)" in result.reason
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["ledger: 2 rows after row 3 have no MAC and were not written by this aegisd: an earlier run "
                      "stored them before its vault was unlocked, or they were edited and their MACs removed. They "
                      "are never chained after the fact; `aegisctl ledger verify` reports them"]


def test_rows_stripped_of_their_mac_are_never_chained_again(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Found by a cold review: whoever could write ledger.db edited rows, removed their MACs, and the writer's
    next commit MACed them with the key, so verify passed. Now only rows this process stored without a key
    are chained after the fact; others are logged (once) and left for verify to report."""

    async def main() -> None:
        writer = LedgerWriter(db)
        await writer.start()
        writer.set_key(KEY)
        for i in range(5):
            await writer.append(req(i, agent="evil"))
        raw(db, "UPDATE ledger SET agent = 'innocent', mac = NULL WHERE id >= 3")  # while it runs
        for i in range(5, 8):  # each commit re-reads the file's tip: another connection wrote
            await writer.append(req(i))
            raw(db, "UPDATE ledger SET status = status WHERE id = 1")
        await writer.close()

    run(main())
    assert sql(db, "SELECT id FROM ledger WHERE mac IS NULL") == [(3,), (4,), (5,)]
    result = verify(db, KEY)
    assert (result.ok, result.first_bad_id, result.rows_checked) == (False, 3, 2)
    assert "rows 3..5 are not chained" in result.reason and "(the 3 chained rows after them verify)" in result.reason
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["ledger: 3 rows after row 2 have no MAC and were not written by this aegisd: an earlier run "
                      "stored them before its vault was unlocked, or they were edited and their MACs removed. They "
                      "are never chained after the fact; `aegisctl ledger verify` reports them"]

    # Stopped, every MAC removed, a row deleted and the rest renumbered: the next start chains none of it.
    raw(db, "DELETE FROM ledger WHERE id = 2")
    raw(db, "UPDATE ledger SET id = id - 1 WHERE id > 2")
    raw(db, "UPDATE ledger SET mac = NULL")
    raw(db, "UPDATE sqlite_sequence SET seq = 7 WHERE name = 'ledger'")
    assert run(write(db, [req(9)])) == [8]
    result = verify(db, KEY)
    assert (result.ok, result.first_bad_id) == (False, 1) and "rows 1..7 are not chained" in result.reason


def test_rows_edited_before_the_key_comes_are_not_chained(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    """This process's own rows written while locked are chained at unlock only if they are still as it wrote
    them: a keyed hash under a key that never leaves memory vouches for them meanwhile."""

    async def main() -> None:
        writer = LedgerWriter(db)
        await writer.start()
        for i in range(4):
            await writer.append(req(i, agent="evil"))
        raw(db, "UPDATE ledger SET agent = 'innocent' WHERE id = 2")
        writer.set_key(KEY)
        assert await writer.append(req(4)) == 5
        await writer.close()

    run(main())
    assert sql(db, "SELECT id FROM ledger WHERE mac IS NULL") == [(1,), (2,), (3,), (4,)]
    result = verify(db, KEY)
    assert (result.ok, result.first_bad_id) == (False, 1) and "rows 1..4 are not chained" in result.reason
    assert "(the 1 chained row after them verifies)" in result.reason
    assert any(r.levelno == logging.ERROR and r.getMessage().startswith(
        "ledger: rows 1..4, stored while the vault was locked, were changed in the file before it unlocked")
        for r in caplog.records)

    # A deleted row counts as a change too.
    db.unlink()

    async def deleted() -> None:
        writer = LedgerWriter(db)
        await writer.start()
        for i in range(3):
            await writer.append(req(i))
        raw(db, "DELETE FROM ledger WHERE id = 3")
        writer.set_key(KEY)
        await writer.close()

    run(deleted())
    assert sql(db, "SELECT id FROM ledger WHERE mac IS NULL") == [(1,), (2,)]


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
        assert await writer.append(req(6)) == 3  # the failed rows used no ids; the outage's row took 2
        await writer.close()

    run(main())
    assert verify(db, KEY).rows_checked == 3


def test_failing_insert_rejects_the_batch_then_recovers(db: Path) -> None:
    async def main() -> None:
        writer = await failing_writer(db)
        results = await asyncio.wait_for(
            asyncio.gather(*(writer.append(req(i)) for i in range(1, 50)), return_exceptions=True), 10
        )
        assert all(isinstance(r, LedgerError) and "simulated" in str(r) for r in results)
        writer.append_nowait(req(99))  # a fire-and-forget row fails too, but only in the log
        raw(db, "DROP TRIGGER fail")
        assert await writer.append(req(50)) in (3, 4)  # after the outage's row, and the nowait one if it won
        await writer.close()

    run(main())
    result = verify(db, KEY)
    assert result.ok and result.rows_checked in (3, 4)


def test_a_batch_refused_at_commit_leaves_no_trace_for_the_next(db: Path) -> None:
    """The inserts succeed and only COMMIT fails (a deferred constraint): the next batch must not build on them."""

    async def main() -> None:
        writer = LedgerWriter(db)
        await writer.start()
        writer.set_key(KEY)
        assert await writer.append(req(0)) == 1
        raw(db, "CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        raw(db, "CREATE TABLE child (parent_id INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)")
        raw(db, "CREATE TRIGGER poison AFTER INSERT ON ledger WHEN NEW.request_id = 'poison' "
            "BEGIN INSERT INTO child VALUES (NEW.id); END")
        await writer.append(req(1))  # the writer has seen the new schema; nobody else writes from here on
        batch = [writer.append(req(i)) for i in range(2, 6)] + [writer.append(req(6, request_id="poison"))]
        results = await asyncio.gather(*batch, return_exceptions=True)
        assert all(isinstance(r, LedgerError) and "FOREIGN KEY" in str(r) for r in results), results
        assert await writer.append(req(7)) == 4  # after the row recording the failed commit
        await writer.close()

    run(main())
    rows = query_rows(db, newest_first=False)
    assert [(r.kind, r.request_id) for r in rows] == [("request", "req-0"), ("request", "req-1"), ("system", ""),
                                                      ("request", "req-7")]
    assert "5 rows from 1 failed commit are missing" in rows[2].detail
    assert verify(db, KEY).rows_checked == 4


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


def test_batches_of_every_size_get_gapless_ids_and_chain(db: Path) -> None:
    sizes = [1, 2, 15, 16, 17, 31, 32, 33, 50, 1]

    async def main() -> list[list[int]]:
        writer = LedgerWriter(db)
        await writer.start()
        writer.set_key(KEY)
        batches, start = [], 0
        for size in sizes:  # appended in one loop iteration, so each is one group commit
            batches.append(await asyncio.gather(*(writer.append(req(start + i)) for i in range(size))))
            start += size
        await writer.close()
        return batches

    batches = run(main())
    assert [i for batch in batches for i in batch] == list(range(1, sum(sizes) + 1))
    rows = query_rows(db, newest_first=False, limit=1000)
    assert [r.request_id for r in rows] == [f"req-{i}" for i in range(sum(sizes))]
    assert verify(db, KEY).rows_checked == sum(sizes)


def test_rows_another_connection_commits_meanwhile_are_not_overwritten(db: Path) -> None:
    """The writer carries the chain's tip from commit to commit, but notices when anyone else has written."""

    async def main() -> None:
        writer = LedgerWriter(db)
        await writer.start()
        assert await writer.append(req(0)) == 1  # no key yet: stored unchained
        raw(db, "INSERT INTO ledger SELECT 2, kind, time_ms, 'other', agent, credential, service, method, path, "
            "target_host, decision, reason, status, duration_ms, bytes_in, bytes_out, flags, detail, NULL "
            "FROM ledger WHERE id = 1")
        assert await writer.append(req(2)) == 3
        writer.set_key(KEY)
        assert await writer.append(req(3)) == 4  # chains its own rows 1 and 3 first, never row 2
        raw(db, "DELETE FROM ledger WHERE id = 4")
        assert await writer.append(req(4)) == 5  # never reuses an id
        await writer.close()

    run(main())
    rows = query_rows(db, newest_first=False)
    assert [(r.id, r.request_id) for r in rows] == [(1, "req-0"), (2, "other"), (3, "req-2"), (5, "req-4")]
    assert sql(db, "SELECT id FROM ledger WHERE mac IS NULL") == [(2,)]
    result = verify(db, KEY)
    assert not result.ok and result.first_bad_id == 2 and result.reason.startswith("row 2 is not chained")
    assert result.reason.endswith("; and rows 4..4 are missing"), result.reason


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
        assert [getattr(r, "id", None) for r in got] == ids and getattr(got[0], "request_id", "") == "req-0"
        assert slow.dropped == 3
        sub.close()
        assert [r async for r in sub] == []
        await writer.close()
        events = [r async for r in slow]  # the writer's close ends every subscription
        assert [getattr(e, "id", None) for e in events] == [1, 2, None]
        assert isinstance(events[2], Dropped) and events[2].rows == 3  # where they are missing, and how many

    run(main())


def test_a_subscription_marks_each_gap_where_it_is_and_counts_only_matching_rows(db: Path) -> None:
    """Found by a cold review: `ledger follow` lost rows without a word. The subscription now puts one marker
    where rows are missing, counting them (a marker it has handed out is never added to), and a filter
    applies before the buffer, so rows a follower does not want never crowd out those it does."""

    async def main() -> None:
        writer = LedgerWriter(db)
        await writer.start()
        sub = writer.subscribe(maxsize=2, match=lambda row: row.agent != "agent1")  # req(i) is agent{i % 3}

        async def take(n: int) -> list[str | int]:
            """The next n events: a row's request id, a gap's row count."""
            events = [await anext(sub) for _ in range(n)]
            return [e.rows if isinstance(e, Dropped) else getattr(e, "request_id", "?") for e in events]

        await asyncio.gather(*(writer.append(req(i)) for i in range(9)))  # 6 match: 0, 2, 3, 5, 6, 8
        assert await take(3) == ["req-0", "req-2", 4]  # the gap after the rows that fit, and its size
        for i in (9, 10, 11, 12, 15):  # 10 does not match; 12 and 15 find no room: one gap of 2
            await writer.append(req(i))
        assert await take(3) == ["req-9", "req-11", 2]
        await writer.append(req(18))  # room again; the marker already handed out is not added to
        assert await take(1) == ["req-18"]
        assert sub.dropped == 6
        await writer.close()

    run(main())


def test_a_subscription_is_told_when_the_file_is_replaced(tmp_path: Path, db: Path) -> None:
    """After a restore the ids start again lower: a follower must know, or it hides the new rows."""
    staged = tmp_path / "staged.db"
    run(write(staged, [req(0)]))

    async def main() -> None:
        writer = LedgerWriter(db)
        await writer.start()
        sub = writer.subscribe()
        for i in range(5):
            await writer.append(req(i))
        await writer.replace_file(staged)
        await writer.append(req(99))
        events = [await anext(sub) for _ in range(7)]
        assert [getattr(e, "id", e) for e in events] == [1, 2, 3, 4, 5, REPLACED, 2]
        await writer.close()

    run(main())


def test_writer_can_be_iterated_by_a_follower_task(db: Path) -> None:
    async def main() -> None:
        writer = LedgerWriter(db)
        await writer.start()
        seen: list[int] = []

        async def follow() -> None:
            with writer.subscribe() as sub:
                async for row in sub:
                    assert isinstance(row, LedgerRow)  # nothing dropped, nothing replaced
                    seen.append(row.id)

        task = asyncio.create_task(follow())
        await asyncio.sleep(0)
        await asyncio.gather(*(writer.append(req(i)) for i in range(50)))
        await writer.close()
        await asyncio.wait_for(task, 5)
        assert seen == list(range(1, 51))

    run(main())


def test_the_writer_checkpoints_between_commits_so_the_wal_stays_small(db: Path) -> None:
    """SQLite's automatic checkpoint is off (it would run inside a COMMIT and hold back that batch's answers);
    the writer's own keeps the WAL from growing with every commit."""
    commits = 8 * CHECKPOINT_ALWAYS

    async def main() -> tuple[int, int]:
        writer = LedgerWriter(db)
        await writer.start()
        writer.set_key(KEY)
        for i in range(commits):  # one row per commit: each adds several WAL frames
            await writer.append(req(i))
        size = db.with_name(db.name + "-wal").stat().st_size
        setting = await writer.run_exclusive(lambda conn, _: conn.execute("PRAGMA wal_autocheckpoint").fetchone())
        await writer.close()
        return size, int(setting[0])

    wal_bytes, autocheckpoint = run(main())
    assert autocheckpoint == 0
    frame = 4096 + 24
    # Each commit adds at least three frames (the table and two of its indexes): without checkpoints the WAL
    # would hold all of them; with them, at most those of CHECKPOINT_ALWAYS commits (a dozen frames or fewer
    # each), however the threads are scheduled.
    assert wal_bytes < CHECKPOINT_ALWAYS * 12 * frame < commits * 3 * frame
    assert run(chain_now(db)).ok


def test_verify_refuses_to_judge_while_rows_written_before_the_key_cannot_be_chained(db: Path) -> None:
    """Found by a review: rows this writer stored before it had the key, whose chaining at the unlock failed
    (the ledger busy or full), were reported as rows the running aegisd had chained and someone stripped since:
    TAMPERED, though nobody edited anything. verify says the ledger cannot be written, and judges once it can."""

    async def main() -> None:
        writer = LedgerWriter(db)
        await writer.start()
        await writer.append(req(0))  # no key yet: stored without a MAC, to be chained by this writer
        raw(db, "CREATE TRIGGER fail BEFORE UPDATE ON ledger BEGIN SELECT RAISE(ABORT, 'simulated'); END")
        writer.set_key(KEY)
        await writer.settle()
        with pytest.raises(LedgerError, match="cannot be chained yet: the ledger's commits are failing"):
            await writer.verify_file(KEY)
        raw(db, "DROP TRIGGER fail")
        await writer.append(req(1))  # the next commit chains them
        result, tampered = await writer.verify_file(KEY)
        assert result.ok and tampered is None, result
        await writer.close()

    run(main())


def test_verify_still_names_an_edited_row_while_rows_written_before_the_key_wait(db: Path) -> None:
    """From the review of the case above: when the commits fail for good because a chained row was edited, the
    refusal to judge hid the edit for ever. verify names it; only when the pending rows are all that is wrong does
    it refuse."""

    async def main() -> None:
        writer = LedgerWriter(db)
        await writer.start()
        writer.set_key(KEY)
        for i in range(3):
            await writer.append(req(i))
        await writer.close()
        writer = LedgerWriter(db)  # the next run, still locked
        await writer.start()
        await writer.append(req(9))  # stored without a MAC: this run's to chain at the unlock
        raw(db, "UPDATE ledger SET mac = x'00' WHERE id = 3")  # someone edits the newest chained row
        writer.set_key(KEY)
        await writer.settle()  # the chaining fails, and will every time
        result, _ = await writer.verify_file(KEY)
        assert not result.ok and not result.unchained_only and result.first_bad_id == 3, result
        await writer.close()

    run(main())
