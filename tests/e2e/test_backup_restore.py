"""Backup under load, restore into a fresh daemon, and everything restore must refuse.

Real daemons, real aegisctl, real HTTP through the gate to a real upstream, and the control API
called directly only where aegisctl's own checks would stop a request before the daemon sees it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import signal
import sqlite3
import stat
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from aegisctl.backup_file import read_manifest, verify_archive
from aegisctl.client import ClientError
from aegisd.api.aegis.v1 import backup_pb2, backup_pb2_grpc
from tests.e2e.gate_support import GateWorld, request, untouched
from tests.e2e.support import assert_failed
from tests.harness import AEGISCTL, PASSPHRASE, Aegis, new_aegis
from tests.upstreams import Upstream

GH_SECRET = "ghp_backupSecret0123456789abcdefXYZ"
OA_SECRET = "sk-backupHeaderSecret0123456789abcdef"


def listing(aegis: Aegis, *args: str) -> Any:
    return json.loads(aegis.ctl_in_process(*args, "--json").ok().out)


def status(aegis: Aegis) -> dict[str, Any]:
    value: dict[str, Any] = listing(aegis, "status")
    return value


def members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        found = {}
        for info in tar:
            fh = tar.extractfile(info)
            assert fh is not None
            found[info.name] = fh.read()
    return found


def make_tar(parts: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in parts.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def with_manifest_for(parts: dict[str, bytes], **changes: Any) -> dict[str, bytes]:
    """The same archive with its manifest recomputed (checksums match), plus `changes` to it."""
    manifest = json.loads(parts["manifest.json"])
    for name in ("vault.db", "ledger.db"):
        manifest["members"][name] = {"size": len(parts[name]), "sha256": hashlib.sha256(parts[name]).hexdigest()}
    manifest.update(changes)
    return {**parts, "manifest.json": json.dumps(manifest).encode()}


def backed_up(world: GateWorld, name: str, before: str | None = None) -> tuple[Upstream, Path]:
    """A `github` credential granted to agent `claude`, a request to path `before` through the gate when given
    (so the backup's ledger holds it), then a backup of it all in `name` under the daemon's root."""
    up = world.upstream()
    world.credential("github", GH_SECRET, up.entry())
    world.agent("claude", "github")
    if before is not None:
        assert world.call("GET", f"/github{before}", agent="claude").status == 200
    backup = world.aegis.root / name
    world.aegis.ctl_in_process("backup", str(backup)).ok()
    return up, backup


@contextlib.contextmanager
def restore_held_at_its_swap(aegis: Aegis, backup: Path) -> Iterator[subprocess.Popen[str]]:
    """`aegisctl restore` of `backup`, its swap held up by a write lock on the old ledger (the swap's checkpoint
    waits out the busy timeout) until the block ends, when the restore is ended if it still runs."""
    holder = sqlite3.connect(aegis.data_dir / "ledger.db", timeout=0)
    holder.execute("BEGIN IMMEDIATE")
    proc = subprocess.Popen([AEGISCTL, "restore", str(backup), "--yes"], env=aegis.base_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        holder.rollback()
        holder.close()


@pytest.fixture
def world() -> Iterator[GateWorld]:
    world = GateWorld.start()
    yield world
    world.close()


def test_round_trip_under_load(world: GateWorld) -> None:
    a = world.aegis
    up = world.upstream()
    world.credential("github", GH_SECRET, up.entry())
    world.credential("openai", OA_SECRET, up.entry(), "--auth-type", "header", "--header-name", "X-Api-Key",
                     "--scopes", "read,write", "--ttl", "30d", "--rate-limit", "1000/min", "--body-inspection", "warn")
    world.agent("claude", "github", "openai")
    world.agent("cursor", "github")

    # Traffic through the gate while the backup is taken: four clients in a loop, and one request held
    # open at the upstream from before the backup starts until after it is written.
    stop = threading.Event()
    statuses: list[int] = []

    def load(agent: str) -> None:
        while not stop.is_set():
            reply = request(world.port, "GET", "/github/echo/load", [("X-Aegis-Agent", world.tokens[agent])])
            statuses.append(reply.status)

    clients = [threading.Thread(target=load, args=(name,)) for name in ("claude", "cursor") * 2]
    held: list[int] = []
    holder = threading.Thread(target=lambda: held.append(world.call("GET", "/github/hold/backup",
                                                                     agent="claude").status))
    for thread in (*clients, holder):
        thread.start()
    try:
        assert up.arrived("backup").wait(30)
        backup = a.root / "aegis.backup"
        result = a.ctl("backup", str(backup)).ok()
        during = len(statuses)
        assert during > 0 and not held  # the gate was serving, and the held request still open, meanwhile
    finally:
        up.release("backup")
        stop.set()
        for thread in (*clients, holder):
            thread.join(30)
    assert held == [200] and set(statuses) == {200}

    assert "Backup written to" in result.out
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    data = backup.read_bytes()
    parts = members(data)
    assert list(parts) == ["manifest.json", "vault.db", "ledger.db"]
    manifest = json.loads(parts["manifest.json"])
    assert manifest["format"] == "aegis-backup" and manifest["vault_id"] == status(a)["vault_id"]
    assert manifest["counts"]["credentials"] == 2 and manifest["counts"]["agents"] == 2
    for name in ("vault.db", "ledger.db"):
        assert manifest["members"][name]["sha256"] == hashlib.sha256(parts[name]).hexdigest()
    for secret in (*world.secrets, *world.tokens.values(), PASSPHRASE):
        assert secret.encode() not in data, "a secret or token is in clear in the backup"

    credentials_a, agents_a = listing(a, "vault", "list"), listing(a, "agent", "list")
    ledger_at_backup = manifest["counts"]["ledger_rows"]

    # A fresh daemon on a new data directory takes the backup.
    b_aegis = new_aegis()
    b = GateWorld(b_aegis, world.pki, secrets=world.secrets, tokens=world.tokens)
    try:
        b_aegis.start()
        assert status(b_aegis)["state"] == "uninitialized"
        assert_failed(b_aegis.ctl("restore", str(backup)), "--yes", code=2)  # no terminal to confirm on
        restored = b_aegis.ctl("restore", str(backup), "--yes").ok()
        assert manifest["vault_id"] in restored.out and "unlock" in restored.out
        assert status(b_aegis)["state"] == "locked" and status(b_aegis)["vault_id"] == manifest["vault_id"]
        assert b.call("GET", "/github/echo/locked", agent="claude").status == 503

        b.unlock()
        assert listing(b_aegis, "vault", "list") == credentials_a
        assert listing(b_aegis, "agent", "list") == agents_a
        verified = listing(b_aegis, "ledger", "verify")
        assert verified["ok"] and verified["rows_checked"] >= ledger_at_backup
        # Newest first: B's startup policy row (held until this first unlock), the 503 above, the restore.
        recent = listing(b_aegis, "ledger", "show", "--limit", "3")
        assert [r["reason"] for r in recent] == ["policy_reloaded", "vault_locked", "backup_restored"]
        assert manifest["vault_id"] in recent[2]["detail"]

        # A's agent tokens work through B's gate, with the right secret injected upstream.
        reply = b.call("GET", "/github/echo/from-b", agent="cursor")
        assert reply.status == 200
        assert up.requests_to("/echo/from-b")[-1].header("Authorization") == [f"Bearer {GH_SECRET}"]
        reply = b.call("POST", "/openai/echo/from-b-openai", agent="claude", body=b"{}")
        assert reply.status == 200
        assert up.requests_to("/echo/from-b-openai")[-1].header("X-Api-Key") == [OA_SECRET]
        assert b.call("GET", "/openai/echo/x", agent="cursor").status == 403  # grants came back too
        assert listing(b_aegis, "ledger", "verify")["ok"]
        b.assert_no_leaks([data.decode("latin-1")])
    finally:
        b_aegis.cleanup()
    world.assert_no_leaks()


def test_restore_refuses_and_changes_nothing(world: GateWorld) -> None:
    aegis = world.aegis
    up, good = backed_up(world, "good.backup", before="/echo/x")

    unlocked = aegis.ctl_in_process("restore", str(good), "--yes")
    assert_failed(unlocked, "unlocked", "aegisctl lock")
    # The daemon refuses on its own too, whoever calls it.
    with grpc.insecure_channel(f"unix:{aegis.socket}") as channel:
        stub = backup_pb2_grpc.BackupServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Restore(iter([backup_pb2.RestoreChunk(data=good.read_bytes())]), timeout=30)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "lock it first" in (refused.value.details() or "")

    aegis.ctl_in_process("lock").ok()
    before = (status(aegis), listing(aegis, "vault", "list"), listing(aegis, "agent", "list"),
              listing(aegis, "ledger", "show", "--limit", "100000"))
    data = good.read_bytes()
    parts = members(data)
    with tarfile.open(good) as tar:
        vault_offset = tar.getmember("vault.db").offset_data
    flipped = bytearray(data)
    flipped[vault_offset + 5000] ^= 0x01
    foreign = aegis.root / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.close()
    newer = with_manifest_for(parts, format_version=99)
    cases = {
        "truncated": (data[: len(data) // 2], "backup"),
        "flipped": (bytes(flipped), "SHA-256"),
        "foreign": (make_tar(with_manifest_for({**parts, "vault.db": foreign.read_bytes()})), "not an Aegis database"),
        "newer": (make_tar(newer), "newer"),
        "no-ledger": (make_tar({k: v for k, v in parts.items() if k != "ledger.db"}), "missing ledger.db"),
        "extra": (make_tar({**parts, "../evil": b"x"}), "unexpected member"),
    }
    for name, (content, needle) in cases.items():
        path = aegis.root / f"{name}.backup"
        path.write_bytes(content)
        result = aegis.ctl_in_process("restore", str(path), "--yes")
        assert_failed(result, needle, "nothing was changed")
    garbage = aegis.root / "garbage.backup"
    garbage.write_bytes(b"not a tar at all" * 1000)
    assert_failed(aegis.ctl_in_process("restore", str(garbage), "--yes"), "not a complete Aegis backup")
    # Found by a cold review: the manifest's fields went raw into restore's question (and into the usage error
    # that asks for --yes without a terminal), so a crafted backup could send escapes to the terminal.
    crafted = aegis.root / "crafted.backup"
    crafted.write_bytes(make_tar(with_manifest_for(parts, vault_id="v\x1b]0;pwned\x07\x1b[2J",
                                                   counts={"credentials": "\x9b1m"})))
    asked = aegis.ctl_in_process("restore", str(crafted))
    assert_failed(asked, "--yes", code=2)
    assert not {"\x1b", "\x07", "\x9b"} & set(asked.err), asked.err
    assert r"another vault's backup, vault v\x1b]0;pwned\x07\x1b[2J taken" in asked.err
    assert r"\x9b1m credentials" in asked.err

    after = (status(aegis), listing(aegis, "vault", "list"), listing(aegis, "agent", "list"),
             listing(aegis, "ledger", "show", "--limit", "100000"))
    assert after[0]["vault_id"] == before[0]["vault_id"] and after[0]["state"] == "locked"
    assert after[1:] == before[1:]
    assert not [p for p in aegis.data_dir.iterdir() if p.name.startswith((".restore-", ".backup-"))]
    world.unlock()
    assert listing(aegis, "ledger", "verify")["ok"]
    assert world.call("GET", "/github/echo/y", agent="claude").status == 200

    # Over an existing vault, from another vault: the ledger's chain key must follow the restored vault.
    other = new_aegis()
    try:
        other.start()
        other.init()
        other.add_credential("other", OA_SECRET, "--service", "other", "--domains", up.entry())
        other_backup = aegis.root / "other.backup"
        other.ctl_in_process("backup", str(other_backup)).ok()
        other_id = status(other)["vault_id"]
    finally:
        other.cleanup()
    aegis.ctl_in_process("lock").ok()
    # Another vault's backup over this one: only with this one's passphrase (the test passphrase here too).
    aegis.ctl_in_process("restore", str(other_backup), "--yes", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    world.unlock()  # the same test passphrase, but the other vault's master key
    assert status(aegis)["vault_id"] == other_id and [c["name"] for c in listing(aegis, "vault", "list")] == ["other"]
    assert world.call("GET", "/github/echo/z", agent="claude").status == 401  # claude is not in that vault
    verified = listing(aegis, "ledger", "verify")
    assert verified["ok"], verified
    world.assert_no_leaks()


def test_backup_file_is_replaced_only_when_complete(world: GateWorld) -> None:
    """An unwritable target or a missing daemon leaves any previous backup exactly as it was."""
    aegis = world.aegis
    target = aegis.root / "keep.backup"
    target.write_bytes(b"previous")
    aegis.ctl_in_process("lock").ok()
    aegis.ctl_in_process("backup", str(target)).ok()  # locked is fine: nothing is decrypted
    assert target.read_bytes() != b"previous" and stat.S_IMODE(target.stat().st_mode) == 0o600
    kept = target.read_bytes()
    assert aegis.stop() == 0
    assert_failed(aegis.ctl_in_process("backup", str(target)), "not running")
    assert target.read_bytes() == kept
    assert sorted(p.name for p in aegis.root.iterdir() if "keep" in p.name) == ["keep.backup"]
    aegis.assert_no_leaks(world.secrets)


def test_a_restore_whose_ledger_cannot_be_written_says_so(world: GateWorld) -> None:
    """A good backup whose ledger, once moved into place, cannot be opened for writing (a full disk or a failing
    file system; a directory where SQLite's rollback journal for it would go stands in, as the backup's copy is in
    rollback-journal mode until aegisd opens it): the files are swapped, but the restore exits 1 naming the
    ledger, and the gate forwards nothing. Restoring a good backup once the cause is gone recovers without a
    restart. (Files that SQLite opens read-only, or with a trigger, stood in once; restore now refuses them.)"""
    aegis = world.aegis
    up, good = backed_up(world, "good.backup")
    journal = aegis.data_dir / "ledger.db-journal"

    aegis.ctl_in_process("lock").ok()
    journal.mkdir()
    try:
        result = aegis.ctl_in_process("restore", str(good), "--yes")
        assert_failed(result, "the backup was restored, but its ledger cannot be written")
        assert request(world.port, "GET", "/_aegis/health").json()["ledger"] == "failing"
        assert "cannot reopen the ledger after a restore" in aegis.log()
        world.unlock()
        with untouched(up):
            refused = world.call("GET", "/github/echo/x", agent="claude")
        assert (refused.status, refused.error()["code"]) == (503, "ledger_unavailable")  # no row: none can be written
        aegis.ctl_in_process("lock").ok()
    finally:
        journal.rmdir()
    aegis.ctl_in_process("restore", str(good), "--yes").ok()
    world.unlock()
    assert world.call("GET", "/github/echo/y", agent="claude").status == 200
    assert listing(aegis, "ledger", "verify")["ok"]
    world.assert_no_leaks([result.out, result.err])


def test_a_ledger_that_sqlite_would_open_read_only_is_refused_and_nothing_changes(world: GateWorld) -> None:
    """Found by a cold review: only vault.db's header was checked for the format versions that make SQLite open a
    file read-only (bytes 18 and 19 past 2). A ledger.db with one passed every read-only check, replaced the old
    ledger, and then took no row: the gate forwarded nothing until another restore. It is refused now, before
    anything moves."""
    aegis = world.aegis
    _, good = backed_up(world, "good.backup", before="/echo/before")
    assert world.call("GET", "/github/echo/after-backup", agent="claude").status == 200
    parts = members(good.read_bytes())
    for offset in (18, 19):  # the write version, then the read version
        ledger = bytearray(parts["ledger.db"])
        ledger[offset] = 3
        stuck = aegis.root / f"stuck-{offset}.backup"
        stuck.write_bytes(make_tar(with_manifest_for({**parts, "ledger.db": bytes(ledger)})))
        aegis.ctl_in_process("lock").ok()
        rows = listing(aegis, "ledger", "show", "--limit", "1000")
        result = aegis.ctl_in_process("restore", str(stuck), "--yes")
        assert_failed(result, "ledger.db in the backup has a header SQLite would open read-only")
        assert listing(aegis, "ledger", "show", "--limit", "1000") == rows  # the old ledger, whole
        assert request(world.port, "GET", "/_aegis/health").json()["ledger"] == "ok"
        world.unlock()
        assert world.call("GET", f"/github/echo/after-refusal-{offset}", agent="claude").status == 200
    assert listing(aegis, "ledger", "verify")["ok"]
    world.assert_no_leaks([result.out, result.err])


def test_a_restore_whose_client_goes_away_mid_swap_still_finishes_whole(world: GateWorld) -> None:
    """Found by a cold review: when the client went away (Ctrl-C, or its deadline) during the swap, the daemon
    deleted the staged files and released its lock while the swap thread still ran, and dropped its error:
    the data directory could be left with the backup's ledger and the old vault. The swap now runs to its
    end, the restore is recorded, and the log says how it ended.

    The swap is held up by a write lock on the old ledger (its final checkpoint waits out the busy timeout),
    which gives Ctrl-C a moment inside the swap."""
    aegis = world.aegis
    up, backup = backed_up(world, "before.backup", before="/echo/before")
    world.credential("openai", OA_SECRET, up.entry())  # not in the backup
    assert world.call("GET", "/github/echo/after-backup", agent="claude").status == 200
    aegis.ctl_in_process("lock").ok()

    with restore_held_at_its_swap(aegis, backup) as proc:
        deadline = time.monotonic() + 30
        while not list(aegis.data_dir.glob(".restore-*/ledger.db")):  # checked, staged: the swap is next
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        # Into the swap, which the held lock keeps going for up to the ledger's 5 s busy timeout: near the middle
        # of that, so that a loaded machine may be seconds late starting the swap, or ending the client.
        time.sleep(2.0)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
        time.sleep(0.5)  # the daemon sees its client gone before the lock goes and the swap can end

    deadline = time.monotonic() + 30
    while "a restore whose client went away" not in aegis.log():
        assert time.monotonic() < deadline, aegis.log()[-3000:]
        time.sleep(0.1)
    assert "a restore whose client went away (cancelled, or past its deadline) was completed" in aegis.log()
    assert [c["name"] for c in listing(aegis, "vault", "list")] == ["github"]  # the vault is the backup's...
    rows = listing(aegis, "ledger", "show", "--limit", "1000")
    assert rows[0]["reason"] == "backup_restored"  # ...recorded although the client had gone...
    assert not any(r["path"] == "/echo/after-backup" for r in rows)  # ...and so is the ledger
    assert not list(aegis.data_dir.glob(".restore-*"))
    world.unlock()
    assert listing(aegis, "ledger", "verify")["ok"]
    assert world.call("GET", "/github/echo/restored", agent="claude").status == 200
    world.assert_no_leaks()


def tar_header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % tarfile.BLOCKSIZE)


def extended(payload: bytes, kind: bytes = tarfile.XHDTYPE) -> bytes:
    """An extended header (PAX by default, or a GNU long name) holding `payload`."""
    return tar_header("././@PaxHeader" if kind == tarfile.XHDTYPE else "././@LongLink", len(payload), kind) + \
        padded(payload)


def pax_record(key: str, value: str) -> bytes:
    rest = f" {key}={value}\n"
    length = len(rest)
    while len(f"{length}{rest}") != length:
        length += 1
    return f"{length}{rest}".encode()


def signed_checksum(data: bytes) -> bytes:
    """`data` with its first header given a byte >= 0x80 (in the unused padding at 500-511) and the signed
    checksum, which tarfile accepts as it does the unsigned one (old tars wrote it)."""
    block = bytearray(data[:tarfile.BLOCKSIZE])
    block[511] = 0x80
    block[148:156] = b" " * 8
    signed = sum(b - 256 if b >= 0x80 else b for b in block)
    block[148:156] = b"%06o\0 " % signed
    assert signed != sum(block[:148]) + 256 + sum(block[156:])  # not the unsigned one any more
    return bytes(block) + data[tarfile.BLOCKSIZE:]


def pax_bomb(digits: int) -> bytes:
    """A tar whose first header is a PAX header of `digits` digits: Python's tarfile takes time quadratic in
    that to parse (CVE-2024-6232), 4 s for 40k on 3.11.7."""
    return extended(b"1" * digits) + bytes(1024)


def hidden_bombs(parts: dict[str, bytes]) -> dict[str, bytes]:
    """Backups whose manifest comes first and whole, then a 40k-digit PAX header before vault.db, placed where
    a hand-written walk of the headers (e0804c0's) stopped looking but tarfile does not."""
    manifest, databases = parts["manifest.json"], make_tar({k: v for k, v in parts.items() if k != "manifest.json"})
    first = tar_header("manifest.json", len(manifest)) + padded(manifest)
    bomb = extended(b"1" * 40000)
    return {
        # The walk took a header failing the unsigned checksum for the end; tarfile also takes the signed one.
        "signed": signed_checksum(first) + bomb + databases,
        # The walk took the first size record of a PAX header; tarfile takes the last.
        "twosize": extended(pax_record("size", str(10**12)) + pax_record("size", str(len(manifest)))) + first
        + bomb + databases,
        # The walk skipped a directory's size in data; tarfile reads the next header right after it.
        "dirsize": first + tar_header("d/", 8**11 - 1, tarfile.DIRTYPE) + bomb + databases,
    }


def restore_raw(aegis: Aegis, data: bytes) -> grpc.RpcError:
    """A restore of `data` straight over the control API, past aegisctl's own checks; it must be refused."""
    with grpc.insecure_channel(f"unix:{aegis.socket}") as channel:
        stub = backup_pb2_grpc.BackupServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Restore(iter([backup_pb2.RestoreChunk(data=data)]), timeout=60)
    return refused.value


def assert_invalid_backup(aegis: Aegis, name: str, content: bytes, needle: str) -> grpc.RpcError:
    """The crafted file `content`, sent to the Restore RPC as it is, is refused INVALID_ARGUMENT (`invalid_backup`)
    saying `needle`, and at once: the header is refused before tarfile parses it at length."""
    started = time.monotonic()
    refused = restore_raw(aegis, content)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, refused.code(), refused.details())
    assert needle in (refused.details() or ""), (name, refused.details())
    trailer = refused.trailing_metadata() or ()
    assert any(m.key == "aegis-reason" and str(m.value) == "invalid_backup" for m in trailer), name
    assert time.monotonic() - started < 2.5, name
    return refused


def test_crafted_backups_are_refused_with_invalid_backup_and_change_nothing(world: GateWorld) -> None:
    """Found by a cold review: a manifest time past what can be printed swapped both files and then answered
    INTERNAL with no ledger row; a deeply nested manifest gave INTERNAL (and a traceback in aegisctl); a huge
    PAX header held the daemon's backup lock for minutes; a vault.db whose header makes SQLite open it
    read-only passed every check and failed only after the ledger was replaced. Each is now refused, clearly,
    before anything changes, by the daemon and by aegisctl."""
    aegis = world.aegis
    _, good = backed_up(world, "good.backup", before="/echo/before")
    parts = members(good.read_bytes())
    assert world.call("GET", "/github/echo/after-backup", agent="claude").status == 200
    aegis.ctl_in_process("lock").ok()
    before = (listing(aegis, "vault", "list"), listing(aegis, "ledger", "show", "--limit", "1000"))

    vault = bytearray(parts["vault.db"])
    vault[18] = 3  # the write version: past 2, SQLite opens the file but will not write it
    deep = b'{"format": "aegis-backup", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    hidden = hidden_bombs(parts)
    crafted = {
        "bigtime": (make_tar(with_manifest_for(parts, created_ms=10**20)), "missing fields or has malformed ones"),
        "deep": (make_tar({**parts, "manifest.json": deep}), "nested too deeply"),
        "pax": (pax_bomb(40000), "extended tar header of 40000 bytes"),
        "signed": (hidden["signed"], "extended tar header of 40000 bytes"),
        "twosize": (hidden["twosize"], "extended tar header of 40000 bytes"),
        "longname": (signed_checksum(extended(b"a" * 65536, tarfile.GNUTYPE_LONGNAME)) + make_tar(parts),
                     "extended tar header of 65536 bytes"),
        "chain": (extended(pax_record("comment", "x")) * 400 + make_tar(parts), "more than 12 tar headers"),
        "rovault": (make_tar(with_manifest_for({**parts, "vault.db": bytes(vault)})), "would open read-only"),
    }
    outputs = []
    for name, (content, needle) in crafted.items():
        refused = assert_invalid_backup(aegis, name, content, needle)
        path = aegis.root / f"{name}.backup"
        path.write_bytes(content)
        result = aegis.ctl_in_process("restore", str(path), "--yes")
        if name in ("bigtime", "rovault", "signed", "twosize"):  # aegisctl reads only the manifest, passes them on
            assert_failed(result, needle, "nothing was changed")
        else:  # aegisctl reads the manifest first, and refuses these itself
            assert_failed(result, "not a complete Aegis backup", needle.split(" of ")[0])
        outputs += [result.out, result.err, refused.details() or ""]

    assert status(aegis)["state"] == "locked"
    assert (listing(aegis, "vault", "list"), listing(aegis, "ledger", "show", "--limit", "1000")) == before
    assert "Traceback" not in aegis.log() and "internal error" not in aegis.log()
    assert not [p for p in aegis.data_dir.iterdir() if p.name.startswith((".restore-", ".backup-"))]
    world.unlock()
    assert world.call("GET", "/github/echo/after", agent="claude").status == 200
    assert listing(aegis, "ledger", "verify")["ok"]
    world.assert_no_leaks(outputs)


class CountedReads:
    """A file tarfile opened, counting what is read from it: the bytes, and the furthest offset a read reached."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.read_bytes = 0
        self.furthest = 0

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._real.read(size)
        self.read_bytes += len(data)
        self.furthest = max(self.furthest, self._real.tell())
        return data

    def __getattr__(self, name: str) -> Any:  # seek, tell, close, name, mode...
        return getattr(self._real, name)


@pytest.mark.parametrize("name", ["signed", "twosize", "dirsize"])
def test_aegisctl_reading_every_member_stops_at_an_oversized_tar_header(tmp_path: Path, name: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a cold review: aegisctl's hand-written walk of the headers stopped where tarfile went on, so
    `aegisctl backup`'s check of the whole file (verify_archive) parsed a 40k-digit PAX header after the
    manifest for seconds. tarfile's own parsing is now bounded, wherever the header is: counted, not timed, the
    oversized header's own block is the last thing read, and not one byte of its 40,000 is."""
    parts = {"manifest.json": json.dumps({"format": "aegis-backup"}).encode(), "vault.db": b"v", "ledger.db": b"l"}
    path = tmp_path / f"{name}.backup"
    data = hidden_bombs(parts)[name]
    path.write_bytes(data)
    assert read_manifest(path)["format"] == "aegis-backup"  # the manifest itself is fine
    payload = data.index(b"1" * 40000)  # where the oversized header's records start, right after its own block
    assert len(data) > payload + 40000
    opened: list[CountedReads] = []

    def counted_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> CountedReads:
        opened.append(CountedReads(open(file, mode, *args, **kwargs)))  # noqa: SIM115 - tarfile closes it
        return opened[-1]

    monkeypatch.setattr(tarfile, "bltn_open", counted_open)
    with pytest.raises(ClientError) as refused:
        verify_archive(path)
    assert refused.value.reason == "invalid_backup"
    assert "extended tar header of 40000 bytes" in refused.value.message
    assert len(opened) == 2  # read_manifest's look, then the walk over every member
    walk = opened[-1]
    assert walk.furthest == payload, (walk.furthest, payload, len(data))  # reached the header, read none of it
    # Nothing past it either, in either pass; a small extended header is read twice (aegisctl's look for GNU
    # sparse records, then tarfile's parse), so a pass may read a block more than it passes over.
    for counted in opened:
        assert counted.furthest <= payload and counted.read_bytes <= payload + tarfile.BLOCKSIZE, vars(counted)


def test_a_vault_open_in_another_process_stops_the_restore_before_the_ledger_is_replaced(world: GateWorld) -> None:
    """Found by a cold review: the check that no other process reads vault.db ran only after the ledger had been
    swapped, so its failure lost the old ledger. Every check now runs before anything is replaced."""
    aegis = world.aegis
    _, backup = backed_up(world, "before.backup")
    assert world.call("GET", "/github/echo/after-backup", agent="claude").status == 200
    aegis.ctl_in_process("lock").ok()
    rows = listing(aegis, "ledger", "show", "--limit", "1000")

    reader = sqlite3.connect(aegis.data_dir / "vault.db")
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM meta").fetchone()
        result = aegis.ctl_in_process("restore", str(backup), "--yes")
    finally:
        reader.close()
    assert_failed(result, "nothing was restored", "open in another process")
    assert listing(aegis, "ledger", "show", "--limit", "1000") == rows  # the old ledger, whole
    assert any(r["path"] == "/echo/after-backup" for r in rows)
    aegis.ctl_in_process("restore", str(backup), "--yes").ok()  # closed: the retry goes through
    assert not any(r["path"] == "/echo/after-backup" for r in listing(aegis, "ledger", "show", "--limit", "1000"))
    world.unlock()
    assert listing(aegis, "ledger", "verify")["ok"]
    world.assert_no_leaks([result.out, result.err])


def test_a_ledger_read_during_the_swap_stops_the_restore_before_anything_is_replaced(world: GateWorld) -> None:
    """Found by a review: a reader of ledger.db in a transaction (`ledger verify`, `stats`, `export`, or another
    process) kept the checkpoint before the ledger's swap from emptying its write-ahead log; the restore went on,
    moved the backup's ledger in, and only then removed the old log: a crash in between left the restored file
    beside the old log, which SQLite applies to it at the next open. The swap now waits for the reader (the
    ledger's busy timeout), then refuses, and nothing is restored; once the reader is done, the retry goes through.
    The mark of an earlier restore a crash cut off stays through the refused one (the review of the mark: a failed
    retry removed it, and with it the only lasting trace) and goes with the one that completes."""
    aegis = world.aegis
    _, backup = backed_up(world, "before.backup", before="/echo/before")
    assert world.call("GET", "/github/echo/after-backup", agent="claude").status == 200
    earlier = aegis.data_dir / "restore-in-progress"  # as a restore cut off by a crash leaves it
    earlier.write_text('{"started_ms": 1700000000000, "backup_created_ms": 1690000000000, "vault_id": "earlier"}')
    earlier.chmod(0o600)

    reader = sqlite3.connect(f"{(aegis.data_dir / 'ledger.db').as_uri()}?mode=ro", uri=True)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM ledger").fetchone()
        assert world.call("GET", "/github/echo/while-read", agent="claude").status == 200  # past its snapshot
        aegis.ctl_in_process("lock").ok()
        rows = listing(aegis, "ledger", "show", "--limit", "1000")
        result = aegis.ctl_in_process("restore", str(backup), "--yes")
    finally:
        reader.close()
    assert_failed(result, "nothing was restored", "ledger.db is being read", "run the restore again")
    assert '"vault_id": "earlier"' in earlier.read_text()  # kept as it was
    assert listing(aegis, "ledger", "show", "--limit", "1000") == rows  # the old ledger, whole
    assert any(r["path"] == "/echo/while-read" for r in rows)
    assert status(aegis)["state"] == "locked"
    aegis.ctl_in_process("restore", str(backup), "--yes").ok()  # the reader is gone: the retry goes through
    assert not earlier.exists()
    rows = listing(aegis, "ledger", "show", "--limit", "1000")
    assert not any(r["path"] in ("/echo/after-backup", "/echo/while-read") for r in rows)
    assert any(r["path"] == "/echo/before" for r in rows)
    assert [r["reason"] for r in rows].count("backup_restored") == 1
    world.unlock()
    assert listing(aegis, "ledger", "verify")["ok"]
    assert world.call("GET", "/github/echo/restored", agent="claude").status == 200
    world.assert_no_leaks([result.out, result.err])


def test_a_restore_that_fails_after_the_ledger_moved_is_logged_and_recorded(world: GateWorld) -> None:
    """Found by a cold review: once the backup's ledger had been moved into place, a failure of the vault's swap
    answered "the restore failed half-way" but left no ledger row and no log line: the rows written after the
    backup vanished without a trace. The failure is now logged and recorded in the ledger that is in place.

    The vault's swap is made to fail by a directory where its old -shm is, which it cannot remove."""
    aegis = world.aegis
    _, backup = backed_up(world, "before.backup", before="/echo/before")
    assert world.call("GET", "/github/echo/after-backup", agent="claude").status == 200
    aegis.ctl_in_process("lock").ok()
    shm = aegis.data_dir / "vault.db-shm"
    shm.unlink(missing_ok=True)
    shm.mkdir()
    try:
        result = aegis.ctl_in_process("restore", str(backup), "--yes")
    finally:
        shm.rmdir()
    assert_failed(result, "the restore failed half-way", "the ledger was replaced but the vault was not")

    rows = listing(aegis, "ledger", "show", "--limit", "1000")
    assert not any(r["path"] == "/echo/after-backup" for r in rows)  # the backup's ledger is in place...
    assert any(r["path"] == "/echo/before" for r in rows)
    recorded = [r for r in rows if r["reason"] == "backup_restore_incomplete"]  # ...and says how it got there
    assert len(recorded) == 1, rows
    detail = recorded[0]["detail"]
    assert "replaced by the one in a backup taken" in detail and "the vault was not replaced" in detail, detail
    assert "rows written after the backup was taken are gone" in detail, detail
    assert not any(r["reason"] == "backup_restored" for r in rows)
    errors = [line for line in aegis.log().splitlines() if " error " in line and "restore failed half-way" in line]
    assert errors, aegis.log()[-3000:]

    # The store could not reopen the old vault file either while its -shm was a directory, and does not try again
    # by itself: a restart opens it, and the retry completes the restore.
    assert aegis.stop() == 0
    aegis.start()
    aegis.ctl_in_process("restore", str(backup), "--yes").ok()
    world.unlock()
    assert listing(aegis, "ledger", "verify")["ok"]
    assert world.call("GET", "/github/echo/restored", agent="claude").status == 200
    world.assert_no_leaks([result.out, result.err])
    aegis.assert_no_leaks([PASSPHRASE])


def gnu_sparse_header(name: str, extension_blocks: int, *, truncated: bool = False) -> bytes:
    """An old-GNU sparse member header (type S) followed by `extension_blocks` sparse extension blocks, each
    saying another follows; the last one ends the chain unless `truncated` (the file then just ends)."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.GNUTYPE_SPARSE
    block = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    block[482] = 1  # isextended
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    extension = bytearray(tarfile.BLOCKSIZE)
    for i in range(21):
        extension[i * 24:i * 24 + 24] = b"%011o\0%011o\0" % (i + 1, 1)
    extension[504] = 1
    data = bytes(block) + bytes(extension) * extension_blocks
    if not truncated:
        extension[504] = 0
        data += bytes(extension) + bytes(2 * tarfile.BLOCKSIZE)
    return data


def pax_tar(parts: dict[str, bytes], pax: dict[str, dict[str, str]]) -> bytes:
    """`parts` as a PAX tar, member `name` carrying the PAX records pax[name]."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in parts.items():
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(data), pax.get(name, {})
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def sparse_and_broken_headers(parts: dict[str, bytes]) -> dict[str, bytes]:
    """Tar headers Aegis never writes whose parsing raised ValueError or IndexError in tarfile, or read without
    bound: each made aegisd answer INTERNAL (or aegisctl print a traceback) instead of refusing the file."""
    manifest = {"manifest.json": parts["manifest.json"]}
    return {
        # On vault.db, past the manifest aegisctl reads: only the daemon sees it.
        "paxmap": pax_tar(parts, {"vault.db": {"GNU.sparse.map": "abc"}}),
        "pax10": pax_tar(manifest, {"manifest.json": {"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}})[:-1024],
        "realsize": pax_tar(manifest, {"manifest.json": {"GNU.sparse.realsize": "abc"}}),
        "gnutrunc": gnu_sparse_header("manifest.json", 1, truncated=True),
        # 200 extension blocks that tarfile read past the 12-header bound (48 MiB held it 6 s, 190 MiB of memory).
        "gnulong": gnu_sparse_header("manifest.json", 200),
    }


def test_sparse_and_malformed_tar_headers_are_refused_as_invalid_backups(world: GateWorld) -> None:
    """Found by a cold review: GNU sparse headers (a `GNU.sparse.*` PAX record, an old-GNU sparse member) made
    tarfile raise ValueError or IndexError, which aegisd answered as an internal error and aegisctl as a
    traceback, and their extension blocks were read without counting against the header bound. Aegis never
    writes them: they are refused before tarfile reads them, and any such parsing error is an invalid backup."""
    aegis = world.aegis
    _, good = backed_up(world, "good.backup", before="/echo/before")
    parts = members(good.read_bytes())
    aegis.ctl_in_process("lock").ok()
    before = (listing(aegis, "vault", "list"), listing(aegis, "ledger", "show", "--limit", "1000"))
    crafted = {name: (content, "sparse") for name, content in sparse_and_broken_headers(parts).items()}
    # A PAX size past any offset: tarfile raised ValueError seeking to the next header.
    crafted["hugesize"] = (pax_tar(parts, {"manifest.json": {"size": str(10**30)}}), "not a complete tar archive")
    outputs = []
    for name, (content, needle) in crafted.items():
        refused = assert_invalid_backup(aegis, name, content, needle)
        path = aegis.root / f"{name}.backup"
        path.write_bytes(content)
        result = aegis.ctl_in_process("restore", str(path), "--yes")
        if name == "paxmap":  # aegisctl reads only the manifest and passes it on
            assert_failed(result, needle, "nothing was changed")
        else:
            assert_failed(result, "not a complete Aegis backup")
        outputs += [result.out, result.err, refused.details() or ""]

    assert (listing(aegis, "vault", "list"), listing(aegis, "ledger", "show", "--limit", "1000")) == before
    assert "Traceback" not in aegis.log() and "internal error" not in aegis.log()
    assert not [p for p in aegis.data_dir.iterdir() if p.name.startswith((".restore-", ".backup-"))]
    aegis.ctl_in_process("restore", str(good), "--yes").ok()
    world.unlock()
    assert listing(aegis, "ledger", "verify")["ok"]
    world.assert_no_leaks(outputs)
    aegis.assert_no_leaks([PASSPHRASE])


@pytest.mark.parametrize("name", ["paxmap", "pax10", "realsize", "gnutrunc", "gnulong"])
def test_aegisctl_checking_a_whole_backup_refuses_sparse_tar_headers(tmp_path: Path, name: str) -> None:
    """The same headers after a good manifest, where only `aegisctl backup`'s check of the whole file reads them:
    an invalid backup, never a traceback."""
    parts = {"manifest.json": json.dumps({"format": "aegis-backup"}).encode(), "vault.db": b"v", "ledger.db": b"l"}
    content = sparse_and_broken_headers(parts)[name]
    if name != "paxmap":  # put the manifest first, whole, and the crafted header after it
        content = tar_header("manifest.json", len(parts["manifest.json"])) + padded(parts["manifest.json"]) + content
    path = tmp_path / f"{name}.backup"
    path.write_bytes(content)
    with pytest.raises(ClientError) as refused:
        verify_archive(path)
    assert refused.value.reason == "invalid_backup"


def test_a_restore_cut_off_by_a_crash_is_reported_until_one_completes(world: GateWorld) -> None:
    """Found by a crash-consistency review: a kill during the swap (after the ledger moved, before the vault did,
    or before the restore's row) left the backup's ledger beside the old vault, or no `backup_restored` row, with
    nothing to say so. The mark the restore writes before its first move tells every start (log, ledger row) and
    doctor until a restore completes. The swap is held at its first move by a write lock on the old ledger."""
    aegis = world.aegis
    _, backup = backed_up(world, "before.backup", before="/echo/before")
    aegis.ctl_in_process("lock").ok()
    with restore_held_at_its_swap(aegis, backup) as proc:
        deadline = time.monotonic() + 30
        while not (aegis.data_dir / "restore-in-progress").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        aegis.kill()  # mid-swap

    aegis.start()
    assert "a restore was cut off by a stop (begun " in aegis.log()
    doctor = json.loads(aegis.ctl_in_process("doctor", "--json").out)
    check = next(c for c in doctor["checks"] if c["name"] == "restore")
    assert check["status"] == "fail" and "run the restore again" in check["hint"], check
    world.unlock()  # the row, held until the ledger has its key, commits soon after
    deadline = time.monotonic() + 20
    while not any(r["reason"] == "backup_restore_interrupted" for r in listing(aegis, "ledger", "show")):
        assert time.monotonic() < deadline, listing(aegis, "ledger", "show")
        time.sleep(0.05)

    aegis.ctl_in_process("lock").ok()
    aegis.ctl_in_process("restore", str(backup), "--yes").ok()  # run again, to its end: the mark goes
    assert not (aegis.data_dir / "restore-in-progress").exists()
    doctor = json.loads(aegis.ctl_in_process("doctor", "--json").out)
    assert next(c for c in doctor["checks"] if c["name"] == "restore")["status"] == "pass"
    world.assert_no_leaks()
