"""The audit ledger as an operator sees it through aegisctl: exactly one row per gate request with the
documented keys and never a secret, `ledger show` filters, `ledger follow` live, and `ledger verify`
catching an edited, a deleted and a reordered row."""

from __future__ import annotations

import contextlib
import json
import queue
import re
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.gate_support import (
    LEDGER_KEYS,
    SECRETS,
    GateWorld,
    Reply,
    Standard,
    read_reply,
    request,
    shared_standard,
    untouched,
)
from tests.e2e.ops_support import Scrape
from tests.harness import AEGISCTL

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def std() -> Standard:
    return shared_standard()


def test_every_request_writes_exactly_one_row(std: Standard) -> None:
    world, up = std.world, std.up
    token = world.tokens["bot"]
    before = len(world.ledger())
    replies: list[tuple[Reply, dict[str, Any]]] = [
        (world.call("GET", "/bear/echo/one?api_key=query-not-logged&x=1", agent="bot"),
         {"decision": "allowed", "status": 200, "reason": "", "path": "/echo/one", "credential": "bear",
          "target_host": f"127.0.0.1:{up.port}", "agent": "bot"}),
        (world.call("POST", "/hdr/echo/two", body=b"0123456789", agent="bot"),
         {"decision": "allowed", "status": 200, "bytes_in": 10, "method": "POST", "credential": "hdr"}),
        (world.call("GET", "/bear/status/404", agent="bot"), {"decision": "allowed", "status": 404}),
        (world.call("GET", f"/bear/echo/three?token={token}"),
         {"decision": "denied", "reason": "agent_auth_required", "status": 401, "agent": "", "path": "/echo/three"}),
        (world.call("GET", "/secret-svc/echo/four", agent="bot"),
         {"decision": "denied", "reason": "not_granted", "status": 403, "service": "secret-svc", "credential": ""}),
        (world.raw_request("GET", "/bear/%2e%2e/five", agent="bot"),
         {"decision": "denied", "reason": "bad_request", "status": 400}),
        (world.call("GET", "/dead/echo/six", agent="bot"),
         {"decision": "denied", "reason": "upstream_error", "status": 502, "credential": "dead"}),
    ]
    rows = world.ledger()
    assert len(rows) - before == len(replies)  # nothing else, and nothing twice
    for reply, expected in replies:
        row = world.row(reply.request_id, rows)
        assert row["status"] == reply.status
        for key, value in expected.items():
            assert row[key] == value, (key, row, reply.text())
        assert ISO_MS.match(row["time"]), row["time"]
        assert isinstance(row["duration_ms"], float) and row["duration_ms"] >= 0
        assert all(isinstance(row[k], int) and row[k] >= 0 for k in ("status", "bytes_in", "bytes_out"))
        assert "?" not in row["path"]
    allowed = world.row(replies[0][0].request_id, rows)
    assert allowed["bytes_out"] == len(replies[0][0].body)
    text = json.dumps(rows)
    assert token not in text and "query-not-logged" not in text
    assert not any(secret in text for secret in SECRETS.values())
    world.assert_no_leaks()


@pytest.fixture
def filtered(std: Standard) -> Iterator[tuple[GateWorld, dict[str, list[str]]]]:
    """Agents fa and fb on credential fcred (service fsvc): fa makes three calls and one refused one."""
    world = std.world
    if "fa" not in world.tokens:
        world.credential("fcred", "sk-filter-secret-F1F2F3", std.up.entry(), service="fsvc")
        world.agent("fa", "fcred")
        world.agent("fb", "fcred")
    ids: dict[str, list[str]] = {"fa": [], "fb": [], "fa_denied": []}
    for n in range(3):
        ids["fa"].append(world.call("GET", f"/fsvc/echo/f{n}", agent="fa").request_id)
        time.sleep(0.005)  # distinct millisecond timestamps, so --since/--until can split them
    ids["fa_denied"].append(world.call("GET", "/bear/echo/fa", agent="fa").request_id)
    ids["fb"].append(world.call("GET", "/fsvc/echo/fb", agent="fb").request_id)
    yield world, ids


def _ids(world: GateWorld, *filters: str) -> list[str]:
    return [row["request_id"] for row in world.ledger(*filters)]


