"""The data directory going wrong: corrupt or foreign database, full disk, read-only file system.

Each gives one clear message that names the file or says what to do, no traceback, and
nothing half-written: what was there before is still there, whole, afterwards.
"""

from __future__ import annotations

import os
import sqlite3

from tests.e2e.support import assert_failed, names, open_vault, remount, status, tmpfs
from tests.harness import PASSPHRASE, Aegis

FIRST_SECRET = "sk-first-storage-secret-5d41402abc4b2a76"
BIG_SECRET = "sk-big-" + "b" * 12000


def start_fails(aegis: Aegis, *args: str) -> str:
    aegis.log_path.unlink(missing_ok=True)
    aegis.start(*args, wait=False)
    assert aegis.proc is not None
    code = aegis.proc.wait(15)
    aegis.proc = None
    log = aegis.log()
    assert code == 1, log
    assert "Traceback" not in log, log
    assert not aegis.socket.exists()
    return log


def test_random_bytes_database_refused_at_start(fresh: Aegis) -> None:
    fresh.data_dir.mkdir(mode=0o700, parents=True)
    db = fresh.data_dir / "vault.db"
    db.write_bytes(os.urandom(16384))
    log = start_fails(fresh)
    assert str(db) in log and "corrupt" in log
    assert "aegisd: error:" in log


def test_damaged_pages_refused_at_start(fresh: Aegis) -> None:
    fresh.start()
    fresh.init()
    fresh.add_credential("first", FIRST_SECRET, "--service", "first", "--domains", "first.example")
    assert fresh.stop() == 0
    db = fresh.data_dir / "vault.db"
    data = bytearray(db.read_bytes())
    page = 4096
    assert len(data) >= 3 * page
    data[page:] = os.urandom(len(data) - page)  # the header page survives, the b-trees do not
    db.write_bytes(bytes(data))
    log = start_fails(fresh)
    assert str(db) in log and ("corrupt" in log or "integrity" in log)
    fresh.assert_no_leaks([PASSPHRASE, FIRST_SECRET])


def test_foreign_sqlite_database_refused(fresh: Aegis) -> None:
    fresh.data_dir.mkdir(mode=0o700, parents=True)
    db = fresh.data_dir / "vault.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE recipes (name TEXT, minutes INTEGER)")
    conn.execute("INSERT INTO recipes VALUES ('soup', 30)")
    conn.commit()
    conn.close()
    log = start_fails(fresh)
    assert str(db) in log and "not an aegis vault database" in log
    # The foreign file was not touched.
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT name FROM recipes").fetchall() == [("soup",)]
    assert conn.execute("PRAGMA application_id").fetchone()[0] == 0
    conn.close()


def test_newer_schema_refused(fresh: Aegis) -> None:
    fresh.start()
    fresh.init()
    assert fresh.stop() == 0
    db = fresh.data_dir / "vault.db"
    conn = sqlite3.connect(db)
    conn.execute("UPDATE schema_version SET version = 999")
    conn.commit()
    conn.close()
    log = start_fails(fresh)
    assert "schema version 999" in log and "upgrade aegisd" in log
    fresh.assert_no_leaks([PASSPHRASE])


def test_secret_is_not_in_the_database_files_in_clear(unlocked: Aegis) -> None:
    unlocked.add_credential("first", FIRST_SECRET, "--service", "first", "--domains", "first.example")
    unlocked.ctl("vault", "rotate", "first", "--secret-stdin", input="sk-rotated-clear-check-0042\n").ok()
    files = {p.name for p in unlocked.data_dir.iterdir()}
    assert "vault.db-wal" in files  # checked while the WAL holds the fresh writes
    unlocked.assert_no_leaks([PASSPHRASE, FIRST_SECRET, "sk-rotated-clear-check-0042"])
    assert unlocked.stop() == 0
    unlocked.assert_no_leaks([PASSPHRASE, FIRST_SECRET, "sk-rotated-clear-check-0042"])
    for path in unlocked.data_dir.iterdir():
        assert os.stat(path).st_mode & 0o077 == 0, f"{path} is readable by others"


def test_full_data_directory(fresh: Aegis) -> None:
    with tmpfs(fresh.data_dir, "1m"):
        fresh.start()
        fresh.init()
        fresh.add_credential("first", FIRST_SECRET, "--service", "first", "--domains", "first.example")
        filler = fresh.data_dir / "filler"
        try:
            with filler.open("wb") as fh:
                while True:
                    fh.write(b"\0" * 4096)
                    fh.flush()
        except OSError:
            pass  # ENOSPC: the disk is now full

        result = fresh.ctl("vault", "add", "second", "--service", "second", "--domains", "second.example",
                           "--secret-stdin", input=BIG_SECRET + "\n")
        assert_failed(result, "full", "free")
        assert_failed(fresh.ctl("vault", "rotate", "first", "--secret-stdin", input=BIG_SECRET + "\n"), "full")
        assert fresh.proc is not None and fresh.proc.poll() is None  # still running
        assert names(fresh) == ["first"]
        assert status(fresh)["credentials"] == 1

        filler.unlink()
        fresh.add_credential("second", BIG_SECRET, "--service", "second", "--domains", "second.example")
        assert names(fresh) == ["first", "second"]
        assert fresh.stop() == 0

        # Nothing half-written: after a restart both credentials are whole, and the failed rotate
        # left the first secret as it was.
        fresh.start()
        fresh.ctl("unlock", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
        assert names(fresh) == ["first", "second"]
        assert fresh.stop() == 0
        with open_vault(fresh.data_dir) as vault:
            secrets = {c.credential.name: c.secret for c in vault.checked_credentials()}
        assert secrets == {"first": FIRST_SECRET.encode(), "second": BIG_SECRET.encode()}
        fresh.assert_no_leaks([PASSPHRASE, FIRST_SECRET, BIG_SECRET])


def test_read_only_data_directory(fresh: Aegis) -> None:
    with tmpfs(fresh.data_dir, "4m"):
        fresh.start()
        fresh.init()
        fresh.add_credential("first", FIRST_SECRET, "--service", "first", "--domains", "first.example")
        # Linux refuses to remount read-only while aegisd holds its database open for writing
        # (EBUSY), so the file system turns read-only between runs.
        assert fresh.stop() == 0
        assert remount(fresh.data_dir, "ro").returncode == 0
        try:
            log = start_fails(fresh)
            assert "read-only" in log and str(fresh.data_dir) in log
        finally:
            assert remount(fresh.data_dir, "rw").returncode == 0
        fresh.start()
        fresh.ctl("unlock", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
        assert names(fresh) == ["first"]
        fresh.add_credential("second", "sk-after-ro-secret-77", "--service", "second", "--domains", "s.example")
        assert names(fresh) == ["first", "second"]
        fresh.assert_no_leaks([PASSPHRASE, FIRST_SECRET, "sk-after-ro-secret-77"])


def test_data_directory_writable_by_others_is_refused(fresh: Aegis) -> None:
    fresh.data_dir.mkdir(parents=True)
    os.chmod(fresh.data_dir, 0o777)  # noqa: S103 - the point of the test
    log = start_fails(fresh)
    assert "writable by other users" in log and "chmod 700" in log
