"""Text in ledger.db that is not UTF-8 (aegisd stores only UTF-8: the file was written behind its back).

Found by a cold review: one such byte made `verify` raise "cannot read ledger" instead of naming the row, and
`query_rows` fail for every page holding it (`ledger show`, `export`, `follow -n`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from aegisd.ledger import LedgerEntry, LedgerError, LedgerWriter, open_reader, query_rows, verify
from tests.unit.test_ledger import raw

KEY = bytes(range(32))


async def _write(db: Path, entries: list[LedgerEntry]) -> None:
    writer = LedgerWriter(db)
    await writer.start()
    writer.set_key(KEY)
    for entry in entries:
        await writer.append(entry)
    await writer.close()


def write(db: Path, entries: list[LedgerEntry]) -> None:
    asyncio.run(_write(db, entries))


def req(i: int) -> LedgerEntry:
    return LedgerEntry(kind="request", time_ms=1_700_000_000_000 + i, request_id=f"r{i}", agent="claude",
                       credential="github", service="github", method="GET", path=f"/v1/{i}", decision="allowed",
                       status=200)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"
    write(path, [req(i) for i in range(6)])
    assert verify(path, KEY).ok
    return path


@pytest.mark.parametrize("column", ["detail", "agent", "path", "mac"])
def test_verify_names_the_row(db: Path, column: str) -> None:
    raw(db, f"UPDATE ledger SET {column} = CAST(x'ff41' AS TEXT) WHERE id = 3")  # noqa: S608 - a constant
    result = verify(db, KEY)
    assert not result.ok and result.first_bad_id == 3 and result.rows_checked == 2, result
    assert result.reason.startswith("row 3 does not match its MAC"), result
    assert (result.last_id, result.first_id) == (2, 1)


def test_the_surrogates_of_bytes_never_match_the_text_they_were_made_from(db: Path) -> None:
    """Bytes that are the UTF-8 of a lone surrogate (which Python's decoder refuses) are read as three escaped
    bytes, not as that surrogate: neither is text aegisd could have stored."""
    raw(db, "UPDATE ledger SET detail = CAST(x'eda080' AS TEXT) WHERE id = 4")
    result = verify(db, KEY)
    assert not result.ok and result.first_bad_id == 4, result


def test_an_unchained_row_with_such_bytes_is_reported_as_unchained(db: Path) -> None:
    raw(db, "UPDATE ledger SET detail = CAST(x'ff' AS TEXT), mac = NULL WHERE id = 6")
    result = verify(db, KEY)
    assert not result.ok and result.first_bad_id == 6 and result.rows_checked == 5, result
    assert result.reason.startswith("row 6 is not chained (no MAC)"), result


def test_queries_show_the_row_with_replacement_characters(db: Path) -> None:
    raw(db, "UPDATE ledger SET detail = CAST(x'ff41' AS TEXT), agent = CAST(x'c3' AS TEXT) WHERE id = 3")
    rows = query_rows(db, limit=10)
    assert [r.id for r in rows] == [6, 5, 4, 3, 2, 1]
    assert (rows[3].detail, rows[3].agent) == ("\ufffdA", "\ufffd")
    assert [r.id for r in query_rows(db, limit=2, after_id=4)] == [3, 2]  # a page holding it
    assert [r.id for r in query_rows(db, limit=10, newest_first=False)] == [1, 2, 3, 4, 5, 6]
    conn = open_reader(db)  # a caller's connection keeps its own text_factory
    try:
        assert len(query_rows(conn, limit=10)) == 6
        assert conn.text_factory is str
    finally:
        conn.close()


def test_other_errors_are_still_errors(db: Path) -> None:
    conn = open_reader(db)
    conn.close()
    with pytest.raises(LedgerError, match="cannot read the ledger"):
        query_rows(conn, limit=1)


def test_rows_stored_while_locked_and_then_edited_so_are_left_unchained_and_the_writer_goes_on(tmp_path: Path) -> None:
    """Found by a review of the fix above: such a byte in a row the writer stored without a key made chaining it at
    the unlock raise, and the gate forwarded nothing until a restart."""
    db = tmp_path / "ledger.db"

    async def main() -> tuple[bool, int]:
        writer = LedgerWriter(db)
        await writer.start()
        for i in range(3):
            await writer.append(req(i))
        raw(db, "UPDATE ledger SET detail = CAST(x'ff' AS TEXT) WHERE id = 2")
        writer.set_key(KEY)
        row_id = await writer.append(req(3))
        failing = writer.failing
        await writer.close()
        return failing, row_id

    failing, row_id = asyncio.run(main())
    assert not failing and row_id == 4
    result = verify(db, KEY)
    assert not result.ok and result.first_bad_id == 1 and "not chained" in result.reason, result


def test_prune_refuses_such_a_row_with_a_reason(db: Path) -> None:
    from aegisd.ledger.prune import PruneRefused, prune

    raw(db, "UPDATE ledger SET detail = CAST(x'ff' AS TEXT) WHERE id = 2")

    async def main() -> None:
        writer = LedgerWriter(db)
        await writer.start()
        writer.set_key(KEY)
        try:
            await prune(writer, 1_800_000_000_000)
        finally:
            await writer.close()

    with pytest.raises(PruneRefused, match="not UTF-8"):
        asyncio.run(main())
    assert [row.id for row in query_rows(db, limit=10)] == [6, 5, 4, 3, 2, 1]  # nothing deleted (newest first)


@pytest.mark.parametrize("service", [None, "github"])
def test_stats_count_such_a_row_under_its_text_as_show_prints_it(db: Path, service: str | None) -> None:
    """Found by a review: stats grouped by a column holding such a byte failed with "cannot read the ledger"."""
    from aegisd.ledger import ledger_stats

    raw(db, "UPDATE ledger SET agent = CAST(x'ff41' AS TEXT) WHERE id = 3")
    counted = ledger_stats(db, service=service)
    assert counted.rows == 6 and {(g.key, g.count) for g in counted.top_agents} == {("claude", 5), ("\ufffdA", 1)}
