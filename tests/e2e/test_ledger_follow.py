"""`aegisctl ledger follow` against a real daemon: a follower that falls behind is told what it missed, and a
restore (whose ledger's ids start lower) does not hide the rows written after it."""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from aegisd.api.aegis.v1 import ledger_pb2, ledger_pb2_grpc
from aegisd.gate.unauthenticated import AGENT_BURST
from aegisd.ledger import LedgerEntry
from tests.e2e.gate_support import GateWorld, request
from tests.e2e.ledger_fill import T0, entry, fill
from tests.harness import AEGISCTL, PASSPHRASE, Aegis, new_aegis
from tests.upstreams import make_pki

SECRET = "ghp_followSecret0123456789abcdefXYZ"


class Follower:
    """A running `aegisctl ledger follow --json`, its stdout rows and stderr lines read as they come."""

    def __init__(self, aegis: Aegis, *args: str) -> None:
        self.proc = subprocess.Popen([AEGISCTL, "ledger", "follow", "--json", *args], env=aegis.base_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.rows: queue.Queue[dict[str, Any]] = queue.Queue()
        self.errors: list[str] = []
        self._threads = [threading.Thread(target=self._pump_rows, daemon=True),
                         threading.Thread(target=self._pump_errors, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _pump_rows(self) -> None:
        for line in self.proc.stdout or ():
            self.rows.put(json.loads(line))

    def _pump_errors(self) -> None:
        for line in self.proc.stderr or ():
            self.errors.append(line)

    def next(self, timeout: float = 30) -> dict[str, Any]:
        return self.rows.get(timeout=timeout)

    def until_live(self, poke: Callable[[int], object]) -> None:
        """Make a row (`poke(attempt)`) until one is shown, which says the subscription is live (`-n 0`)."""
        for attempt in range(30):
            poke(attempt)
            with suppress(queue.Empty):
                self.next(timeout=1)
                return
        raise AssertionError(f"follow showed nothing: {self.errors}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(30)
        for thread in self._threads:
            thread.join(10)


@contextmanager
def following(aegis: Aegis, *args: str) -> Iterator[Follower]:
    follower = Follower(aegis, *args)
    try:
        yield follower
    finally:
        follower.stop()


def flood(port: int, targets: list[str], tokens: list[str]) -> None:
    """Agents' requests for services they hold no grant of (each refused 403), many at once, the targets dealt
    out to the agents in turn. Each agent's refusals get a row each only up to its budget (gate/unauthenticated.py):
    a caller wanting a row for each sends at most AGENT_BURST per agent."""

    async def main() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
            async def one(target: str, token: str) -> None:
                async with session.get(f"http://127.0.0.1:{port}{target}", headers={"X-Aegis-Agent": token}) as resp:
                    await resp.read()
                    assert resp.status == 403

            await asyncio.gather(*(one(target, tokens[n % len(tokens)]) for n, target in enumerate(targets)))

    asyncio.run(main())


# Rows of the followed service, and of another, in the flood. A stopped follower holds about 1,050 (the daemon's
# buffer of 1,000, the rest in sockets), so 3,000 outrun it three times over.
FLOOD, OTHERS = 3000, 1000


def test_a_follower_that_falls_behind_is_told_how_many_rows_it_missed() -> None:
    """Found by a cold review: a follower that did not keep up lost rows silently (the daemon buffers 1,000
    for it). Now a line on stderr says, where they are missing, how many matching rows were left out, and
    rows its filter does not match never take its buffer's room."""
    world = GateWorld.start()
    try:
        aegis = world.aegis
        # The flood is dealt out to enough agents that each stays within its budget of refusal rows.
        tokens = [world.agent(f"flooder{n}") for n in range((FLOOD + OTHERS) // AGENT_BURST + 4)]
        with following(aegis, "-n", "0", "--service", "flood") as follower:
            sent: list[str] = []
            for attempt in range(30):  # until the subscription is live (-n 0: nothing to wait for before)
                flood(world.port, [f"/flood/first{attempt}"], tokens)
                sent.append(f"/first{attempt}")
                with suppress(queue.Empty):
                    first = follower.next(timeout=1)["path"]
                    break
            else:
                raise AssertionError(f"follow showed nothing: {follower.errors}")
            # On a loaded machine a row can take longer than the second waited for it: the first shown may be an
            # earlier attempt's, and then every later attempt's row follows it, in order.
            assert first in sent, (first, sent)
            for path in sent[sent.index(first) + 1:]:
                assert follower.next()["path"] == path
            os.kill(follower.proc.pid, signal.SIGSTOP)  # a reader that stops reading
            try:
                filler = "x" * 2000
                targets = [f"/flood/{n}/{filler}" for n in range(FLOOD)]
                flood(world.port, targets + [f"/other/{n}" for n in range(OTHERS)], tokens)
            finally:
                os.kill(follower.proc.pid, signal.SIGCONT)
            shown: list[dict[str, Any]] = []
            deadline = time.monotonic() + 60
            while len(shown) + missing(follower) < len(targets):
                assert time.monotonic() < deadline, (len(shown), follower.errors[-3:])
                with suppress(queue.Empty):
                    shown.append(follower.next(timeout=1))
        assert missing(follower) > 0, "nothing was dropped: the flood did not outrun the follower"
        assert len(shown) + missing(follower) == len(targets)
        assert {row["service"] for row in shown} == {"flood"}
        assert all(line.startswith("aegisctl: ") and "rows missing here: this follow fell behind" in line
                   for line in follower.errors), follower.errors
        world.assert_no_leaks([json.dumps(shown), *follower.errors])
    finally:
        world.close()


def missing(follower: Follower) -> int:
    """Rows the follower was told it missed."""
    return sum(int(line.split()[1]) for line in follower.errors if "missing here" in line)


def test_rows_written_after_a_restore_are_followed() -> None:
    """Found by a cold review: follow skipped rows with an id at or below the newest it had shown (to drop
    those it got twice at start), so after a restore, whose ledger's ids start lower, it showed nothing."""
    world = GateWorld.start()
    try:
        aegis = world.aegis
        up = world.upstream()
        world.credential("github", SECRET, up.entry())
        world.agent("claude", "github")
        backup = aegis.root / "early.backup"
        aegis.ctl_in_process("backup", str(backup)).ok()
        for n in range(20):  # ids the restored ledger will use again
            assert world.call("GET", f"/github/echo/before{n}", agent="claude").status == 200
        with following(aegis, "-n", "3") as follower:
            assert [follower.next()["path"] for _ in range(3)] == [f"/echo/before{n}" for n in (17, 18, 19)]
            aegis.ctl_in_process("lock").ok()
            aegis.ctl_in_process("restore", str(backup), "--yes").ok()
            restored = follower.next()
            assert restored["reason"] == "backup_restored", restored
            world.unlock()
            reply = world.call("GET", "/github/echo/after-restore", agent="claude")
            after = follower.next()
            assert after["request_id"] == reply.request_id and after["id"] < 20, after
        world.assert_no_leaks()
    finally:
        world.close()


def test_a_stop_ends_follow_after_the_rows_of_the_requests_it_drained() -> None:
    """Found at the 26th stop: an open `ledger follow` held aegisd's stop for the control server's whole grace
    (10 s), and then ended as "cannot reach aegisd". It now ends as soon as the gate has drained, with the row
    of a request answered during the stop, and says aegisd is stopping."""
    world = GateWorld.start()
    try:
        aegis = world.aegis
        up = world.upstream()
        world.credential("github", SECRET, up.entry())
        world.agent("claude", "github")
        with following(aegis, "-n", "0") as follower:
            follower.until_live(lambda attempt: world.call("GET", f"/github/echo/warm{attempt}", agent="claude"))
            with suppress(queue.Empty):
                while True:  # the other warm-up rows
                    follower.next(timeout=1)
            replies: list[Any] = []
            held = threading.Thread(target=lambda: replies.append(world.call("GET", "/github/hold/drain",
                                                                                  agent="claude")))
            held.start()
            assert up.arrived("drain").wait(30)
            assert aegis.proc is not None
            aegis.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)  # the stop has begun; the gate drains the held request
            up.release("drain")
            held.join(30)
            assert replies and replies[0].status == 200, replies
            # Not held for the control server's 10 s grace by the follower (an exit, not a timing bound).
            assert aegis.stop(timeout=8) == 0
            assert follower.proc.wait(10) == 1
            row = follower.next(timeout=10)
            assert row["request_id"] == replies[0].request_id and row["path"] == "/hold/drain", row
            follower.stop()
            assert follower.errors == ["aegisctl: error: aegisd is stopping; this follow has ended\n",
                                       "  next: run it again once aegisd is back\n"], follower.errors
        aegis.start()  # for the ledger the leak check reads
        world.assert_no_leaks([*follower.errors])
    finally:
        world.close()


def test_a_stop_ends_follow_only_after_the_gate_s_summary_rows() -> None:
    """Found by the review of the fix above: the gate's stop writes the summary row of the refusals it left out
    (`unauthenticated_flood`), and follow ended before that row committed, so a follower watching for floods
    missed exactly the flood's record."""
    world = GateWorld.start()
    try:
        aegis = world.aegis
        with following(aegis, "-n", "0") as follower:
            follower.until_live(lambda _: request(world.port, "GET", "/github/warm"))  # a tokenless refusal's row

            def refusals(count: int) -> None:
                connection = http.client.HTTPConnection("127.0.0.1", world.port, timeout=30)
                for n in range(count):
                    connection.request("GET", f"/github/flood{n}")
                    connection.getresponse().read()
                connection.close()

            threads = [threading.Thread(target=refusals, args=(150,)) for _ in range(6)]  # past BURST, at once
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert aegis.stop() == 0
            assert follower.proc.wait(10) == 1
            reasons = []
            with suppress(queue.Empty):
                while True:
                    reasons.append(follower.next(timeout=2)["reason"])
            assert "unauthenticated_flood" in reasons, reasons[-5:]
        aegis.start()  # for the ledger the leak check reads
        world.assert_no_leaks([*follower.errors])
    finally:
        world.close()


def _peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


def test_a_long_backlog_is_read_a_page_at_a_time_and_comes_whole_and_in_order() -> None:
    """Found by a cold review at the 27th stop: Follow read its whole backlog (up to 100,000 rows, each up to a
    few KB an agent chooses) into aegisd at once, and the memory stayed taken after the follow ended. It reads a
    page at a time now: the newest rows asked for, oldest first, across many pages, and aegisd's peak memory
    grows by a page's worth, not the backlog's. The review of that fix found its pages chasing rows committed
    meanwhile, so a follower that fell behind those was told of rows "missing" that it had been sent: the backlog
    ends where it stood when the follow began, and what is reported missing is exactly what was not sent."""
    aegis = new_aegis()
    pki = make_pki(aegis.root / "pki")
    aegis.env["SSL_CERT_FILE"] = str(pki.ca_pem)
    world = GateWorld(aegis, pki, secrets=[PASSPHRASE])
    try:
        aegis.data_dir.mkdir(mode=0o700, parents=True)
        fill(aegis.data_dir / "ledger.db", 11_000, make=lambda i: entry(i) if i < 3000 else LedgerEntry(
            kind="request", time_ms=T0 + i, request_id=f"{i:016x}", agent="claude", service="big", method="GET",
            path=f"/big/{i - 3000}/" + "p" * 2000, target_host="h" * 2000, detail="d" * 2000,
            decision="allowed"))  # 8,000 rows of 6 KB (three fields at their most): about 48 MB of text
        aegis.start()
        assert aegis.proc is not None
        before = _peak_rss_kib(aegis.proc.pid)
        with grpc.insecure_channel(f"unix:{aegis.socket}") as channel:
            follow = ledger_pb2_grpc.LedgerServiceStub(channel).Follow
            claude = ledger_pb2.LedgerFilter(agent="claude", service="github")
            stream = follow(ledger_pb2.FollowRequest(filter=claude, backlog=700), timeout=60)
            got = [row.request_id for row in itertools.islice(stream, 700)]
            stream.cancel()  # type: ignore[no-untyped-call]
            # claude's rows among the filled 3,000 are every third; the newest 700 of them, oldest first
            assert got == [f"{i:016x}" for i in range(0, 3000, 3)][-700:], got[:3]
            stream = follow(ledger_pb2.FollowRequest(filter=ledger_pb2.LedgerFilter(service="big"), backlog=100_000),
                            timeout=120)
            paths = [row.path for row in itertools.islice(stream, 8000)]
            stream.cancel()  # type: ignore[no-untyped-call]
            assert [path.split("/")[2] for path in paths] == [str(i) for i in range(8000)]
            grown_mib = (_peak_rss_kib(aegis.proc.pid) - before) / 1024
            assert grown_mib < 40, f"aegisd's peak memory grew by {grown_mib:.0f} MiB for a backlog of 48 MB"

            aegis.init()
            world.credential("gh", SECRET, world.upstream().entry())
            world.agent("bot", "gh")
            stream = follow(ledger_pb2.FollowRequest(backlog=3000), timeout=300)  # 18 MB: more than gRPC buffers
            next(iter(stream))  # the follow has begun; the rest of its backlog waits for this reader
            live = {world.call("GET", f"/gh/echo/live{n}", agent="bot").request_id for n in range(1050)}
            sent: set[str] = set()
            missing, sentinel = 0, ""
            for row in stream:  # the backlog, then the live rows: 1,000 wait for a reader, the rest are missed
                missing += row.dropped
                if row.request_id in live:
                    sent.add(row.request_id)
                if not sentinel and len(sent) + missing >= len(live):  # caught up: one more row marks the end
                    sentinel = world.call("GET", "/gh/echo/sentinel", agent="bot").request_id
                if sentinel and row.request_id == sentinel:
                    break
            stream.cancel()  # type: ignore[no-untyped-call]
        assert len(sent) + missing == len(live), (len(sent), missing)
        world.assert_no_leaks()
    finally:
        world.close()
