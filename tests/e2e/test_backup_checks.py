"""What a backup checks before it is written, what a crash in the middle of one leaves, and what a restore records.

Real daemons and real aegisctl; the gRPC API is called directly only to hold a backup open while aegisd is killed.
"""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from aegisd.api.aegis.v1 import backup_pb2, backup_pb2_grpc
from aegisd.ledger.entry import iso_time
from tests.e2e.gate_support import GateWorld
from tests.e2e.ledger_fill import fill
from tests.e2e.support import assert_failed, tmpfs
from tests.e2e.test_backup_restore import backed_up, make_tar, members, with_manifest_for
from tests.harness import PASSPHRASE, Aegis, new_aegis

SECRET = "ghp_backupChecksSecret0123456789abcdefXYZ"


@pytest.fixture
def aegis() -> Iterator[Aegis]:
    aegis = new_aegis()
    yield aegis
    aegis.cleanup()


def _with_filled_ledger(aegis: Aegis, rows: int) -> Path:
    """A daemon whose ledger holds `rows` rows from before it first started, with a vault and one credential."""
    aegis.data_dir.mkdir(mode=0o700, parents=True)
    ledger = aegis.data_dir / "ledger.db"
    fill(ledger, rows)
    aegis.start()
    aegis.init()
    aegis.add_credential("gh", SECRET, "--service", "gh", "--domains", "api.github.com")
    return ledger


def _assert_refused_and_nothing_written(aegis: Aegis, backup: Path, *needles: str) -> None:
    """The backup exits 1 naming the damage, and leaves no file, no partial file and no scratch copy behind."""
    result = aegis.ctl("backup", str(backup))
    assert_failed(result, "ledger.db is damaged", "no backup was written", "see `aegisctl doctor`", *needles)
    assert not backup.exists()
    assert [p.name for p in backup.parent.iterdir() if p.name.startswith(f".{backup.name}")] == []
    assert list(aegis.data_dir.glob(".backup-*")) == []
    assert "backup refused" in aegis.log()
    assert json.loads(aegis.ctl_in_process("status", "--json").ok().out)["state"] == "locked"  # still serving
    aegis.assert_no_leaks([SECRET, PASSPHRASE])


