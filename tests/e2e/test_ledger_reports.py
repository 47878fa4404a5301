"""`aegisctl ledger stats|export|prune` against a real daemon, real gate traffic and a real upstream."""

from __future__ import annotations

import csv
import json
import os
import pty
import random
import re
import select
import signal
import sqlite3
import stat
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from aegisd.api.aegis.v1 import ledger_pb2, ledger_pb2_grpc
from aegisd.config import STOP_GRACE_SECONDS
from aegisd.control.ledger_service import EXPORT_BATCH, MAX_LIMIT
from tests.e2e.gate_support import GateWorld, raw_exchange
from tests.e2e.ledger_fill import FORMULA_EVERY, FORMULAS, T0, fill, formula_rows
from tests.e2e.support import assert_failed
from tests.harness import AEGISCTL, PASSPHRASE, Aegis, new_aegis

SECRET = "ghp_reportsSecret0123456789abcdefXYZ"
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@pytest.fixture
def world() -> Iterator[GateWorld]:
    world = GateWorld.start()
    yield world
    world.close()


def stats(aegis: Aegis, *args: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(aegis.ctl_in_process("ledger", "stats", "--json", *args).ok().out)
    return value


def show(aegis: Aegis, *args: str) -> list[dict[str, Any]]:
    """`ledger show --json`, run in this process (the command line itself is tested by the other reads)."""
    value: list[dict[str, Any]] = json.loads(aegis.ctl_in_process("ledger", "show", "--json", *args).ok().out)
    return value


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_stats_export_and_prune(world: GateWorld) -> None:
    aegis = world.aegis
    up = world.upstream()
    world.credential("github", SECRET, up.entry(), "--scopes", "read")
    world.agent("claude", "github")
    world.agent("cursor")
    for _ in range(3):
        assert world.call("GET", "/github/echo/a", agent="claude").status == 200
    assert world.call("HEAD", "/github/echo/b", agent="claude").status == 200
    assert world.call("GET", "/github/echo/c", agent="cursor").status == 403  # not granted
    assert world.call("GET", "/github/echo/d").status == 401  # no token
    assert world.call("DELETE", "/github/echo/e", agent="claude").status == 403  # outside the scopes

    everything = stats(aegis)
    assert everything["requests"] == 7 and everything["allowed"] == 4 and everything["denied"] == 3
    assert everything["rows"] == everything["requests"] + everything["system_events"]
    assert {d["decision"]: d["count"] for d in everything["by_decision"]} == {"allowed": 4, "denied": 3}
    assert everything["by_service"] == [{"service": "github", "requests": 7, "denied": 3}]
    assert sum(r["count"] for r in everything["by_reason"]) == 3
    assert {"reason": "not_granted", "count": 1} in everything["by_reason"]
    assert everything["top_agents"][0] == {"agent": "claude", "requests": 5, "denied": 1}
    assert stats(aegis, "--agent", "cursor")["requests"] == 1
    assert stats(aegis, "--blocked")["denied"] == 3 and stats(aegis, "--blocked")["allowed"] == 0
    assert stats(aegis, "--since", "2099-01-01")["rows"] == 0
    # Found by a cold review: a bound at the epoch was sent as 0, which meant "no bound", so `--until 1970-01-01`
    # matched every row instead of none.
    epoch = "1970-01-01T00:00:00Z"
    assert stats(aegis, "--until", epoch)["rows"] == 0
    assert stats(aegis, "--since", epoch)["rows"] == everything["rows"]
    assert json.loads(aegis.ctl_in_process("ledger", "show", "--json", "--until", epoch).ok().out) == []
    assert aegis.ctl_in_process("ledger", "export", "--until", epoch).ok().out == ""
    assert len(show(aegis, "--since", epoch, "--limit", "1000")) == everything["rows"]
    assert stats(aegis, "--top", "1")["top_agents"] == [everything["top_agents"][0]]
    human = aegis.ctl_in_process("ledger", "stats").ok().out
    assert "claude" in human and "not_granted" in human and "denied:" in human

    # Exports: the same rows, oldest first, in three formats, written 0600.
    shown = [r for r in json.loads(aegis.ctl_in_process("ledger", "show", "--json", "--limit", "1000").ok().out)]
    out = aegis.root / "out"
    out.mkdir()
    for fmt in ("csv", "json", "jsonl"):
        result = aegis.ctl_in_process("ledger", "export", "--format", fmt, "-o", str(out / f"all.{fmt}")).ok()
        assert result.out == "" and f"Exported {len(shown)} rows" in result.err
        assert mode(out / f"all.{fmt}") == 0o600
        assert "exported " not in result.err.replace("Exported", "")  # no progress counter off a terminal
    as_json = json.loads((out / "all.json").read_text())
    as_jsonl = [json.loads(line) for line in (out / "all.jsonl").read_text().splitlines()]
    assert as_json == as_jsonl == list(reversed(shown))
    with (out / "all.csv").open(newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [int(r["id"]) for r in table] == [r["id"] for r in as_json]
    assert table[0].keys() == as_json[0].keys()
    assert [{k: str(v) for k, v in r.items()} for r in as_json] == table  # same values, as text
    # Filters as `show` has them, and stdout when no -o.
    piped = aegis.ctl_in_process("ledger", "export", "--format", "jsonl", "--agent", "claude", "--blocked").ok()
    assert [json.loads(line)["method"] for line in piped.out.splitlines()] == ["DELETE"]
    assert piped.err == ""
    empty = aegis.ctl_in_process("ledger", "export", "--format", "json", "--since", "2099-01-01").ok()
    assert json.loads(empty.out) == []
    bad = aegis.ctl_in_process("ledger", "export", "--format", "xml")
    assert_failed(bad, "xml", code=2)
    nowhere = aegis.ctl_in_process("ledger", "export", "-o", str(aegis.root / "missing" / "x.csv"))
    assert_failed(nowhere, "cannot write in")
    assert not (aegis.root / "missing").exists()

    # Prune: refused without --yes off a terminal, then the chain still verifies from the checkpoint.
    refused = aegis.ctl_in_process("ledger", "prune", "--before", "0s")
    assert_failed(refused, "--yes", code=2)
    assert stats(aegis)["rows"] == everything["rows"] + 0  # nothing deleted (stats reads add no rows)
    future = aegis.ctl_in_process("ledger", "prune", "--before", "2099-01-01", "--yes")
    assert_failed(future, "future")
    # Found by a cold review: times no row can precede, or that no ISO 8601 form can show, crashed aegisctl
    # (a traceback from formatting the time) or were refused by aegisd as "give the time": usage errors now.
    for before in ("1960-01-01", "1970-01-01T00:00:00Z", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00",
                   "999999999w"):
        assert_failed(aegis.ctl_in_process("ledger", "prune", "--before", before, "--yes"), "--before", code=2)
    assert "not after 1970-01-01T00:00:00Z" in aegis.ctl_in_process("ledger", "prune", "--before", "1960-01-01",
                                                                     "--yes").err
    last = as_json[-1]
    pruned = json.loads(aegis.ctl_in_process("ledger", "prune", "--before", last["time"], "--yes", "--json").ok().out)
    first_kept = next(r["id"] for r in as_json if r["time"] >= last["time"])
    assert pruned["first_kept_id"] == first_kept and pruned["pruned"] == first_kept - 1
    verified = json.loads(aegis.ctl_in_process("ledger", "verify", "--json").ok().out)
    assert verified["ok"] and verified["first_id"] == first_kept
    assert "pruned at an authentic checkpoint" in aegis.ctl_in_process("ledger", "verify").ok().out
    newest = json.loads(aegis.ctl_in_process("ledger", "show", "--json", "--limit", "1").ok().out)[0]
    assert newest["kind"] == "system" and newest["reason"] == "ledger_pruned"
    assert f"{pruned['pruned']} rows" in newest["detail"]
    assert "Nothing to prune" in aegis.ctl_in_process("ledger", "prune", "--before", last["time"], "--yes").ok().out
    assert world.call("GET", "/github/echo/after", agent="claude").status == 200
    assert aegis.ctl_in_process("ledger", "verify").ok()

    # After a restart the key is unknown until the vault unlocks: prune refuses, precisely.
    assert aegis.stop() == 0
    aegis.start()
    locked = aegis.ctl_in_process("ledger", "prune", "--before", "0s", "--yes")
    assert_failed(locked, "unlock")
    world.unlock()
    assert json.loads(aegis.ctl_in_process("ledger", "verify", "--json").ok().out)["first_id"] == first_kept
    world.assert_no_leaks([p.read_text() for p in out.iterdir()])


def filled(rows: int) -> Iterator[Aegis]:
    """A daemon whose fresh ledger already holds `rows` rows, written with the real writer before start."""
    aegis = new_aegis()
    try:
        aegis.data_dir.mkdir(mode=0o700, parents=True)
        fill(aegis.data_dir / "ledger.db", rows)
        aegis.start()
        yield aegis
    finally:
        aegis.cleanup()


# More rows than `ledger show` may list at once (MAX_LIMIT), in 120 export batches: an export is bounded
# by neither. (Export memory is measured by `make bench`, not here.)
BIG_ROWS = 120_000


@pytest.fixture
def big() -> Iterator[Aegis]:
    assert BIG_ROWS >= MAX_LIMIT + 20 * EXPORT_BATCH
    yield from filled(BIG_ROWS)


@pytest.fixture
def medium() -> Iterator[Aegis]:
    yield from filled(50_000)


def test_export_120k_rows_streams_and_neutralises_formulas(big: Aegis) -> None:
    aegis = big
    total = stats(aegis)["rows"]
    assert total >= BIG_ROWS
    out = aegis.root / "ledger.csv"
    result = aegis.ctl("ledger", "export", "--format", "csv", "-o", str(out), timeout=300).ok()
    assert f"Exported {total} rows" in result.err and mode(out) == 0o600
    with out.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = list(reader)
    assert len(rows) == total
    ids = [int(r[0]) for r in rows]
    assert ids == sorted(ids) and ids[0] == 1 and ids[BIG_ROWS - 1] == BIG_ROWS
    method, reason, flags, detail, path = (header.index(c) for c in ("method", "reason", "flags", "detail", "path"))
    evil = [r for r in rows if r[reason] and int(r[0]) <= BIG_ROWS]
    assert len(evil) == formula_rows(BIG_ROWS)
    for row in evil:
        original = FORMULAS[(int(row[0]) - 1) // FORMULA_EVERY % len(FORMULAS)]
        for column in (method, reason, flags, detail):
            assert row[column] == "'" + original, row  # inert, and the original text is still there
        assert row[path] == '/repos/a,b/"quoted"\nline'  # commas, quotes and newlines survive the round trip
    assert not any(cell.startswith(FORMULA_START) for row in rows for cell in row)

    # A filtered JSON export of the same ledger is one valid array, across batches (1,000 rows each).
    claude = aegis.root / "claude.json"
    until = datetime.fromtimestamp((T0 + 10_000) / 1000, UTC).isoformat()
    aegis.ctl_in_process("ledger", "export", "--format", "json", "--agent", "claude", "--until", until, "-o",
                         str(claude)).ok()
    exported = json.loads(claude.read_text())
    assert [r["id"] for r in exported] == list(range(1, 10_001, 3)) and {r["agent"] for r in exported} == {"claude"}

    # Found by a cold review: an export client that stops reading (^Z, a paused pipeline) held up aegisd's stop
    # for as long as it stayed stopped: grpc ends the call after the grace, then waits for a connection whose
    # buffer the client no longer empties. aegisd now closes such connections itself.
    target = aegis.root / "stalled.jsonl"
    stalled = subprocess.Popen([AEGISCTL, "ledger", "export", "-o", str(target)], env=aegis.base_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size for p in aegis.root.glob(".stalled.jsonl.*.partial")):
            assert stalled.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(stalled.pid, signal.SIGSTOP)  # mid-stream: about 20 MB are still to come
        started = time.monotonic()
        assert aegis.stop(timeout=STOP_GRACE_SECONDS + 20) == 0
        assert time.monotonic() - started < STOP_GRACE_SECONDS + 5
        assert "control: 1 client connection stopped reading and held up the stop; closed" in aegis.log()
    finally:
        os.kill(stalled.pid, signal.SIGCONT)
        stalled.kill()
        stalled.wait(30)


def test_failed_export_leaves_no_file(medium: Aegis) -> None:
    """The daemon dies mid-export: aegisctl exits 1 and neither the file nor its temporary remains."""
    aegis = medium
    target = aegis.root / "out" / "ledger.jsonl"
    target.parent.mkdir()
    target.write_text("previous export\n")
    proc = subprocess.Popen([AEGISCTL, "ledger", "export", "--format", "jsonl", "-o", str(target)],
                            env=aegis.base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert aegis.proc is not None
    daemon = aegis.proc.pid
    try:
        deadline = time.monotonic() + 60
        while not list(target.parent.glob(".ledger.jsonl.*.partial")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        os.kill(daemon, signal.SIGSTOP)  # frozen mid-stream: the export cannot finish before the kill
        os.kill(daemon, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, (out, err)
    assert "aegisctl: error:" in err and "Traceback" not in err
    assert sorted(p.name for p in target.parent.iterdir()) == ["ledger.jsonl"]
    assert target.read_text() == "previous export\n"  # the old file is untouched
    assert out == ""


OLD = 100  # rows an older aegisd stored whole, below


def test_rows_near_any_size_page_through_show_export_and_stats() -> None:
    """Found by a cold review: an unauthenticated client sent requests with 60 KB paths and service
    segments (the gate takes heads of up to 64 KiB); the ledger stored them whole, and `ledger show`,
    `export` and `stats` then failed with "Received message larger than max". Rows now keep at most 2,048
    characters per field, and every reply is cut by size as well as by rows, also for rows an older aegisd
    stored whole."""
    aegis = new_aegis()
    try:
        aegis.start()
        aegis.init()
        long_path, long_service = "/" + "p" * 60_000, "s" * 60_000
        for n in range(40):
            for target in (f"/svc{long_path}", f"/{n:03d}{long_service}/x"):
                reply = raw_exchange(aegis.gate_port, f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                     "Connection: close\r\n\r\n".encode())
                assert reply.status == 401
        rows = json.loads(aegis.ctl_in_process("ledger", "show", "--json", "--limit", "1000").ok().out)
        requests = [r for r in rows if r["kind"] == "request"]
        assert len(requests) == 80
        paths = {r["path"] for r in requests if r["service"] == "svc"}
        marker = "...[truncated: 60001 characters]"
        assert paths == {long_path[: 2048 - len(marker)] + marker}, {len(p) for p in paths}
        services = sorted(r["service"] for r in requests if r["service"] != "svc")
        marker = "...[truncated: 60003 characters]"
        assert services[0] == ("000" + long_service)[: 2048 - len(marker)] + marker
        assert all(len(s) == 2048 for s in services) and len(set(services)) == 40

        # Rows an older aegisd stored whole (put in the file behind the running daemon's back, which reads them
        # the same): 100 of 180 KB, 18 MB, four times what a reply may hold; and 100 service names of 60 KB, so
        # `stats` too needs its keys cut to fit.
        conn = sqlite3.connect(aegis.data_dir / "ledger.db")
        with conn:
            conn.executemany(
                "INSERT INTO ledger (kind, time_ms, request_id, agent, credential, service, method, path, "
                "target_host, decision, reason, status, duration_ms, bytes_in, bytes_out, flags, detail) VALUES "
                "('request', ?, '', '', '', ?, 'GET', ?, ?, 'denied', 'agent_auth_required', 401, 0, 0, 0, '', '')",
                [(1_700_000_000_000 + n, f"{n:03d}{long_service}", long_path, long_service) for n in range(OLD)])
        conn.close()
        listed = json.loads(aegis.ctl_in_process("ledger", "show", "--json", "--limit", "1000").ok().out)
        assert len(listed) == len(rows) + OLD
        assert [r["id"] for r in listed] == sorted({r["id"] for r in listed}, reverse=True)  # newest first, none twice
        assert sum(len(r["path"]) == len(long_path) for r in listed) == OLD  # shown as stored
        assert aegis.ctl_in_process("ledger", "show", "--limit", str(OLD)).ok().out.count("\n") == OLD + 1  # a header
        out = aegis.root / "all.jsonl"
        exported = aegis.ctl_in_process("ledger", "export", "-o", str(out)).ok()
        assert f"Exported {len(listed)} rows" in exported.err
        assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [r["id"] for r in reversed(listed)]
        counted = stats(aegis)
        assert counted["requests"] == 80 + OLD and len(counted["by_service"]) == 41 + OLD
        assert max(len(g["service"]) for g in counted["by_service"]) == 2048  # old keys are cut in the reply
        assert aegis.ctl_in_process("ledger", "stats").code == 0
        aegis.assert_no_leaks([PASSPHRASE])
    finally:
        aegis.cleanup()


def on_terminal(aegis: Aegis, *args: str, until: bytes | None = None) -> bytes:
    """What `aegisctl args` writes to a terminal (a pty): run to the end, or until `until` appears."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([AEGISCTL, *args], stdout=slave, stderr=slave, stdin=subprocess.DEVNULL,
                            env=aegis.base_env())
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and (until is None or until not in seen):
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the program ended and the pty is closed
                    break
                if not data:
                    break
                seen += data
            elif proc.poll() is not None and until is None:
                break
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(30)
        os.close(master)
    return seen


def test_what_agents_sent_reaches_the_terminal_escaped() -> None:
    """Found by a cold review: service names are stored percent-decoded, and `ledger show`, `follow` and
    `stats` printed them raw, so an unauthenticated request could move the operator's cursor, erase lines,
    retitle the window (OSC) or send C1 controls. Every cell printed for people now shows control characters
    as escapes, and (29th stop) zero-width and direction marks too, with which `git\u200bhub` read as `github`;
    --json stays JSON (which escapes them itself) and -o files stay exact."""
    aegis = new_aegis()
    try:
        aegis.start()
        aegis.init()
        service = "\x1b[1A\x1b[2K\x1b]0;pwned\x07\u009b31m\x7f\u202esvc\u200bgit\u200fhub"
        target = "/%1b%5b1A%1b%5b2K%1b%5d0%3bpwned%07%c2%9b31m%7f%e2%80%aesvc%e2%80%8bgit%e2%80%8fhub/x"
        reply = raw_exchange(aegis.gate_port, f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             "Connection: close\r\n\r\n".encode())
        assert reply.status == 401
        shown = r"\x1b[1A\x1b[2K\x1b]0;pwned\x07\x9b31m\x7f\u202esvc\u200bgit\u200fhub"
        raw_controls = (b"\x1b", b"\x07", b"\x7f", *(c.encode() for c in "\u009b\u202e\u200b\u200f"))
        follow = on_terminal(aegis, "ledger", "follow", "-n", "5", until=b"pwned")
        for args in (("ledger", "show"), ("ledger", "stats"), ("ledger", "export", "--format", "csv")):
            out = on_terminal(aegis, *args)
            for got in (out, follow):
                assert shown.encode() in got, (args, got)
                assert not any(control in got for control in raw_controls), (args, got)

        as_json = aegis.ctl("ledger", "show", "--json").ok().out
        assert "\\u001b[1A" in as_json and "\x1b" not in as_json
        assert any(r["service"] == service for r in json.loads(as_json))  # the value itself is exact
        assert stats(aegis)["by_service"][0]["service"] == service
        exported = aegis.root / "out.csv"
        aegis.ctl("ledger", "export", "--format", "csv", "-o", str(exported)).ok()
        with exported.open(newline="") as fh:
            assert service in {row["service"] for row in csv.DictReader(fh)}  # files keep the data exact
        aegis.assert_no_leaks([PASSPHRASE], [follow.decode(errors="replace")])
    finally:
        aegis.cleanup()


def test_an_empty_text_filter_selects_the_rows_with_none(world: GateWorld) -> None:
    """`--agent ""` used to mean no filter at all, so the rows without an agent (unauthenticated refusals, the
    daemon's own rows) could not be picked out. Now it selects exactly those, in show, stats and export, and
    likewise for --service and --credential; a filter not given still matches every row."""
    aegis = world.aegis
    up = world.upstream()
    world.credential("github", SECRET, up.entry())
    world.agent("claude", "github")
    assert world.call("GET", "/github/echo/a", agent="claude").status == 200
    assert world.call("GET", "/github/echo/b").status == 401  # no token: no agent on the row
    everything = json.loads(aegis.ctl_in_process("ledger", "show", "--json", "--limit", "1000").ok().out)
    assert {r["agent"] for r in everything} == {"claude", ""}

    for option in ("agent", "service", "credential"):
        expected = [r["id"] for r in everything if r[option] == ""]
        assert expected and len(expected) < len(everything), option  # both kinds present: the filter shows
        shown = show(aegis, "--limit", "1000", f"--{option}", "")
        assert [r["id"] for r in shown] == expected, option
        assert stats(aegis, f"--{option}", "")["rows"] == len(expected), option
        exported = aegis.ctl_in_process("ledger", "export", "--format", "jsonl", f"--{option}", "").ok().out
        assert [json.loads(line)["id"] for line in exported.splitlines()] == list(reversed(expected)), option

    nobody = json.loads(aegis.ctl_in_process("ledger", "show", "--json", "--agent", "", "--limit", "1000").ok().out)
    assert any(r["status"] == 401 for r in nobody) and any(r["kind"] == "system" for r in nobody)
    assert len(show(aegis, "--limit", "1000")) == len(everything)
    assert stats(aegis)["rows"] == len(everything)
    assert [r["agent"] for r in show(aegis, "--agent", "claude")] == ["claude"]
    # A client that knows nothing of presence sends no field for "": every row, as before.
    with grpc.insecure_channel(f"unix:{aegis.socket}") as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        legacy = ledger_pb2.LedgerFilter.FromString(ledger_pb2.LedgerFilter(blocked=False).SerializeToString())
        reply = stub.ListEntries(ledger_pb2.ListEntriesRequest(filter=legacy, limit=1000), timeout=30)
    assert len(reply.records) >= len(everything)
    world.assert_no_leaks()


def test_prune_says_its_cutoff_in_utc_and_in_words(unlocked: Aegis) -> None:
    """Found by a walkthrough: `--before 2m` deletes rows older than 2 *minutes*, easily read as months. The
    question and the report give the absolute cutoff (UTC) and how long ago it is, and the report the count."""
    iso = r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)"

    def cutoff(text: str) -> datetime:
        found = re.search(f"before {iso} \\(2 minutes ago\\)", text)
        assert found, text
        return datetime.fromisoformat(found.group(1).replace("Z", "+00:00"))

    asked = unlocked.ctl_in_process("ledger", "prune", "--before", "2m")  # off a terminal: the question, and --yes
    assert_failed(asked, "--yes", "Delete every ledger row recorded before", code=2)
    now = datetime.now(UTC)
    assert now - timedelta(seconds=130) <= cutoff(asked.err) <= now - timedelta(seconds=110)
    rows = stats(unlocked)["rows"]
    assert rows > 0  # the vault's creation and unlock, all newer than 2 minutes
    nothing = unlocked.ctl_in_process("ledger", "prune", "--before", "2m", "--yes").ok().out
    assert nothing.startswith("Nothing to prune: no rows recorded before ")
    assert now - timedelta(seconds=130) <= cutoff(nothing) <= datetime.now(UTC) - timedelta(seconds=110)
    assert stats(unlocked)["rows"] == rows
    time.sleep(0.01)
    pruned = unlocked.ctl_in_process("ledger", "prune", "--before", "0s", "--yes").ok().out
    found = re.match(f"Pruned (\\d+) rows? recorded before {iso} \\(0 seconds ago\\)", pruned)
    assert found and int(found.group(1)) == rows, pruned
    assert json.loads(unlocked.ctl_in_process("ledger", "verify", "--json").ok().out)["ok"]


def test_export_of_a_damaged_ledger_says_it_cannot_read_it() -> None:
    """Found by a cold review: with the newest pages of ledger.db damaged, `ledger export` answered "internal error
    in aegisd" (the query that fixes where the export ends was outside the handling `ledger show` has); it now says
    what `show`, `stats` and `verify` say."""
    aegis = new_aegis()
    try:
        aegis.data_dir.mkdir(mode=0o700, parents=True)
        db = aegis.data_dir / "ledger.db"
        fill(db, 30_000)
        aegis.start()
        aegis.init()
        assert aegis.stop() == 0
        data = bytearray(db.read_bytes())
        page = 4096
        pages = len(data) // page
        garbage = random.Random(7)  # the newest rows' pages: the table's rightmost leaf, which max(id) reads
        for p in range(pages - 3, pages):
            data[p * page:(p + 1) * page] = bytes(garbage.randrange(256) for _ in range(page))
        db.write_bytes(bytes(data))
        aegis.start()
        for args in (("export", "--format", "jsonl"), ("show", "--limit", "5")):
            result = aegis.ctl_in_process("ledger", *args)
            assert_failed(result, "cannot read the ledger: database disk image is malformed")
            assert "internal error" not in result.err, result.err
        assert "control RPC Export failed" not in aegis.log()
        aegis.assert_no_leaks([PASSPHRASE])
    finally:
        aegis.cleanup()


def test_a_prune_refused_at_a_later_chunk_deletes_nothing() -> None:
    """Found at the 29th stop: each chunk of 10,000 rows was verified as it was deleted, so a prune refused at row
    15,000 had already deleted rows 1-10,000, with no `ledger_pruned` row, and said it was refused. Every row to
    prune is now read first."""
    aegis = new_aegis()
    try:
        aegis.data_dir.mkdir(mode=0o700, parents=True)
        fill(aegis.data_dir / "ledger.db", 20_000)
        with sqlite3.connect(aegis.data_dir / "ledger.db") as conn:  # a MAC on a row that never had one
            conn.execute("UPDATE ledger SET mac = zeroblob(32) WHERE id = 15000")
        conn.close()
        aegis.start()
        aegis.init()
        refused = aegis.ctl_in_process("ledger", "prune", "--before", "2024-01-01", "--include-unchained", "--yes")
        assert_failed(refused, "row 15000 does not verify")
        assert stats(aegis)["rows"] == 20_001 and "ledger pruned" not in aegis.log()
        assert json.loads(aegis.ctl_in_process("ledger", "verify", "--json").out)["first_id"] == 1
    finally:
        aegis.cleanup()
