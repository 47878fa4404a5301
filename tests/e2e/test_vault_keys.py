"""Changing what opens the vault after `init`: `aegisctl passphrase`, `aegisctl unlock-key new|remove`.

A real aegisd and the real aegisctl: every change needs the current passphrase, takes effect at once
(the old secret stops opening the vault, the new one opens it, across a restart), leaves the vault
locked or unlocked as it was, is recorded in the ledger, and never shows a passphrase or key anywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import signal
import sqlite3
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from aegisd.api.aegis.v1 import backup_pb2, backup_pb2_grpc
from tests.e2e.gate_support import request
from tests.e2e.support import status_in_process
from tests.harness import AEGISCTL, PASSPHRASE, Aegis, new_aegis

NEW_PASSPHRASE = "a completely different passphrase 4417"
SECRET = "sk-vault-keys-secret-0123456789abcdef"


@pytest.fixture
def aegis() -> Iterator[Aegis]:
    instance = new_aegis()
    instance.start()
    instance.init()
    instance.add_credential("svc", SECRET, "--service", "svc", "--domains", "svc.example")
    yield instance
    instance.cleanup()


def unlocks_with(aegis: Aegis, *, passphrase: str | None = None, key: str | None = None) -> bool:
    """Whether the locked vault opens with this secret (left locked again either way)."""
    assert aegis.ctl_in_process("lock").code == 0
    if passphrase is not None:
        result = aegis.ctl_in_process("unlock", "--passphrase-stdin", input=passphrase + "\n")
    else:
        result = aegis.ctl_in_process("unlock", "--unlock-key-stdin", input=f"{key}\n")
    if result.code == 0:
        aegis.ctl_in_process("lock").ok()
        return True
    assert "wrong" in result.err or "has no unlock key" in result.err, result.err
    return False


def key_rows(aegis: Aegis) -> list[str]:
    rows = json.loads(aegis.ctl_in_process("ledger", "show", "--json", "--limit", "1000").ok().out)
    return [r["detail"] for r in sorted(rows, key=lambda r: r["id"]) if r["reason"] == "vault_keys_changed"]


def test_passphrase_change_takes_effect_and_keeps_the_state(aegis: Aegis) -> None:
    changed = aegis.ctl("passphrase", "--passphrase-stdin", input=f"{PASSPHRASE}\n{NEW_PASSPHRASE}\n").ok()
    assert "Passphrase changed" in changed.out
    # Found by a walkthrough: it said backups "still open with the old one", but a restore into this vault keeps
    # the current key slots (docs/operations.md); only the backup file itself still holds the old passphrase.
    assert "still hold the old one" in changed.out
    assert "restore` of one into this vault keeps the new one" in changed.out
    assert "still open with the old" not in changed.out
    assert status_in_process(aegis)["state"] == "unlocked"  # it stays unlocked
    assert not unlocks_with(aegis, passphrase=PASSPHRASE)
    assert unlocks_with(aegis, passphrase=NEW_PASSPHRASE)
    # Locked, it stays locked: proving the passphrase is not unlocking. Back to the first one.
    aegis.ctl_in_process("passphrase", "--passphrase-stdin", input=f"{NEW_PASSPHRASE}\n{PASSPHRASE}\n").ok()
    assert status_in_process(aegis)["state"] == "locked"
    assert aegis.stop() == 0
    aegis.start()
    assert unlocks_with(aegis, passphrase=PASSPHRASE) and not unlocks_with(aegis, passphrase=NEW_PASSPHRASE)
    aegis.ctl_in_process("unlock", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    assert key_rows(aegis) == ["vault passphrase changed"] * 2
    aegis.assert_no_leaks([PASSPHRASE, NEW_PASSPHRASE, SECRET])


def test_passphrase_change_refuses_a_wrong_or_weak_or_same_passphrase(aegis: Aegis) -> None:
    wrong = aegis.ctl_in_process("passphrase", "--passphrase-stdin",
                                 input=f"not the passphrase at all\n{NEW_PASSPHRASE}\n")
    assert wrong.code == 1 and "wrong passphrase" in wrong.err, wrong
    weak = aegis.ctl_in_process("passphrase", "--passphrase-stdin", input=f"{PASSPHRASE}\nshort\n")
    assert weak.code == 1 and "passphrase" in weak.err, weak
    same = aegis.ctl_in_process("passphrase", "--passphrase-stdin", input=f"{PASSPHRASE}\n{PASSPHRASE}\n")
    assert same.code == 1 and "is the current one" in same.err, same
    one_line = aegis.ctl_in_process("passphrase", "--passphrase-stdin", input=f"{PASSPHRASE}\n")
    assert one_line.code == 2 and "empty" in one_line.err, one_line
    assert unlocks_with(aegis, passphrase=PASSPHRASE)  # nothing changed
    assert key_rows(aegis) == []
    assert "vault key change refused: wrong passphrase" in aegis.log()
    aegis.assert_no_leaks([PASSPHRASE, NEW_PASSPHRASE, "not the passphrase at all", SECRET])


def test_unlock_key_new_replaces_and_remove_ends_them(aegis: Aegis) -> None:
    first_file = aegis.root / "first.key"
    made = aegis.ctl("unlock-key", "new", "--out", str(first_file), "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    assert "New unlock key created." in made.out and "replaces" not in made.out
    assert first_file.stat().st_mode & 0o777 == 0o600
    first = first_file.read_text().strip()
    assert unlocks_with(aegis, key=first)

    # On stdout the key stands alone (KEY=$(...)); it replaces the first, which stops working at once.
    second_run = aegis.ctl("unlock-key", "new", "--out", "-", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    second = second_run.out.strip()
    aegis.outputs.remove(second_run.out)  # the one place the key is meant to be shown; checked for leaks nowhere else
    assert second.startswith("aegis-unlock-") and "\n" not in second and second != first
    assert "replaces 1 unlock key" in second_run.err
    assert not unlocks_with(aegis, key=first) and unlocks_with(aegis, key=second)

    # A daemon started with the new key comes up unlocked.
    aegis.stop()
    aegis.start(env={"AEGIS_UNLOCK_KEY": second})
    assert status_in_process(aegis)["state"] == "unlocked"

    removed = aegis.ctl("unlock-key", "remove", "--yes", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    assert "Removed 1 unlock key" in removed.out
    assert not unlocks_with(aegis, key=second) and unlocks_with(aegis, passphrase=PASSPHRASE)
    again = aegis.ctl_in_process("unlock-key", "remove", "--yes", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    assert "had no unlock key" in again.out
    aegis.ctl_in_process("unlock", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    assert key_rows(aegis) == ["vault unlock key replaced (0 before)", "vault unlock key replaced (1 before)",
                               "vault unlock keys removed (1 before)", "vault unlock keys removed (0 before)"]
    aegis.assert_no_leaks([PASSPHRASE, first, second, SECRET])


def test_unlock_key_changes_need_the_passphrase_and_lose_nothing(aegis: Aegis) -> None:
    key_file = aegis.root / "init.key"
    aegis.stop()
    aegis.cleanup()
    aegis.root.mkdir(parents=True)
    aegis.start()
    aegis.init(PASSPHRASE, "--unlock-key-out", str(key_file))
    key = key_file.read_text().strip()

    out = aegis.root / "new.key"
    wrong = aegis.ctl_in_process("unlock-key", "new", "--out", str(out), "--passphrase-stdin",
                                 input="a wrong passphrase here\n")
    assert wrong.code == 1 and "wrong passphrase" in wrong.err, wrong
    assert not out.exists()  # the file made before the call is gone again: no empty key file left behind
    taken = aegis.ctl_in_process("unlock-key", "new", "--out", str(key_file), "--passphrase-stdin",
                                 input=PASSPHRASE + "\n")
    assert taken.code == 2 and "already exists" in taken.err  # refused before anything changed
    no_yes = aegis.ctl_in_process("unlock-key", "remove", "--passphrase-stdin", input=PASSPHRASE + "\n")
    assert no_yes.code == 2 and "--yes" in no_yes.err
    wrong_remove = aegis.ctl_in_process("unlock-key", "remove", "--yes", "--passphrase-stdin",
                                        input="a wrong passphrase here\n")
    assert wrong_remove.code == 1 and "wrong passphrase" in wrong_remove.err
    assert unlocks_with(aegis, key=key)  # the key from init still works: nothing was replaced or removed
    aegis.assert_no_leaks([PASSPHRASE, key])


@pytest.mark.parametrize("delay", [0.05, 0.4])
def test_unlock_key_new_cut_off_at_any_moment_never_loses_the_working_key(aegis: Aegis, delay: float) -> None:
    """Ctrl-C at some moment of `unlock-key new` (before the call, during Argon2 on the daemon's side, after):
    whatever the daemon did, a key that opens the vault is still at hand: the old one, or the new one in its file."""
    first_file = aegis.root / "first.key"
    aegis.ctl_in_process("unlock-key", "new", "--out", str(first_file), "--passphrase-stdin",
                         input=PASSPHRASE + "\n").ok()
    first = first_file.read_text().strip()
    new_file = aegis.root / "new.key"
    proc = subprocess.Popen([AEGISCTL, "unlock-key", "new", "--out", str(new_file), "--passphrase-stdin"],
                            env=aegis.base_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None
    proc.stdin.write(PASSPHRASE + "\n")
    proc.stdin.flush()
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    aegis.outputs.extend([out, err])
    time.sleep(1.0)  # a call the daemon had begun finishes on its side even though the client is gone
    old_works = unlocks_with(aegis, key=first)
    new_key = new_file.read_text().strip() if new_file.exists() else None
    new_works = new_key is not None and unlocks_with(aegis, key=new_key)
    assert old_works or new_works, (delay, proc.returncode, err)
    if not old_works:  # the daemon replaced it: the replacement must be in the file
        assert new_works, err
    if new_file.exists() and not new_works:
        assert "may have taken it" in err or proc.returncode == 0, err  # kept only with a word on why
    aegis.assert_no_leaks([PASSPHRASE, first, *([new_key] if new_key else [])])


def test_restoring_an_older_backup_of_this_vault_does_not_bring_back_its_keys(aegis: Aegis) -> None:
    """Restore needs only the socket: it must not undo a passphrase change or a replaced (leaked) unlock key,
    which needed the passphrase. A backup of this vault comes back with the vault's current key slots."""
    leaked_file = aegis.root / "leaked.key"
    aegis.ctl_in_process("unlock-key", "new", "--out", str(leaked_file), "--passphrase-stdin",
                         input=PASSPHRASE + "\n").ok()
    leaked = leaked_file.read_text().strip()
    backup = aegis.root / "before.backup"
    aegis.ctl_in_process("backup", str(backup)).ok()
    aegis.ctl_in_process("passphrase", "--passphrase-stdin", input=f"{PASSPHRASE}\n{NEW_PASSPHRASE}\n").ok()
    current_file = aegis.root / "current.key"
    aegis.ctl_in_process("unlock-key", "new", "--out", str(current_file), "--passphrase-stdin",
                         input=NEW_PASSPHRASE + "\n").ok()
    current = current_file.read_text().strip()
    aegis.ctl_in_process("vault", "remove", "svc", "--yes").ok()  # so the restore visibly brings the backup's rows back

    aegis.ctl_in_process("lock").ok()
    restored = aegis.ctl("restore", str(backup), "--yes").ok()
    assert "kept its current passphrase and unlock keys" in restored.out, restored.out
    assert not unlocks_with(aegis, passphrase=PASSPHRASE) and not unlocks_with(aegis, key=leaked)
    assert unlocks_with(aegis, passphrase=NEW_PASSPHRASE) and unlocks_with(aegis, key=current)
    aegis.ctl_in_process("unlock", "--passphrase-stdin", input=NEW_PASSPHRASE + "\n").ok()
    assert [c["name"] for c in json.loads(aegis.ctl_in_process("vault", "list", "--json").ok().out)] == ["svc"]
    rows = json.loads(aegis.ctl_in_process("ledger", "show", "--json", "--limit", "20").ok().out)
    assert any(r["reason"] == "backup_restored" and "kept its current passphrase" in r["detail"] for r in rows)
    aegis.assert_no_leaks([PASSPHRASE, NEW_PASSPHRASE, leaked, current, SECRET])


def other_vaults_backup(aegis: Aegis, passphrase: str) -> Path:
    other = new_aegis()
    try:
        other.start()
        other.init(passphrase)
        backup = aegis.root / "other.backup"
        other.ctl_in_process("backup", str(backup)).ok()
    finally:
        other.cleanup()
    return backup


def test_another_vaults_backup_needs_this_vaults_passphrase_and_opens_with_its_own(aegis: Aegis) -> None:
    backup = other_vaults_backup(aegis, NEW_PASSPHRASE)
    vault_id = status_in_process(aegis)["vault_id"]
    aegis.ctl_in_process("lock").ok()
    without = aegis.ctl_in_process("restore", str(backup), "--yes", "--passphrase-stdin", input="\n")
    assert without.code == 2 and "standard input was empty" in without.err, without
    wrong = aegis.ctl_in_process("restore", str(backup), "--yes", "--passphrase-stdin",
                                 input="not this vault's passphrase\n")
    assert wrong.code == 1 and "wrong passphrase" in wrong.err, wrong
    assert status_in_process(aegis)["vault_id"] == vault_id  # nothing changed
    assert unlocks_with(aegis, passphrase=PASSPHRASE)
    restored = aegis.ctl_in_process("restore", str(backup), "--yes", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    assert "unlock it with the backup's passphrase" in restored.out, restored.out
    assert not unlocks_with(aegis, passphrase=PASSPHRASE) and unlocks_with(aegis, passphrase=NEW_PASSPHRASE)
    assert "restore refused: wrong passphrase" in aegis.log()
    aegis.assert_no_leaks([PASSPHRASE, NEW_PASSPHRASE, SECRET, "not this vault's passphrase"])


def test_two_restores_through_another_vault_do_not_bring_a_retired_key_back(aegis: Aegis) -> None:
    """Found by a cold review: another vault's backup first (the vault id changes), then this vault's old one
    (the ids no longer match, so its old slots would come back). The first step now needs the passphrase."""
    leaked_file = aegis.root / "leaked.key"
    aegis.ctl_in_process("unlock-key", "new", "--out", str(leaked_file), "--passphrase-stdin",
                         input=PASSPHRASE + "\n").ok()
    leaked = leaked_file.read_text().strip()
    old = aegis.root / "old.backup"
    aegis.ctl_in_process("backup", str(old)).ok()
    aegis.ctl_in_process("unlock-key", "remove", "--yes", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    stepping_stone = other_vaults_backup(aegis, NEW_PASSPHRASE)
    aegis.ctl_in_process("lock").ok()
    # The socket holder has no passphrase; the daemon must refuse even if no passphrase is sent at all.
    with grpc.insecure_channel(f"unix:{aegis.socket}") as channel:
        stub = backup_pb2_grpc.BackupServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Restore(iter([backup_pb2.RestoreChunk(data=stepping_stone.read_bytes())]), timeout=120)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value
    assert "needs that vault's passphrase" in str(refused.value.details())
    restored = aegis.ctl_in_process("restore", str(old), "--yes").ok()  # this vault's own backup: no passphrase asked
    assert "kept its current passphrase and unlock keys" in restored.out
    assert not unlocks_with(aegis, key=leaked) and unlocks_with(aegis, passphrase=PASSPHRASE)
    aegis.assert_no_leaks([PASSPHRASE, NEW_PASSPHRASE, leaked, SECRET])


def test_a_backup_holding_a_trigger_is_refused(aegis: Aegis) -> None:
    """Found by a cold review: a trigger in a backup's vault.db ran inside aegisd's own writes to the restored
    file (the key-slot carry-over) and put a retired unlock key back. aegisd makes no trigger or view."""
    backup = aegis.root / "this.backup"
    aegis.ctl_in_process("backup", str(backup)).ok()
    crafted = aegis.root / "crafted.backup"
    _with_vault_edit(backup, crafted, aegis.root / "work",
                     "CREATE TRIGGER keep AFTER DELETE ON key_slots BEGIN SELECT 1; END;")
    aegis.ctl_in_process("lock").ok()
    result = aegis.ctl_in_process("restore", str(crafted), "--yes")
    assert result.code == 1 and "holds a trigger, which aegisd never makes" in result.err, result
    _with_vault_edit(backup, aegis.root / "view.backup", aegis.root / "work2", "CREATE VIEW v AS SELECT 1;")
    result = aegis.ctl_in_process("restore", str(aegis.root / "view.backup"), "--yes")
    assert result.code == 1 and "holds a view" in result.err, result
    assert unlocks_with(aegis, passphrase=PASSPHRASE)


SCHEMA_EDITS = [
    # Found by a third cold review: a rebuilt key_slots whose foreign key's ON DELETE SET DEFAULT put a retired
    # slot back (as its column defaults) when aegisd later deleted a row of the table it referenced.
    ("vault.db", """CREATE TABLE k2 (id INTEGER PRIMARY KEY, kind TEXT NOT NULL DEFAULT 'passphrase', kdf TEXT NOT NULL,
                    params TEXT NOT NULL, salt BLOB NOT NULL, nonce BLOB NOT NULL, wrapped BLOB NOT NULL,
                    created_at INTEGER NOT NULL, FOREIGN KEY (id) REFERENCES meta(rowid) ON DELETE SET DEFAULT);
                    INSERT INTO k2 SELECT * FROM key_slots; DROP TABLE key_slots;
                    ALTER TABLE k2 RENAME TO key_slots;"""),
    ("vault.db", "CREATE INDEX extra ON credentials (service)"),
    ("vault.db", "ALTER TABLE grants ADD COLUMN note TEXT DEFAULT 'x'"),
    ("ledger.db", "CREATE INDEX extra ON ledger (path)"),
]


def test_a_backup_whose_schema_aegisd_did_not_make_is_refused(aegis: Aegis) -> None:
    backup = aegis.root / "this.backup"
    aegis.ctl_in_process("backup", str(backup)).ok()
    aegis.ctl_in_process("lock").ok()
    for number, (member, sql) in enumerate(SCHEMA_EDITS):
        crafted = aegis.root / f"crafted{number}.backup"
        _with_vault_edit(backup, crafted, aegis.root / f"work{number}", sql, member)
        result = aegis.ctl_in_process("restore", str(crafted), "--yes")
        assert result.code == 1 and f"{member} in the backup has a schema aegisd did not make" in result.err, \
            (sql, result)
    assert aegis.ctl_in_process("restore", str(backup), "--yes").code == 0  # the backup as aegisd wrote it is taken
    assert unlocks_with(aegis, passphrase=PASSPHRASE)


def _with_vault_edit(source: Path, target: Path, work: Path, sql: str, member: str = "vault.db") -> None:
    """`source` with `sql` run on its `member` and the manifest's sizes and digests made to fit again."""
    work.mkdir()
    with tarfile.open(source) as archive:
        archive.extractall(work, filter="data")
    with contextlib.closing(sqlite3.connect(work / member, isolation_level=None)) as conn:
        conn.executescript(sql)
    manifest = json.loads((work / "manifest.json").read_text())
    for name in ("vault.db", "ledger.db"):
        data = (work / name).read_bytes()
        manifest["members"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as archive:
        body = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size, info.mode = len(body), 0o600
        archive.addfile(info, io.BytesIO(body))
        for name in ("vault.db", "ledger.db"):
            archive.add(work / name, arcname=name)


def test_a_backup_whose_ledger_index_hides_a_row_is_refused(aegis: Aegis) -> None:
    """Found by a fourth cold review: an index rebuilt without a row, its sqlite_master text put back, hid the
    row from filtered `ledger show` while `ledger verify` (which walks the table) called the ledger intact.
    Only the full integrity check compares index contents with the table."""
    backup = aegis.root / "this.backup"
    aegis.ctl_in_process("backup", str(backup)).ok()
    crafted = aegis.root / "crafted.backup"
    _with_vault_edit(backup, crafted, aegis.root / "work", """
        DROP INDEX ledger_agent;
        CREATE INDEX ledger_agent ON ledger (agent, id) WHERE id != 1;
        PRAGMA writable_schema = ON;
        UPDATE sqlite_master SET sql = 'CREATE INDEX ledger_agent ON ledger (agent, id)' WHERE name = 'ledger_agent';
        PRAGMA writable_schema = OFF;""", "ledger.db")
    aegis.ctl_in_process("lock").ok()
    result = aegis.ctl_in_process("restore", str(crafted), "--yes")
    assert result.code == 1 and "ledger.db in the backup fails its integrity check" in result.err, result
    assert unlocks_with(aegis, passphrase=PASSPHRASE)


def test_a_backup_whose_id_counter_would_overflow_is_refused(aegis: Aegis) -> None:
    """Found by a fourth cold review: a same-vault backup (no passphrase needed) with the ledger's id counter at
    its maximum left the restored ledger unable to take a row, so the gate forwarded nothing."""
    backup = aegis.root / "this.backup"
    aegis.ctl_in_process("backup", str(backup)).ok()
    crafted = aegis.root / "crafted.backup"
    _with_vault_edit(backup, crafted, aegis.root / "work",
                     "UPDATE sqlite_sequence SET seq = 9223372036854775807 WHERE name = 'ledger'", "ledger.db")
    aegis.ctl_in_process("lock").ok()
    result = aegis.ctl_in_process("restore", str(crafted), "--yes")
    assert result.code == 1 and "ledger.db in the backup has an id counter out of range" in result.err, result
    assert unlocks_with(aegis, passphrase=PASSPHRASE)


_NEWEST_CHAINED = "(SELECT max(id) FROM ledger WHERE mac IS NOT NULL)"
LEDGER_TIP_EDITS = [
    # A row at the largest id with the counter put back below it: the next row's id overflows.
    ("INSERT INTO ledger SELECT 9223372036854775807, kind, time_ms, request_id, agent, credential, service, method, "
     "path, target_host, decision, reason, status, duration_ms, bytes_in, bytes_out, flags, detail, NULL FROM ledger "
     "LIMIT 1; UPDATE sqlite_sequence SET seq = 5 WHERE name = 'ledger';", "has a row id out of range"),
    # The MAC the next row chains from, of a type or size aegisd never writes: the writer could chain nothing.
    ("UPDATE ledger SET mac = 'x' WHERE id = (SELECT max(id) FROM ledger WHERE mac IS NOT NULL)",
     "has a newest chained row"),
    ("UPDATE ledger SET mac = zeroblob(16) WHERE id = (SELECT max(id) FROM ledger WHERE mac IS NOT NULL)",
     "has a newest chained row"),
    ("INSERT INTO checkpoints (time_ms, first_kept_id, prev_mac, pruned, mac) VALUES (0, 1, 'x', 0, zeroblob(32))",
     "has a prune checkpoint"),
]


def test_a_backup_whose_ledger_could_take_no_further_row_is_refused(aegis: Aegis) -> None:
    """Found by a fifth cold review: the id counter was checked but not the largest id itself, nor the type of the
    MAC the writer chains the next row from; each such backup was restored and then the gate forwarded nothing.
    The writer, meeting such a tip in its own file, now says which row it is rather than failing with TypeError."""
    backup = aegis.root / "this.backup"
    aegis.ctl_in_process("backup", str(backup)).ok()
    aegis.ctl_in_process("lock").ok()
    outputs = []
    for number, (sql, needle) in enumerate(LEDGER_TIP_EDITS):
        crafted = aegis.root / f"crafted{number}.backup"
        _with_vault_edit(backup, crafted, aegis.root / f"work{number}", sql, "ledger.db")
        result = aegis.ctl_in_process("restore", str(crafted), "--yes")
        assert result.code == 1 and f"ledger.db in the backup {needle}" in result.err, (sql, result)
        assert "Traceback" not in result.err
        outputs += [result.out, result.err]
    assert unlocks_with(aegis, passphrase=PASSPHRASE)

    assert aegis.stop() == 0
    with contextlib.closing(sqlite3.connect(aegis.data_dir / "ledger.db", isolation_level=None)) as conn:
        (tip,) = conn.execute(f"SELECT {_NEWEST_CHAINED}").fetchone()
        conn.execute("UPDATE ledger SET mac = 'x' WHERE id = ?", (tip,))
    aegis.start()
    # its rows are what the writer fails to add
    aegis.ctl_in_process("unlock", "--passphrase-stdin", input=PASSPHRASE + "\n")
    deadline = time.monotonic() + 20
    while f"newest chained row ({tip})" not in aegis.log():
        assert time.monotonic() < deadline, aegis.log()[-3000:]
        time.sleep(0.1)
    assert "TypeError" not in aegis.log()
    assert request(aegis.gate_port, "GET", "/_aegis/health").json()["ledger"] == "failing"
    aegis.assert_no_leaks([PASSPHRASE, SECRET], outputs)


def _with_manifest_edit(source: Path, target: Path, **changes: object) -> None:
    """`source` with `changes` made to its manifest (the databases as they were)."""
    with tarfile.open(source) as archive:
        parts = {}
        for info in archive:
            fh = archive.extractfile(info)
            assert fh is not None
            parts[info.name] = fh.read()
    manifest = json.loads(parts["manifest.json"])
    manifest.update(changes)
    parts["manifest.json"] = json.dumps(manifest).encode()
    with tarfile.open(target, "w") as archive:
        for name, data in parts.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o600
            archive.addfile(info, io.BytesIO(data))


def test_a_backup_whose_manifest_counts_do_not_match_its_databases_is_refused(aegis: Aegis) -> None:
    """Found by a fifth cold review: aegisctl's restore prompt shows the manifest's counts, which the daemon never
    checked, so an edited manifest could show the operator a different backup from the one restored."""
    backup = aegis.root / "this.backup"
    aegis.ctl_in_process("backup", str(backup)).ok()
    aegis.ctl_in_process("lock").ok()
    inflated = aegis.root / "inflated.backup"
    _with_manifest_edit(backup, inflated, counts={"credentials": 42, "agents": 7, "grants": 9, "ledger_rows": 100000})
    asked = aegis.ctl("restore", str(inflated))  # what the operator is asked to confirm
    assert asked.code == 2 and "42 credentials, 7 agents, 9 grants, 100000 ledger rows" in asked.err, asked
    result = aegis.ctl_in_process("restore", str(inflated), "--yes")
    assert result.code == 1, result
    assert "the backup's manifest does not match its databases" in result.err, result
    assert "42 credentials" in result.err and "1 credentials" in result.err, result
    malformed = aegis.root / "malformed.backup"
    _with_manifest_edit(backup, malformed, counts={"credentials": "many"})
    refused = aegis.ctl_in_process("restore", str(malformed), "--yes")
    assert refused.code == 1 and "missing fields or has malformed ones" in refused.err, refused
    uncounted = aegis.root / "uncounted.backup"  # counts are optional: a manifest without them is checked without
    _with_manifest_edit(backup, uncounted, counts={})
    restored = aegis.ctl_in_process("restore", str(uncounted), "--yes").ok()
    assert "1 credentials" in restored.out, restored
    assert unlocks_with(aegis, passphrase=PASSPHRASE)
    aegis.assert_no_leaks([PASSPHRASE, SECRET], [result.out, result.err, refused.err])


def _rss_mib(pid: int) -> float:
    """The process's resident memory: Argon2id's working memory shows here while a derivation runs."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the daemon's memory use from /proc")
def test_listings_and_metrics_are_answered_while_a_costly_passphrase_change_runs() -> None:
    """A passphrase change derives two Argon2id keys (a second or more each at a costly setting). It used to hold
    the vault's lock throughout, so `vault list`, a metrics scrape and the gate's routing rebuild all waited on it.
    Checked by order, not by time: once the daemon's memory shows the derivation under way, a listing and a scrape
    both come back while the change is still running."""
    aegis = new_aegis()
    try:
        aegis.start(env={"AEGIS_KDF_MEMORY_MIB": "256", "AEGIS_KDF_ITERATIONS": "4"})
        aegis.init()
        aegis.add_credential("svc", SECRET, "--service", "svc", "--domains", "svc.example")
        assert aegis.proc is not None
        pid = aegis.proc.pid
        resting = _rss_mib(pid)
        change = subprocess.Popen([AEGISCTL, "passphrase", "--passphrase-stdin"], env=aegis.base_env(),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert change.stdin is not None
            change.stdin.write(f"{PASSPHRASE}\n{NEW_PASSPHRASE}\n")
            change.stdin.flush()
            while _rss_mib(pid) < resting + 128:  # Argon2id's 256 MiB: the change is deriving now
                assert change.poll() is None, change.communicate()
                time.sleep(0.005)
            listed = aegis.ctl_in_process("vault", "list", "--json").ok()
            metrics = request(aegis.gate_port, "GET", "/_aegis/metrics").body.decode()
            assert change.poll() is None, "the listing waited for the passphrase change to finish"
            assert "vault passphrase changed" not in aegis.log()
        finally:
            out, err = change.communicate(timeout=120)
            aegis.outputs.extend([out, err])
        assert change.returncode == 0, err
        assert [c["name"] for c in json.loads(listed.out)] == ["svc"]
        assert 'aegis_credentials_total{status="active"} 1.0' in metrics
        assert not unlocks_with(aegis, passphrase=PASSPHRASE) and unlocks_with(aegis, passphrase=NEW_PASSPHRASE)
        aegis.assert_no_leaks([PASSPHRASE, NEW_PASSPHRASE, SECRET], [metrics])
    finally:
        aegis.cleanup()


def test_a_key_change_and_a_widening_answer_only_once_their_ledger_rows_are_committed(aegis: Aegis) -> None:
    """Found by a crash-consistency review: `passphrase` and a widening `vault update` answered before their
    `vault_keys_changed` / `credential_widened` rows committed, so a crash right after the answer kept the change
    and lost its record (here the rows wait behind another program's write lock on ledger.db). The call now
    answers once its row is in the file."""
    blocker = sqlite3.connect(aegis.data_dir / "ledger.db", isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")  # as an operator's sqlite3 shell would, for a moment

    def release() -> None:
        blocker.execute("ROLLBACK")
        blocker.close()

    released = threading.Timer(1.0, release)
    released.start()
    try:
        aegis.ctl_in_process("passphrase", "--passphrase-stdin", input=f"{PASSPHRASE}\n{NEW_PASSPHRASE}\n").ok()
        aegis.ctl_in_process("vault", "update", "svc", "--domains", "svc.example,more.example", "--passphrase-stdin",
                             input=f"{NEW_PASSPHRASE}\n").ok()
        aegis.kill()  # a crash right after the answers
    finally:
        released.join()
    with contextlib.closing(sqlite3.connect(aegis.data_dir / "ledger.db")) as db:
        reasons = [reason for (reason,) in db.execute("SELECT reason FROM ledger WHERE kind = 'system'")]
    assert "vault_keys_changed" in reasons and "credential_widened" in reasons, reasons
    aegis.start()
    assert unlocks_with(aegis, passphrase=NEW_PASSPHRASE)
    aegis.assert_no_leaks([SECRET, PASSPHRASE, NEW_PASSPHRASE])
