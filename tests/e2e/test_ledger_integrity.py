"""The ledger's chain against someone who can write ledger.db, through the real daemon and aegisctl.

aegisd MACs after the fact only the rows it stored itself while it had no key, and only if they are still
as it wrote them; any other row without a MAC stays out of the chain and `ledger verify` names it.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from tests.e2e.gate_support import GateWorld
from tests.harness import Aegis

SECRET = "ghp_integritySecret0123456789abcdefXYZ"
FOREIGN = "were not written by this aegisd"


def edit(db: Path, statement: str, *params: Any) -> None:
    """What an attacker with write access to the data directory does, while aegisd runs or not."""
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.execute(statement, params)
    finally:
        conn.close()


def verify(aegis: Aegis) -> tuple[dict[str, Any], str]:
    """`ledger verify --json` and the human line; both must fail."""
    as_json, human = aegis.ctl("ledger", "verify", "--json"), aegis.ctl("ledger", "verify")
    assert as_json.code == 1 and human.code == 1, (as_json.out, human.out)
    verdict: dict[str, Any] = json.loads(as_json.out)
    assert verdict["ok"] is False
    return verdict, human.out


def world_with_traffic() -> GateWorld:
    world = GateWorld.start()
    up = world.upstream()
    world.credential("bear", SECRET, up.entry())
    world.agent("bot", "bear")
    return world


def test_rows_stripped_of_their_mac_are_never_chained_again() -> None:
    """Found by a cold review: rows edited and stripped of their MACs were MACed by the daemon's next commit
    (or its next start), so verify passed over the edit."""
    world = world_with_traffic()
    try:
        aegis, db = world.aegis, world.aegis.data_dir / "ledger.db"
        replies = [world.call("GET", f"/bear/echo/v{n}", agent="bot") for n in range(5)]
        assert all(r.status == 200 for r in replies)
        assert json.loads(aegis.ctl("ledger", "verify", "--json").ok().out)["ok"] is True
        edited = [world.row(r.request_id)["id"] for r in replies[2:]]
        edit(db, "UPDATE ledger SET agent = 'innocent', path = '/harmless', mac = NULL WHERE id >= ?", edited[0])

        for n in range(3):  # the daemon goes on committing after the edit
            assert world.call("GET", f"/bear/echo/after{n}", agent="bot").status == 200
        verdict, human = verify(aegis)
        assert verdict["first_bad_id"] == edited[0], verdict
        assert f"rows {edited[0]}..{edited[-1]} are not chained (no MAC)" in verdict["reason"], verdict
        assert "(the 3 chained rows after them verify)" in verdict["reason"], verdict
        assert f"Ledger TAMPERED: first bad row {edited[0]}: rows {edited[0]}..{edited[-1]} are not chained" in human
        assert aegis.log().count(FOREIGN) == 1, aegis.log()  # logged once, not at every commit
        doctor = aegis.ctl("doctor", "--json")
        assert doctor.code == 1
        check = next(c for c in json.loads(doctor.out)["checks"] if c["name"] == "ledger_chain")
        assert check["status"] == "fail" and "not chained" in check["message"], check

        # Stopped, every MAC removed: the next start and unlock chain none of it.
        assert aegis.stop() == 0
        edit(db, "UPDATE ledger SET mac = NULL")
        aegis.start()
        world.unlock()
        assert world.call("GET", "/bear/echo/restarted", agent="bot").status == 200
        verdict, _ = verify(aegis)
        assert verdict["first_bad_id"] == 1 and "chained rows after them verify)" in verdict["reason"], verdict
        world.assert_no_leaks()
    finally:
        world.close()


def test_rows_written_before_the_first_unlock_are_chained_only_if_unchanged() -> None:
    """The key derives from the vault and stays in memory after a lock, so only rows written between a start
    and the first unlock after it wait unchained: each start's policy row, and the gate's refusals."""
    world = world_with_traffic()
    try:
        aegis, db = world.aegis, world.aegis.data_dir / "ledger.db"

        def restart_locked() -> tuple[int, int]:
            """Restart (locked: no auto-unlock) and make one request; the ids of the rows this run wrote."""
            assert aegis.stop() == 0
            aegis.start()
            reply = world.call("GET", "/bear/echo/locked", agent="bot")
            assert reply.status == 503
            rows = world.ledger()  # request rows only; the run's first row is its policy reload
            last: int = world.row(reply.request_id, rows)["id"]
            first = json.loads(aegis.ctl("ledger", "show", "--json", "--limit", "2").ok().out)[-1]
            assert first["reason"] == "policy_reloaded" and first["id"] == last - 1, first
            return last - 1, last

        # Unlocked in the same run: the rows written meanwhile are chained.
        restart_locked()
        world.unlock()
        assert json.loads(aegis.ctl("ledger", "verify", "--json").ok().out)["ok"] is True

        # A row edited in the file before the unlock: none of that run's rows is chained, and the log says so.
        first, edited = restart_locked()
        edit(db, "UPDATE ledger SET path = '/harmless' WHERE id = ?", edited)
        world.unlock()
        verdict, _ = verify(aegis)
        assert verdict["first_bad_id"] == first, verdict
        assert verdict["reason"].startswith(f"rows {first}..{edited} are not chained"), verdict
        assert f"rows {first}..{edited}, stored while the vault was locked, were changed in the file" in aegis.log()

        # Restarted before the unlock: the next run cannot tell that run's rows from edited ones, so they are
        # never chained (docs/SECURITY.md, "Not mitigated").
        never = restart_locked()
        assert aegis.stop() == 0
        aegis.start()
        world.unlock()
        assert world.call("GET", "/bear/echo/next-run", agent="bot").status == 200
        verdict, _ = verify(aegis)
        assert verdict["first_bad_id"] == first, verdict
        assert never[0] == edited + 1
        assert verdict["reason"].startswith(f"rows {first}..{never[1]} are not chained (no MAC): stored so by an "
                                            "earlier run of aegisd that stopped before its vault was unlocked"), verdict
        assert "have no MAC and were not written by this aegisd" in aegis.log()
        world.assert_no_leaks()
    finally:
        world.close()