def test_show_filters(filtered: tuple[GateWorld, dict[str, list[str]]]) -> None:
    world, ids = filtered
    fa_all = [*ids["fa"], *ids["fa_denied"]]
    assert set(_ids(world, "--agent", "fa")) >= set(fa_all)
    assert not set(_ids(world, "--agent", "fa")) & set(ids["fb"])
    by_service = _ids(world, "--service", "fsvc")
    assert set(by_service) >= {*ids["fa"], *ids["fb"]} and ids["fa_denied"][0] not in by_service
    assert set(_ids(world, "--credential", "fcred")) >= {*ids["fa"], *ids["fb"]}
    blocked = world.ledger("--blocked", "--agent", "fa")
    assert ids["fa_denied"][0] in [r["request_id"] for r in blocked]
    assert all(r["decision"] == "denied" for r in blocked)
    assert _ids(world, "--agent", "fa", "--limit", "2") == _ids(world, "--agent", "fa")[:2]  # newest first

    rows = {row["request_id"]: row for row in world.ledger("--agent", "fa")}
    first, second, third = (rows[i]["time"] for i in ids["fa"])
    since = _ids(world, "--agent", "fa", "--service", "fsvc", "--since", second)
    until = _ids(world, "--agent", "fa", "--service", "fsvc", "--until", second)
    assert set(ids["fa"][1:]) <= set(since) and ids["fa"][0] not in since  # --since is inclusive
    assert ids["fa"][0] in until and not set(ids["fa"][1:]) & set(until)  # --until is exclusive
    assert set(fa_all) <= set(_ids(world, "--agent", "fa", "--since", "1h"))
    assert _ids(world, "--agent", "fa", "--until", "1h") == []
    assert first < second < third

    human = world.aegis.ctl("ledger", "show", "--agent", "fa").ok().out
    assert "/fsvc/echo/f0" in human and "fa" in human
    assert world.aegis.ctl("ledger", "show", "--agent", "nobody-at-all").ok().out.strip() == "No ledger rows match."
    bad = world.aegis.ctl("ledger", "show", "--since", "yesterday-ish")
    assert bad.code == 2 and "--since" in bad.err
    world.assert_no_leaks()