def test_a_backup_of_a_ledger_with_damaged_pages_is_refused_and_writes_nothing(aegis: Aegis) -> None:
    """Found by a cold review: a backup taken while ledger.db had damaged pages reported success, and every restore
    of it was refused (the vault in it included), found only when the backup was needed. The snapshot's copies now
    go through a restore's checks before anything is sent, and the backup fails pointing at doctor."""
    ledger = _with_filled_ledger(aegis, 30_000)
    assert aegis.stop() == 0
    data = bytearray(ledger.read_bytes())
    page, pages = 4096, len(data) // 4096
    noise = random.Random(7)
    for number in range(pages // 2, pages // 2 + 3):  # three pages in the middle of the table
        data[number * page:(number + 1) * page] = noise.randbytes(page)
    ledger.write_bytes(bytes(data))
    aegis.start()

    _assert_refused_and_nothing_written(aegis, aegis.root / "nightly.backup")
    doctor = aegis.ctl_in_process("doctor")
    assert "[FAIL] database" in doctor.out, doctor.out  # where the error points: it names the same damage


def test_a_backup_of_a_ledger_whose_index_hides_rows_is_refused(aegis: Aegis) -> None:
    """Damage that every read of the copy misses: an index rebuilt without some rows (its CREATE INDEX text put
    back). The copy, made page by page, carries it, and a restore's full integrity check refuses it; so does the
    backup now, naming the index and the rows."""
    ledger = _with_filled_ledger(aegis, 50)
    assert aegis.stop() == 0
    conn = sqlite3.connect(ledger, isolation_level=None)
    conn.executescript("""
        DROP INDEX ledger_agent; CREATE INDEX ledger_agent ON ledger (agent, id) WHERE id NOT IN (7, 8);
        PRAGMA writable_schema = ON;
        UPDATE sqlite_master SET sql = 'CREATE INDEX ledger_agent ON ledger (agent, id)' WHERE name = 'ledger_agent';
        PRAGMA writable_schema = OFF;""")
    conn.close()
    aegis.start()

    _assert_refused_and_nothing_written(aegis, aegis.root / "nightly.backup", "index ledger_agent lacks rows 7..8")


def test_a_backup_that_would_take_the_live_ledger_s_room_is_refused_before_it_writes() -> None:
    """Found by a cold review at the 27th stop: a backup staged its copies on the data directory's disk without
    looking at the free space, so on a nearly full disk the live ledger's commits failed while it ran, and the rows
    of requests already forwarded were lost. It now refuses, before it writes anything, copies that would take more
    than half the free space, and the gate goes on recording."""
    world = GateWorld.start()
    aegis = world.aegis
    try:
        assert aegis.stop() == 0
        kept = aegis.data_dir.rename(aegis.root / "kept")  # moved onto a small disk of its own
        aegis.data_dir.mkdir(mode=0o700)
        with tmpfs(aegis.data_dir, "8m"):
            for path in kept.iterdir():
                shutil.copy2(path, aegis.data_dir / path.name)
            aegis.start()
            aegis.ctl_in_process("unlock", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
            up = world.upstream()
            world.credential("gh", SECRET, up.entry())
            world.agent("bot", "gh")
            for number in range(20):
                assert world.call("GET", f"/gh/echo/before{number}", agent="bot").status == 200
            databases = sum(path.stat().st_size for path in aegis.data_dir.glob("*.db*"))
            room = shutil.disk_usage(aegis.data_dir).free
            filler = aegis.data_dir / "filler"
            filler.write_bytes(b"\0" * (room - databases * 3 // 2))  # room for the copies, not for them and the ledger
            backup = aegis.root / "nightly.backup"
            result = aegis.ctl("backup", str(backup))
            assert_failed(result, "more than half", "nothing was written: free some space, then back up again")
            assert not backup.exists() and list(aegis.data_dir.glob(".backup-*")) == []
            reply = world.call("GET", "/gh/echo/after", agent="bot")
            assert reply.status == 200 and world.row(reply.request_id)["path"] == "/echo/after"
            filler.unlink()
            aegis.ctl("backup", str(backup)).ok()
            world.assert_no_leaks()
            aegis.stop()
    finally:
        world.close()


def test_a_backup_cut_off_by_a_crash_leaves_no_copy_of_the_vault_after_a_restart(aegis: Aegis) -> None:
    """Found by a cold review: a backup cut off by a crash left its copy of vault.db (key slots included) in the data
    directory across restarts, until the next backup or restore. aegisd removes it at start, once it holds the data
    directory's lock.

    The backup is held open by a client that reads nothing: its archive (a ledger of a few MiB) cannot all be sent,
    so the backup is still running, its copies in place, when aegisd is killed."""
    _with_filled_ledger(aegis, 20_000)
    with grpc.insecure_channel(f"unix:{aegis.socket}") as channel:
        stream = backup_pb2_grpc.BackupServiceStub(channel).Backup(backup_pb2.BackupRequest(), timeout=60)
        deadline = time.monotonic() + 30
        while not list(aegis.data_dir.glob(".backup-*/vault.db")):
            assert time.monotonic() < deadline, aegis.log()[-3000:]
            time.sleep(0.01)
        aegis.kill()
        stream.cancel()  # type: ignore[no-untyped-call]
    left = list(aegis.data_dir.glob(".backup-*"))
    assert left, "the crash left nothing to clear: the test did not test anything"

    aegis.start()
    assert list(aegis.data_dir.glob(".backup-*")) == []
    assert f"removed 1 scratch directory a backup or restore cut off by a stop left in {aegis.data_dir}" in aegis.log()
    aegis.ctl_in_process("backup", str(aegis.root / "after.backup")).ok()  # and backups go on as before
    aegis.assert_no_leaks([SECRET, PASSPHRASE])


def test_a_restore_records_the_restored_ledgers_newest_chained_row(tmp_path: Path) -> None:
    """Found by a cold review: the `backup_restored` row, the ledger's evidence of a rollback, gave the backup's time
    as its manifest states it, which no checksum covers: an edited manifest could claim any time. The row now also
    names the restored ledger's newest chained row and the time in it, which its MAC covers (`ledger verify`
    checks it), and says the manifest's time is the file's own claim."""
    world = GateWorld.start()
    try:
        aegis = world.aegis
        _, good = backed_up(world, "old.backup", before="/echo/old")
        for n in range(3):
            assert world.call("GET", f"/github/echo/new{n}", agent="claude").status == 200
        parts = members(good.read_bytes())
        copy = tmp_path / "ledger.db"
        copy.write_bytes(parts["ledger.db"])
        with sqlite3.connect(copy) as conn:
            newest_id, newest_time = conn.execute(
                "SELECT id, time_ms FROM ledger WHERE mac IS NOT NULL ORDER BY id DESC LIMIT 1").fetchone()
        forged = aegis.root / "forged.backup"
        forged.write_bytes(make_tar(with_manifest_for(parts, created_ms=4102444800000)))  # 2100-01-01

        aegis.ctl_in_process("lock").ok()
        aegis.ctl_in_process("restore", str(forged), "--yes").ok()
        world.unlock()
        rows = json.loads(aegis.ctl_in_process("ledger", "show", "--limit", "5", "--json").ok().out)
        details = [row["detail"] for row in rows if row["reason"] == "backup_restored"]
        assert len(details) == 1, rows
        assert details[0].startswith("restored from a backup taken 2100-01-01T00:00:00.000Z as its manifest states "
                                     "it (vault "), details
        assert (f"its ledger's newest chained row is {newest_id}, written {iso_time(newest_time)})"
                in details[0]), details
        assert newest_time < 4102444800000
        assert "backup restored" in aegis.log() and f"newest_chained_row={newest_id}" in aegis.log()
        assert json.loads(aegis.ctl_in_process("ledger", "verify", "--json").out)["ok"]  # the row it names is chained
        world.assert_no_leaks()
    finally:
        world.close()
