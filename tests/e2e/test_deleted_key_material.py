"""What a removed key slot or a retired secret leaves in the data directory and in later backups: nothing.

aegisd deletes a retired unlock key's or passphrase's slot, or a rotated or removed credential's sealed secret,
and SQLite, unless told otherwise, only marks the deleted cell free: the bytes (salt, nonce, wrapped master key)
stay in vault.db, and in its write-ahead log, and a page-level copy took them into every later backup. Whoever
holds the control socket and a leaked unlock key could then carve the old slot out of a backup and open the vault.

This host's SQLite (Debian's) is built to overwrite deleted content by default; most builds are not. So the
daemon runs here as it would on a stock SQLite: a sitecustomize turns `secure_delete` off on every connection
it makes, before aegisd's own setup runs.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest

from tests.harness import PASSPHRASE, Aegis, new_aegis

NEW_PASSPHRASE = "a completely different passphrase 4417"
SECRET = "sk-deleted-material-secret-0123456789abcdef"
ROTATED = "sk-deleted-material-rotated-9876543210fedcba"

STOCK_SQLITE = '''\
import os
import sqlite3

_connect = sqlite3.connect


def connect(*args, **kwargs):
    conn = _connect(*args, **kwargs)
    conn.execute("PRAGMA secure_delete = 0")  # SQLite's own default, which Debian's build changes
    return conn


sqlite3.connect = connect
with open(os.environ["STOCK_SQLITE_MARKER"], "a") as marker:
    marker.write("loaded\\n")
'''


@pytest.fixture
def aegis() -> Iterator[Aegis]:
    instance = new_aegis()
    site = instance.root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(STOCK_SQLITE)
    marker = instance.root / "stock-sqlite.loaded"
    instance.env.update({"PYTHONPATH": str(site), "STOCK_SQLITE_MARKER": str(marker)})
    instance.start()
    assert marker.read_text().startswith("loaded")  # the daemon runs with secure_delete off, as on a stock build
    instance.init()
    instance.add_credential("svc", SECRET, "--service", "svc", "--domains", "svc.example")
    yield instance
    instance.cleanup()


def slot_bytes(aegis: Aegis, kind: str) -> list[bytes]:
    """The salt, nonce and wrapped master key of each slot of `kind`, as stored now."""
    return column_bytes(aegis, "SELECT salt, nonce, wrapped FROM key_slots WHERE kind = ?", kind)


def column_bytes(aegis: Aegis, query: str, *params: str) -> list[bytes]:
    db = aegis.data_dir / "vault.db"
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        values = [bytes(value) for row in conn.execute(query, params) for value in row]
    finally:
        conn.close()
    assert values and all(len(value) >= 12 for value in values)
    return values


def live_files(aegis: Aegis) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in aegis.data_dir.iterdir()
            if path.name in ("vault.db", "vault.db-wal", "vault.db-journal")}


def assert_absent(material: list[bytes], files: dict[str, bytes]) -> None:
    for name, data in files.items():
        for value in material:
            assert value not in data, f"{value.hex()} (deleted) is still in {name} at byte {data.find(value)}"


def new_unlock_key(aegis: Aegis, name: str, passphrase: str = PASSPHRASE) -> str:
    out = aegis.root / name
    aegis.ctl_in_process("unlock-key", "new", "--out", str(out), "--passphrase-stdin", input=passphrase + "\n").ok()
    return out.read_text().strip()


def unlocks_with_key(aegis: Aegis, key: str) -> bool:
    aegis.ctl_in_process("lock").ok()
    result = aegis.ctl_in_process("unlock", "--unlock-key-stdin", input=f"{key}\n")
    return result.code == 0


@pytest.mark.parametrize("change", ["unlock-key remove", "unlock-key new", "passphrase"])
def test_a_retired_slot_is_in_neither_the_vault_files_nor_a_later_backup(aegis: Aegis, change: str) -> None:
    leaked = new_unlock_key(aegis, "leaked.key")
    retired = slot_bytes(aegis, "passphrase" if change == "passphrase" else "unlock_key")
    if change == "unlock-key remove":
        aegis.ctl_in_process("unlock-key", "remove", "--yes", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    elif change == "unlock-key new":
        new_unlock_key(aegis, "current.key")
    else:
        aegis.ctl_in_process("passphrase", "--passphrase-stdin", input=f"{PASSPHRASE}\n{NEW_PASSPHRASE}\n").ok()
    if change != "passphrase":
        assert not unlocks_with_key(aegis, leaked)

    assert_absent(retired, live_files(aegis))  # the daemon still running: its -wal as it is now
    backup = aegis.root / "after.backup"
    aegis.ctl("backup", str(backup)).ok()
    assert_absent(retired, {"the backup": backup.read_bytes()})
    assert aegis.stop() == 0
    assert_absent(retired, live_files(aegis))


def test_a_rotated_or_removed_secret_leaves_no_sealed_copy(aegis: Aegis) -> None:
    sealed = column_bytes(aegis, "SELECT nonce, ciphertext FROM credentials WHERE name = 'svc'")
    aegis.ctl_in_process("vault", "rotate", "svc", "--secret-stdin", input=ROTATED + "\n").ok()
    assert_absent(sealed, live_files(aegis))
    rotated = column_bytes(aegis, "SELECT nonce, ciphertext FROM credentials WHERE name = 'svc'")
    aegis.ctl_in_process("vault", "remove", "svc", "--yes").ok()
    assert_absent(sealed + rotated, live_files(aegis))
    backup = aegis.root / "after.backup"
    aegis.ctl("backup", str(backup)).ok()
    assert_absent(sealed + rotated, {"the backup": backup.read_bytes()})


def test_residue_an_older_aegisd_left_reaches_neither_a_backup_nor_the_live_file(aegis: Aegis) -> None:
    """A vault whose unlock key an older aegisd removed on a stock SQLite: the deleted slot's bytes are still in
    vault.db's free space when this aegisd starts. A backup must not carry them, and the live file loses them."""
    leaked = new_unlock_key(aegis, "leaked.key")
    retired = slot_bytes(aegis, "unlock_key")
    assert aegis.stop() == 0
    conn = sqlite3.connect(aegis.data_dir / "vault.db", isolation_level=None)
    try:  # what an older aegisd's `unlock-key remove` did
        conn.execute("PRAGMA secure_delete = 0")
        conn.execute("DELETE FROM key_slots WHERE kind = 'unlock_key'")
    finally:
        conn.close()
    residue = aegis.data_dir.joinpath("vault.db").read_bytes()
    assert all(value in residue for value in retired)  # the residue this test is about is there

    aegis.start()
    backup = aegis.root / "after.backup"
    aegis.ctl("backup", str(backup)).ok()
    assert_absent(retired, {"the backup": backup.read_bytes()})
    assert_absent(retired, live_files(aegis))
    assert not unlocks_with_key(aegis, leaked)

    # The backup is an ordinary one: it restores, and the vault opens with its passphrase.
    aegis.ctl_in_process("lock").ok()
    aegis.ctl("restore", str(backup), "--yes").ok()
    aegis.ctl_in_process("unlock", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    assert "svc" in aegis.ctl_in_process("vault", "list").ok().out
    aegis.assert_no_leaks([PASSPHRASE, SECRET, leaked])


def _vault_rows(aegis: Aegis, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"{(aegis.data_dir / 'vault.db').resolve().as_uri()}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_narrowing_changes_leave_no_earlier_row_in_the_log(aegis: Aegis) -> None:
    """Found by a cold review: a regenerated token, a revoked grant, a lowered rate limit and a narrowed allowlist
    left the rows they replaced in vault.db-wal while aegisd ran. Each of those rows still authenticates (its MAC
    or seal holds), so anyone who can write the data directory could put one back (an old token, a wider
    allowlist) without ever holding a backup. Such changes now empty the log after they commit."""
    aegis.ctl_in_process("vault", "update", "svc", "--domains", "svc.example,wide.example", "--passphrase-stdin",
                         input=PASSPHRASE + "\n").ok()
    aegis.ctl_in_process("agent", "add", "bot", "--json").ok()
    aegis.ctl_in_process("agent", "set-rate-limit", "bot", "100/min").ok()
    aegis.ctl_in_process("grant", "bot", "svc").ok()
    (token_hash, agent_mac), = _vault_rows(aegis, "SELECT token_hash, mac FROM agents WHERE name = 'bot'")
    (grant_mac,), = _vault_rows(aegis, "SELECT mac FROM grants")
    (wide_seal,), = _vault_rows(aegis, "SELECT ciphertext FROM credentials")
    aegis.ctl_in_process("vault", "update", "svc", "--domains", "svc.example").ok()
    aegis.ctl_in_process("revoke", "bot", "svc").ok()
    aegis.ctl_in_process("agent", "regenerate", "bot", "--json").ok()
    for name, needle in {"the old token's hash": token_hash, "the old agent row's MAC": agent_mac,
                         "the revoked grant's MAC": grant_mac, "the wider allowlist's seal": wide_seal}.items():
        assert isinstance(needle, bytes) and len(needle) >= 16, name
        for path in aegis.data_dir.glob("vault.db*"):
            assert needle not in path.read_bytes(), f"{name} is still in {path.name}"
    aegis.assert_no_leaks([SECRET])