def test_follow_prints_rows_live(std: Standard) -> None:
    world = std.world
    if "fol" not in world.tokens:
        world.agent("fol", "bear")
    world.call("GET", "/bear/echo/backlog", agent="fol")  # so the one-row backlog exists
    proc = subprocess.Popen([AEGISCTL, "ledger", "follow", "--json", "--lines", "1", "--agent", "fol"],
                            env=world.aegis.base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout or ():
            lines.put(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        backlog = json.loads(lines.get(timeout=30))  # printed after the subscription is live
        assert backlog["agent"] == "fol" and backlog["path"] == "/echo/backlog"
        live = [world.call("GET", f"/bear/echo/live{n}", agent="fol").request_id for n in range(3)]
        world.call("GET", "/bear/echo/not-fol", agent="bot")  # filtered out
        denied = world.call("GET", "/secret-svc/echo/x", agent="fol").request_id
        followed = [json.loads(lines.get(timeout=30)) for _ in range(4)]
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert [row["request_id"] for row in followed] == [*live, denied]
    assert all(set(row) >= LEDGER_KEYS for row in followed)
    assert [row["decision"] for row in followed] == ["allowed"] * 3 + ["denied"]
    world.received.extend([json.dumps(followed), out, err])
    world.assert_no_leaks()


# -- tamper evidence ----------------------------------------------------------------------------------


def _swap(conn: sqlite3.Connection, a: int, b: int) -> None:
    columns = [r[1] for r in conn.execute("PRAGMA table_info(ledger)") if r[1] != "id"]
    row_a = conn.execute(f"SELECT {', '.join(columns)} FROM ledger WHERE id = ?", (a,)).fetchone()  # noqa: S608
    row_b = conn.execute(f"SELECT {', '.join(columns)} FROM ledger WHERE id = ?", (b,)).fetchone()  # noqa: S608
    assignments = ", ".join(f"{c} = ?" for c in columns)
    conn.execute(f"UPDATE ledger SET {assignments} WHERE id = ?", (*row_b, a))  # noqa: S608
    conn.execute(f"UPDATE ledger SET {assignments} WHERE id = ?", (*row_a, b))  # noqa: S608


def test_verify_detects_edited_deleted_and_reordered_rows() -> None:
    world = GateWorld.start()
    try:
        up = world.upstream()
        world.credential("bear", SECRETS["bear"], up.entry())
        world.agent("bot", "bear")
        replies = [world.call("GET", f"/bear/echo/v{n}", agent="bot") for n in range(6)]
        assert all(r.status == 200 for r in replies)
        intact = world.aegis.ctl("ledger", "verify", "--json").ok()
        assert json.loads(intact.out)["ok"] is True
        rows = {row["request_id"]: row["id"] for row in world.ledger()}
        target = rows[replies[2].request_id]
        following = rows[replies[3].request_id]
        assert world.aegis.stop() == 0

        data = world.aegis.data_dir
        backup = world.aegis.root / "ledger-backup"
        backup.mkdir()
        originals = sorted(data.glob("ledger.db*"))
        for path in originals:
            shutil.copy2(path, backup / path.name)

        tampering = {
            "edited": ("UPDATE ledger SET status = 299 WHERE id = ?", target),
            "deleted": ("DELETE FROM ledger WHERE id = ?", following),
            "reordered": (None, target),
        }
        for what, (sql, first_bad) in tampering.items():
            for path in data.glob("ledger.db*"):
                path.unlink()
            for path in originals:
                shutil.copy2(backup / path.name, data / path.name)
            _tamper(data / "ledger.db", sql, target, following)
            world.aegis.start()
            world.unlock()
            result = world.aegis.ctl("ledger", "verify", "--json")
            human = world.aegis.ctl("ledger", "verify")
            assert world.aegis.stop() == 0
            assert result.code == 1 and human.code == 1, (what, result.out, result.err)
            verdict = json.loads(result.out)
            assert verdict["ok"] is False and verdict["first_bad_id"] == first_bad, (what, verdict)
            assert f"Ledger TAMPERED: first bad row {first_bad}" in human.out, (what, human.out)
            assert verdict["unchained_only"] is False, verdict
            if what == "deleted":
                assert str(target) in verdict["reason"], verdict
        world.aegis.start()  # for the leak check, which reads the ledger through aegisctl
        world.assert_no_leaks()
    finally:
        world.close()


def _tamper(db: Path, sql: str | None, target: int, following: int) -> None:
    conn = sqlite3.connect(db)
    try:
        with conn:
            if sql is None:
                _swap(conn, target, following)
            else:
                conn.execute(sql, (target,))
    finally:
        conn.close()


def test_nothing_is_forwarded_while_the_ledger_cannot_be_written() -> None:
    """A commit fails (a trigger stands in for a full disk). The request in flight reached the upstream,
    its answer is withheld (503) and it has no row. From then on nothing is forwarded, not even a request
    admitted before the failure whose body was still arriving, and what is refused gives its quota back;
    health and metrics say so until the writer's own retry commits a row recording the outage."""
    world = GateWorld.start()
    try:
        up = world.upstream()
        # Three a minute: `after` below is the third forwarded request only if `slow` gave its quota back.
        world.credential("bear", SECRETS["bear"], up.entry(), "--rate-limit", "3/min")
        world.agent("bot", "bear")
        assert world.call("GET", "/bear/echo/before", agent="bot").status == 200
        with socket.create_connection(("127.0.0.1", world.port), timeout=30) as slow, \
                contextlib.closing(sqlite3.connect(world.aegis.data_dir / "ledger.db", isolation_level=None)) as db:
            slow.sendall(f"POST /bear/echo/slow HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Aegis-Agent: {world.tokens['bot']}"
                         "\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n".encode())
            assert slow.recv(64).startswith(b"HTTP/1.1 100 Continue")  # admitted; its body is still to come
            db.execute("CREATE TRIGGER full BEFORE INSERT ON ledger BEGIN SELECT RAISE(ABORT, 'disk full'); END")

            caught = world.call("GET", "/bear/echo/caught", agent="bot")
            assert caught.status == 503 and caught.error()["code"] == "ledger_unavailable"
            assert caught.header("Retry-After") == "1"  # the writer retries each second: so may the agent
            assert "nothing was forwarded" not in caught.error()["message"]  # it was: the row came after
            assert len(up.requests_to("/echo/caught")) == 1
            assert request(world.port, "GET", "/_aegis/health").json()["ledger"] == "failing"
            assert Scrape(world).value("aegis_ledger_failing") == 1
            with untouched(up):
                slow.sendall(b"0123456789")
                held = [read_reply(slow)]  # one at a time, so each row fails in a commit of its own
                world.received.append(held[0].text())
                held += [world.call("GET", "/bear/echo/held", agent="bot"),
                         world.call("POST", "/bear/echo/held", [("Expect", "100-continue")], b"x" * 1000,
                                    agent="bot")]
            for reply in held:
                assert reply.status == 503, reply.text()
                assert reply.error()["code"] == "ledger_unavailable" and reply.header("Retry-After") == "1"
                assert "nothing was forwarded" in reply.error()["message"]
            db.execute("DROP TRIGGER full")

        deadline = time.monotonic() + 30  # the writer retries every second on its own: room for a loaded machine
        while request(world.port, "GET", "/_aegis/health").json()["ledger"] != "ok":
            assert time.monotonic() < deadline, "the ledger stayed failing after it could be written again"
            time.sleep(0.1)
        after = world.call("GET", "/bear/echo/after", agent="bot")
        assert after.status == 200 and len(up.requests_to("/echo/after")) == 1, after.text()

        rows = world.ledger()
        assert world.row(after.request_id, rows)["decision"] == "allowed"
        unrecorded = {caught.request_id, *(reply.request_id for reply in held)}
        assert not unrecorded & {row["request_id"] for row in rows}
        outage = [row for row in json.loads(world.aegis.ctl("ledger", "show", "--json").ok().out)
                  if row["kind"] == "system" and row["reason"] == "ledger_unavailable"]
        assert len(outage) == 1 and "4 rows from 4 failed commits are missing" in outage[0]["detail"], outage
        scrape = Scrape(world)
        assert scrape.value("aegis_ledger_commit_failures_total") >= 4 and scrape.value("aegis_ledger_failing") == 0
        log = world.aegis.log()  # one error for the outage (at its start, from the writer), one line when it ends
        assert log.count("ledger commit of 1 row failed") == 1 and "ledger write failed" not in log
        assert "the gate forwards nothing until the ledger can be written again" in log
        assert log.count("ledger writable again") == 1
        assert json.loads(world.aegis.ctl("ledger", "verify", "--json").ok().out)["ok"] is True
        world.assert_no_leaks()
    finally:
        world.close()

