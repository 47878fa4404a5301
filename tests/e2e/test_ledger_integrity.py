"""The ledger's chain against someone who can write ledger.db, through the real daemon and aegisctl.

aegisd MACs after the fact only the rows it stored itself while it had no key, and only if they are still
as it wrote them; any other row without a MAC stays out of the chain and `ledger verify` names it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.e2e.gate_support import GateWorld, request
from tests.harness import AEGISCTL, Aegis

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
    as_json, human = aegis.ctl_in_process("ledger", "verify", "--json"), aegis.ctl_in_process("ledger", "verify")
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
        assert json.loads(aegis.ctl_in_process("ledger", "verify", "--json").ok().out)["ok"] is True
        not_utf8(world)
        edited_numbers(world)
        edited = [world.row(r.request_id)["id"] for r in replies[2:]]
        edit(db, "UPDATE ledger SET agent = 'innocent', path = '/harmless', mac = NULL WHERE id >= ?", edited[0])

        for n in range(3):  # the daemon goes on committing after the edit
            assert world.call("GET", f"/bear/echo/after{n}", agent="bot").status == 200
        verdict, human = verify(aegis)
        assert verdict["first_bad_id"] == edited[0], verdict
        assert f"rows {edited[0]}..{edited[-1]} are not chained (no MAC)" in verdict["reason"], verdict
        assert "(the 3 chained rows after them verify)" in verdict["reason"], verdict
        # This aegisd wrote those rows chained: evidence of an edit, never the milder NOT CHAINED a stop before an
        # unlock leaves (a review of the 28th stop's change found it said that here)
        assert f"the running aegisd chained every row from row 1 on, yet 3 rows there (from row {edited[0]}) " \
            "have no MAC: edited or inserted while it ran" in verdict["reason"], verdict
        assert verdict["unchained_only"] is False, verdict
        assert f"Ledger TAMPERED: first bad row {edited[0]}: rows {edited[0]}..{edited[-1]} are not chained" in human
        assert aegis.log().count(FOREIGN) == 1, aegis.log()  # logged once, not at every commit
        doctor = aegis.ctl_in_process("doctor", "--json")
        assert doctor.code == 1
        check = next(c for c in json.loads(doctor.out)["checks"] if c["name"] == "ledger_chain")
        assert check["status"] == "fail" and "not chained" in check["message"], check
        assert "evidence" in check["hint"], check

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


def not_utf8(world: GateWorld) -> None:
    """Found by a cold review: one byte in a row that is not UTF-8 (aegisd stores only UTF-8, so the file was
    written behind its back) made `ledger verify` and doctor fail to read the ledger instead of naming the row,
    and `ledger show`, `export` and `follow -n` fail for every page holding it. Verify now names the row; the
    reads show it, the bytes that are not UTF-8 as U+FFFD. The row is put back as it was afterwards."""
    aegis, db = world.aegis, world.aegis.data_dir / "ledger.db"
    rows = json.loads(aegis.ctl_in_process("ledger", "show", "--json", "--limit", "1000").ok().out)
    bad = rows[2]["id"]
    conn = sqlite3.connect(db)
    try:
        (kept,) = conn.execute("SELECT detail FROM ledger WHERE id = ?", (bad,)).fetchone()
    finally:
        conn.close()
    edit(db, "UPDATE ledger SET detail = CAST(x'ff41' AS TEXT) WHERE id = ?", bad)

    verdict, human = verify(aegis)
    assert verdict["first_bad_id"] == bad and verdict["reason"].startswith(f"row {bad} does not match its MAC"), \
        verdict
    assert f"Ledger TAMPERED: first bad row {bad}: row {bad} does not match its MAC" in human, human
    doctor = aegis.ctl_in_process("doctor", "--json")
    assert doctor.code == 1
    check = next(c for c in json.loads(doctor.out)["checks"] if c["name"] == "ledger_chain")
    assert check["status"] == "fail" and f"first bad row {bad}: row {bad} does not match" in check["message"], check

    shown = json.loads(aegis.ctl_in_process("ledger", "show", "--json", "--limit", "1000").ok().out)
    assert [r["id"] for r in shown] == [r["id"] for r in rows]
    assert next(r for r in shown if r["id"] == bad)["detail"] == "\ufffdA"
    aegis.ctl_in_process("ledger", "show").ok()
    jsonl = aegis.ctl_in_process("ledger", "export", "--format", "jsonl").ok().out
    exported = [json.loads(line) for line in jsonl.splitlines()]
    assert [r["id"] for r in exported] == [r["id"] for r in reversed(rows)]
    assert next(r for r in exported if r["id"] == bad)["detail"] == "\ufffdA"
    backlog = follow_backlog(aegis, len(rows))
    assert [r["id"] for r in backlog] == [r["id"] for r in reversed(rows)]
    assert next(r for r in backlog if r["id"] == bad)["detail"] == "\ufffdA"

    edit(db, "UPDATE ledger SET detail = ? WHERE id = ?", kept, bad)
    assert json.loads(aegis.ctl_in_process("ledger", "verify", "--json").ok().out)["ok"] is True


def edited_numbers(world: GateWorld) -> None:
    """Found by a cold review: a number column edited to text (status = 'oops', time_ms = 'x') made `ledger show`,
    `export`, `follow -n` and `stats` fail for every page holding the row (no reply can carry text there). Such a
    value is shown as 0 now, logged once; verify names the row. The row is put back as it was afterwards."""
    aegis, db = world.aegis, world.aegis.data_dir / "ledger.db"
    rows = json.loads(aegis.ctl_in_process("ledger", "show", "--json", "--limit", "1000").ok().out)
    bad = rows[1]["id"]
    conn = sqlite3.connect(db)
    try:
        kept = conn.execute("SELECT status, time_ms FROM ledger WHERE id = ?", (bad,)).fetchone()
    finally:
        conn.close()
    edit(db, "UPDATE ledger SET status = 'oops', time_ms = 'x' WHERE id = ?", bad)

    verdict = json.loads(aegis.ctl_in_process("ledger", "verify", "--json").out)
    assert verdict["first_bad_id"] == bad and verdict["reason"].startswith(f"row {bad} does not match its MAC"), \
        verdict
    shown = json.loads(aegis.ctl_in_process("ledger", "show", "--json", "--limit", "1000").ok().out)
    exported = [json.loads(line) for line in aegis.ctl_in_process("ledger", "export").ok().out.splitlines()]
    backlog = follow_backlog(aegis, len(rows))
    for got in (shown, list(reversed(exported)), list(reversed(backlog))):
        assert [r["id"] for r in got] == [r["id"] for r in rows]
        row = next(r for r in got if r["id"] == bad)
        assert (row["status"], row["time"]) == (0, "1970-01-01T00:00:00.000Z"), row
    counted = json.loads(aegis.ctl_in_process("ledger", "stats", "--json").ok().out)
    assert counted["rows"] == len(rows) and counted["last_time"] is None, counted
    assert aegis.log().count("ledger.db was edited behind aegisd's back") == 1, aegis.log()

    edit(db, "UPDATE ledger SET status = ?, time_ms = ? WHERE id = ?", *kept, bad)
    assert json.loads(aegis.ctl_in_process("ledger", "verify", "--json").ok().out)["ok"] is True


def follow_backlog(aegis: Aegis, lines: int) -> list[dict[str, Any]]:
    """The rows `ledger follow --json -n LINES` prints before it follows on (it is stopped then)."""
    proc = subprocess.Popen([AEGISCTL, "ledger", "follow", "--json", "-n", str(lines)], env=aegis.base_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    rows: list[dict[str, Any]] = []
    try:
        assert proc.stdout is not None
        while len(rows) < lines and (line := proc.stdout.readline()):
            rows.append(json.loads(line))
    finally:
        watchdog.cancel()
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert len(rows) == lines, (rows, err)
    return rows


def test_rows_written_before_the_first_unlock_are_chained_only_if_unchanged() -> None:
    """The key derives from the vault and stays in memory after a lock, so only rows written between a start
    and the first unlock after it wait unchained: the gate's refusals. The daemon's own rows of that time
    (each start's policy reload) are held for the key, so a run that never unlocks leaves none of them."""
    world = world_with_traffic()
    try:
        aegis, db = world.aegis, world.aegis.data_dir / "ledger.db"

        def restart_locked() -> int:
            """Restart (locked: no auto-unlock) and make one request; the id of its row, the only row this run
            has stored so far (its policy reload waits for the key)."""
            assert aegis.stop() == 0
            aegis.start()
            reply = world.call("GET", "/bear/echo/locked", agent="bot")
            assert reply.status == 503
            row_id: int = world.row(reply.request_id, world.ledger())["id"]
            [newest] = json.loads(aegis.ctl_in_process("ledger", "show", "--json", "--limit", "1").ok().out)
            assert newest["id"] == row_id, newest
            return row_id

        # A run that never unlocks, with no traffic: nothing of it is left unchained, and its log says what
        # it did not record.
        assert aegis.stop() == 0
        aegis.start()
        assert aegis.stop() == 0
        assert "not written to the ledger, the vault was never unlocked in this run: policies reloaded" in aegis.log()
        aegis.start()
        world.unlock()
        assert json.loads(aegis.ctl_in_process("ledger", "verify", "--json").ok().out)["ok"] is True
        [reload] = json.loads(aegis.ctl_in_process("ledger", "show", "--json", "--limit", "1").ok().out)
        assert reload["reason"] == "policy_reloaded" and "(startup)" in reload["detail"]  # held, then chained

        # Unlocked in the same run: the rows written meanwhile are chained.
        restart_locked()
        world.unlock()
        assert json.loads(aegis.ctl_in_process("ledger", "verify", "--json").ok().out)["ok"] is True

        # A row edited in the file before the unlock: none of that run's rows is chained, and the log says so.
        edited = restart_locked()
        edit(db, "UPDATE ledger SET path = '/harmless' WHERE id = ?", edited)
        world.unlock()
        verdict, _ = verify(aegis)
        assert verdict["first_bad_id"] == edited, verdict
        assert verdict["reason"].startswith(f"row {edited} is not chained"), verdict
        assert f"rows {edited}, stored while the vault was locked, were changed in the file" in aegis.log()

        # Restarted before the unlock: the next run cannot tell that run's refusal from an edited row, so it is
        # never chained (docs/SECURITY.md, "Not mitigated").
        never = restart_locked()
        assert aegis.stop() == 0
        aegis.start()
        world.unlock()
        assert world.call("GET", "/bear/echo/next-run", agent="bot").status == 200
        verdict, _ = verify(aegis)
        assert verdict["first_bad_id"] == edited, verdict
        assert never > edited
        assert verdict["reason"].startswith(f"rows {edited}, {never} are not chained (no MAC): stored so by an "
                                            "earlier run of aegisd that stopped before its vault was unlocked"), verdict
        # Earlier runs' rows, and nothing else wrong: not called tampered (a routine stop before an unlock leaves
        # the same), not intact either, and the way out is named
        assert verdict["unchained_only"] is True, verdict
        human = aegis.ctl_in_process("ledger", "verify").out
        assert f"Ledger NOT CHAINED: rows {edited}, {never} are not chained" in human, human
        assert "TAMPERED" not in human and "--include-unchained" in human, human
        check = next(c for c in json.loads(aegis.ctl_in_process("doctor", "--json").out)["checks"]
                     if c["name"] == "ledger_chain")
        assert "--include-unchained" in check["hint"] and "evidence" not in check["hint"], check
        assert "has no MAC and was not written by this aegisd" in aegis.log()

        # Such rows refuse a prune, until the operator, having seen them in verify, lets them go.
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        refused = aegis.ctl_in_process("ledger", "prune", "--before", now, "--yes")
        assert refused.code == 1 and f"row {edited} is not chained" in refused.err, refused
        assert "--include-unchained" in refused.err
        pruned = json.loads(aegis.ctl_in_process("ledger", "prune", "--before", now, "--include-unchained", "--yes",
                                      "--json").ok().out)
        assert pruned["unchained"] == 2 and pruned["pruned"] > 2, pruned
        assert json.loads(aegis.ctl_in_process("ledger", "verify", "--json").ok().out)["ok"] is True
        [record] = json.loads(aegis.ctl_in_process("ledger", "show", "--json", "--limit", "1").ok().out)
        assert record["reason"] == "ledger_pruned" and "2 of them were not chained" in record["detail"], record
        checkpoints(world)
        world.assert_no_leaks()
    finally:
        world.close()


def checkpoints(world: GateWorld) -> None:
    """Found by a cold review, two ways past prune checkpoints, on a ledger pruned once. Removing an older checkpoint
    went unnoticed (the chain starts at the newest); checkpoint ids now run 1, 2, 3 ... with no gap. And prune
    started from the newest checkpoint without checking its MAC: rows deleted and a forged checkpoint put in their
    place (the real MAC of the last deleted row, a junk MAC of its own) made the prune check the next rows against
    it, delete them and write a genuine checkpoint, after which removing the forged one left a ledger that
    verified. Prune now checks every checkpoint first, as verify does."""
    aegis, db = world.aegis, world.aegis.data_dir / "ledger.db"
    assert world.call("GET", "/bear/echo/after-the-prune", agent="bot").status == 200
    aegis.ctl_in_process("ledger", "prune", "--before", "0s", "--yes").ok()  # checkpoint 2
    conn = sqlite3.connect(db)
    try:
        first = conn.execute("SELECT * FROM checkpoints WHERE id = 1").fetchone()
    finally:
        conn.close()
    edit(db, "DELETE FROM checkpoints WHERE id = 1")
    verdict = json.loads(aegis.ctl_in_process("ledger", "verify", "--json").out)
    assert verdict["ok"] is False and verdict["reason"] == "prune checkpoint 1 is missing before checkpoint 2: " \
        "removed from the file", verdict
    edit(db, "INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?, ?)", *first)  # put back as it was
    assert json.loads(aegis.ctl_in_process("ledger", "verify", "--json").ok().out)["ok"] is True

    for n in range(3):
        assert world.call("GET", f"/bear/echo/kept{n}", agent="bot").status == 200
    conn = sqlite3.connect(db)
    try:
        (deleted, mac), = conn.execute("SELECT id, mac FROM ledger ORDER BY id LIMIT 1").fetchall()
    finally:
        conn.close()
    edit(db, "DELETE FROM ledger WHERE id = ?", deleted)
    edit(db, "INSERT INTO checkpoints (time_ms, first_kept_id, prev_mac, pruned, mac) VALUES (0, ?, ?, 1, ?)",
         deleted + 1, mac, b"\1" * 32)
    refused = aegis.ctl_in_process("ledger", "prune", "--before", "0s", "--yes")
    assert refused.code == 1 and "prune checkpoint 3 does not match its MAC: it was forged or altered, or the key " \
        "is wrong; the prune was refused to keep the evidence" in refused.err, refused
    verdict = json.loads(aegis.ctl_in_process("ledger", "verify", "--json").out)
    assert verdict["ok"] is False and verdict["reason"].startswith("prune checkpoint 3 does not match its MAC"), verdict


def verified(aegis: Aegis, *args: str) -> dict[str, Any]:
    """`ledger verify --json` that passes."""
    verdict: dict[str, Any] = json.loads(aegis.ctl_in_process("ledger", "verify", "--json", *args).ok().out)
    assert verdict["ok"] is True, verdict
    assert verdict["tip"] == f"{verdict['last_id']}:{verdict['last_mac']}" and len(verdict["last_mac"]) == 64
    return verdict


def edit_stopped(aegis: Aegis, world: GateWorld, script: str) -> None:
    """Run `script` on ledger.db with aegisd stopped, then start it again and unlock (verify needs the key)."""
    assert aegis.stop() == 0
    conn = sqlite3.connect(aegis.data_dir / "ledger.db", isolation_level=None)
    try:
        conn.executescript(script)
    finally:
        conn.close()
    aegis.start()
    world.unlock()


def test_indexes_that_hide_rows_and_a_cut_off_tail_are_caught() -> None:
    """Found by a cold review, two ways to make rows vanish while `ledger verify` called the ledger intact.
    An index rebuilt without chosen rows, its CREATE INDEX text put back, hid them from every filtered `ledger
    show`, `stats` and `export` (verify walks the table, doctor ran quick_check): verify and doctor now run
    SQLite's full integrity check and name the index and the rows, and prune refuses. And the newest rows
    deleted with SQLite's id counter rewritten leave a chain that verifies: verify now prints its tip, and
    `--expect-tip` with an earlier tip fails on such a ledger, also once the daemon has written past it."""
    world = world_with_traffic()
    try:
        aegis, db = world.aegis, world.aegis.data_dir / "ledger.db"
        world.agent("spy", "bear")
        for n in range(3):
            assert world.call("GET", f"/bear/echo/bot{n}", agent="bot").status == 200
            assert world.call("DELETE", f"/bear/echo/spy{n}", agent="spy").status == 200
        spy_ids = sorted(row["id"] for row in world.ledger("--agent", "spy"))
        assert len(spy_ids) == 3

        # The tip: printed for people and in JSON, and it moves with every row appended.
        first = verified(aegis)
        human = aegis.ctl_in_process("ledger", "verify").ok().out
        assert f"Tip: {first['tip']}" in human, human
        assert world.call("GET", "/bear/echo/more", agent="bot").status == 200
        second = verified(aegis)
        assert second["last_id"] > first["last_id"] and second["last_mac"] != first["last_mac"]
        compared = verified(aegis, "--expect-tip", first["tip"])
        assert f"it holds row {first['last_id']}, the tip of an earlier verify, unchanged" in compared["reason"]
        mac = first["last_mac"]
        # A second review: an id past int64 crashed aegisctl (exit 1, as for tampering); `1_0` read as 10.
        for bad in (f"{first['last_id']}:abcd", f"{2**63}:{mac}", f"99999999999999999999:{mac}", f"1_0:{mac}",
                    f"+1:{mac}"):
            bad_tip = aegis.ctl_in_process("ledger", "verify", "--expect-tip", bad)
            assert bad_tip.code == 2 and "64 hex digits" in bad_tip.err and "Traceback" not in bad_tip.err, bad_tip

        # Indexes rebuilt without the spy's rows, their schema text put back.
        edit_stopped(aegis, world, """
            DROP INDEX ledger_agent;  CREATE INDEX ledger_agent ON ledger (agent, id) WHERE agent != 'spy';
            DROP INDEX ledger_denied; CREATE INDEX ledger_denied ON ledger (id) WHERE decision = 'denied' AND 0;
            PRAGMA writable_schema = ON;
            UPDATE sqlite_master SET sql = 'CREATE INDEX ledger_agent ON ledger (agent, id)'
                WHERE name = 'ledger_agent';
            UPDATE sqlite_master SET sql = 'CREATE INDEX ledger_denied ON ledger (id) WHERE decision = ''denied'''
                WHERE name = 'ledger_denied';
            PRAGMA writable_schema = OFF;""")
        assert world.ledger("--agent", "spy") == []  # hidden from the filtered reads ...
        assert json.loads(aegis.ctl_in_process("ledger", "stats", "--json", "--agent", "spy").ok().out)["rows"] == 0
        verdict, human = verify(aegis)  # ... and no longer from verify
        lacks = f"index ledger_agent lacks rows {spy_ids[0]}, {spy_ids[1]}, {spy_ids[2]}"
        assert lacks in verdict["reason"], verdict
        assert "do not see those rows" in verdict["reason"] and "(the chain itself verifies:" in verdict["reason"]
        assert verdict["first_bad_id"] is None
        assert human.startswith("Ledger TAMPERED: ledger.db fails SQLite's integrity check: ") and lacks in human
        doctor = aegis.ctl_in_process("doctor", "--json")
        assert doctor.code == 1
        database = next(c for c in json.loads(doctor.out)["checks"] if c["name"] == "database")
        assert database["status"] == "fail" and lacks in database["message"], database
        refused = aegis.ctl_in_process("ledger", "prune", "--before", "0s", "--yes")
        assert refused.code == 1 and "refused to keep the evidence" in refused.err and lacks in refused.err, refused
        # REINDEX rebuilds the indexes from the rows, as the schema text says.
        edit(db, "REINDEX")
        assert sorted(row["id"] for row in world.ledger("--agent", "spy")) == spy_ids
        tip = verified(aegis)

        # Found by a cold review: the id counter edited to text made verify fail with INTERNAL, and doctor say that
        # its check itself failed (TypeError). It is tampering, said as such.
        edit(db, "UPDATE sqlite_sequence SET seq = CAST(seq AS TEXT) WHERE name = 'ledger'")
        counter = "the ledger's id counter (sqlite_sequence) is not an integer (str): it was edited"
        verdict = json.loads(aegis.ctl_in_process("ledger", "verify", "--json").out)
        assert verdict["ok"] is False and verdict["reason"] == counter, verdict
        doctor = json.loads(aegis.ctl_in_process("doctor", "--json").out)
        chain = next(c for c in doctor["checks"] if c["name"] == "ledger_chain")
        assert chain["status"] == "fail" and counter in chain["message"], chain
        edit(db, "UPDATE sqlite_sequence SET seq = CAST(seq AS INTEGER) WHERE name = 'ledger'")

        # The newest rows cut off and the id counter rewritten: the chain alone verifies, the earlier tip does not.
        cut = spy_ids[-1]
        edit(db, "DELETE FROM ledger WHERE id > ?", cut)
        edit(db, "UPDATE sqlite_sequence SET seq = ? WHERE name = 'ledger'", cut)
        # The running aegisd knows the newest row it wrote (test_rows_cut_from_the_end_while_aegisd_runs_are_caught);
        # a new run knows only the file.
        assert "the newest row the running aegisd has written, is not in ledger.db" in verify(aegis)[0]["reason"]
        assert aegis.stop() == 0
        aegis.start()
        world.unlock()
        after = verified(aegis)  # what a chain alone can say
        assert after["tip"] != tip["tip"] and after["last_id"] < tip["last_id"], (after, tip)
        verdict, human = verify_with(aegis, tip["tip"])
        gone = f"row {tip['last_id']}, the tip of an earlier verify, is gone (the ledger ends at row "
        assert gone in verdict["reason"], verdict
        assert "id counter rewritten" in human
        # Found by a cold review: a restore of an older backup looks the same, and the ledger records it: say so.
        no_restore = "a backup taken before that tip was restored (a restore adds a `backup_restored` row, and this " \
            "ledger has none)"
        assert no_restore in verdict["reason"], verdict
        while verified(aegis)["last_id"] < tip["last_id"]:  # the daemon writes on, past the old tip's id
            assert world.call("GET", "/bear/echo/again", agent="bot").status == 200
        verdict, _ = verify_with(aegis, tip["tip"])
        assert f"row {tip['last_id']}, the tip of an earlier verify, is not the row that verify saw (its MAC differs)" \
            in verdict["reason"], verdict
        assert "a backup taken before that tip was restored and the ledger written on from there (a restore adds a " \
            "`backup_restored` row, and this ledger has none)" in verdict["reason"], verdict

        # A backup taken before the tip, restored: verify points at the row that records the restore.
        backup = aegis.root / "before-the-tip.backup"
        aegis.ctl_in_process("backup", str(backup)).ok()
        assert world.call("GET", "/bear/echo/after-the-backup", agent="bot").status == 200
        tip = verified(aegis)
        aegis.ctl_in_process("lock").ok()
        aegis.ctl_in_process("restore", str(backup), "--yes").ok()
        world.unlock()
        shown = json.loads(aegis.ctl_in_process("ledger", "show", "--json", "--limit", "1000").ok().out)
        [restored] = [r for r in shown if r["reason"] == "backup_restored"]
        verdict, _ = verify_with(aegis, tip["tip"])
        assert f"row {tip['last_id']}, the tip of an earlier verify, " in verdict["reason"], verdict
        # "is not the row that verify saw" here (the restored ledger has reached the tip's id again), else "is gone"
        assert "a backup taken before that tip was restored" in verdict["reason"], verdict
        assert f"(row {restored['id']}, `backup_restored`, records the latest restore and when its backup was taken)" \
            in verdict["reason"], verdict
        world.assert_no_leaks()
    finally:
        world.close()


def verify_with(aegis: Aegis, tip: str) -> tuple[dict[str, Any], str]:
    """`ledger verify --expect-tip TIP`, --json and human; both must fail."""
    as_json = aegis.ctl_in_process("ledger", "verify", "--json", "--expect-tip", tip)
    human = aegis.ctl_in_process("ledger", "verify", "--expect-tip", tip)
    assert as_json.code == 1 and human.code == 1, (as_json.out, human.out)
    verdict: dict[str, Any] = json.loads(as_json.out)
    assert verdict["ok"] is False
    return verdict, human.out


REPLACED = "ledger.db was replaced or removed while aegisd was running"


def consistent_copy(db: Path, copy: Path) -> Path:
    """A copy of the live ledger.db as SQLite's backup API takes it (one read snapshot)."""
    src, dst = sqlite3.connect(db), sqlite3.connect(copy)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    return copy


def test_a_copy_renamed_over_the_ledger_stops_the_gate() -> None:
    """Found by a cold review: someone who can write the data directory takes a consistent copy of ledger.db,
    renames it over the original and removes its -wal and -shm. aegisd went on committing into the file it had
    open, which nothing could read any more: the gate answered 200, `ledger show` lacked the new rows, `ledger
    verify` (also with `--expect-tip`) passed, and after a restart those rows were gone for good. The writer now
    checks at each commit that the path still names the file it opened, and fails closed as for any failed
    write; verify says what happened and that the file lacks the newest row aegisd wrote."""
    world = GateWorld.start()
    try:
        up = world.upstream()
        world.credential("bear", SECRET, up.entry())
        world.agent("bot", "bear")
        aegis, db = world.aegis, world.aegis.data_dir / "ledger.db"
        for n in range(3):
            assert world.call("GET", f"/bear/echo/before{n}", agent="bot").status == 200
        tip = verified(aegis)

        copy = consistent_copy(db, aegis.data_dir / "copy.db")
        for n in range(2):  # committed to the file aegisd has open, after the copy was taken
            assert world.call("GET", f"/bear/echo/after-the-copy{n}", agent="bot").status == 200
        newest = max(row["id"] for row in world.ledger())
        os.replace(copy, db)
        for suffix in ("-wal", "-shm"):
            (aegis.data_dir / f"ledger.db{suffix}").unlink(missing_ok=True)

        # The first request after the swap was forwarded (the commit finds it), its answer withheld; the next is not.
        caught = world.call("GET", "/bear/echo/caught", agent="bot")
        assert caught.status == 503 and caught.error()["code"] == "ledger_unavailable", caught.text()
        assert len(up.requests_to("/echo/caught")) == 1
        held = world.call("GET", "/bear/echo/held", agent="bot")
        assert held.status == 503 and held.error()["code"] == "ledger_unavailable", held.text()
        assert "nothing was forwarded" in held.error()["message"] and up.requests_to("/echo/held") == []
        assert request(world.port, "GET", "/_aegis/health").json()["ledger"] == "failing"

        verdict, human = verify(aegis)
        assert verdict["reason"].startswith(f"{REPLACED}: {db} is another file than the one aegisd opened; "), verdict
        assert f"row {newest}, the newest row the running aegisd has written, is not in ledger.db (its chain ends at " \
            f"row {tip['last_id']})" in verdict["reason"], verdict
        assert REPLACED in human
        _, human = verify_with(aegis, tip["tip"])  # the file at the path still holds the earlier tip: not enough
        assert REPLACED in human
        paths = [row["path"] for row in world.ledger()]
        assert not [p for p in paths if "after-the-copy" in p or p in ("/echo/caught", "/echo/held")], paths
        doctor = aegis.ctl_in_process("doctor", "--json")
        assert doctor.code == 1
        check = next(c for c in json.loads(doctor.out)["checks"] if c["name"] == "ledger_chain")
        assert check["status"] == "fail" and check["message"].startswith(REPLACED), check
        log = aegis.log()  # one line, when the writer found it
        assert log.count(REPLACED) == 1 and "ledger commit of" not in log, log

        # A restart goes on from the file at the path (the rows of the window are gone: see docs/SECURITY.md).
        assert aegis.stop() == 0
        assert "stopping with the ledger still unwritable" in aegis.log()
        aegis.start()
        world.unlock()
        assert world.call("GET", "/bear/echo/restarted", agent="bot").status == 200
        verified(aegis)
        world.assert_no_leaks()
    finally:
        world.close()


def test_a_ledger_removed_while_aegisd_runs_stops_the_gate() -> None:
    """The same with ledger.db deleted: nothing is written to the deleted file, and verify says why."""
    world = world_with_traffic()
    try:
        aegis, db = world.aegis, world.aegis.data_dir / "ledger.db"
        assert world.call("GET", "/bear/echo/before", agent="bot").status == 200
        for suffix in ("", "-wal", "-shm"):
            (aegis.data_dir / f"ledger.db{suffix}").unlink(missing_ok=True)
        refused = aegis.ctl_in_process("ledger", "verify", "--json")
        assert refused.code == 1 and f"{REPLACED}: {db} is gone; " in refused.err, refused
        assert f"no ledger at {db}" in refused.err, refused
        assert world.call("GET", "/bear/echo/gone", agent="bot").status == 503
        assert request(world.port, "GET", "/_aegis/health").json()["ledger"] == "failing"
        log = aegis.log()
        assert log.count(f"{REPLACED}: {db} is gone;") == 1, log
        aegis.assert_no_leaks([SECRET, *world.tokens.values()], world.received)  # no ledger left to read
    finally:
        world.close()


def test_rows_cut_from_the_end_while_aegisd_runs_are_caught() -> None:
    """Rows deleted from the end and SQLite's id counter rewritten leave a chain that verifies. While aegisd runs,
    it knows the newest row it wrote: verify fails a file that lacks it, also after aegisd has written on (which it
    does, from what the file holds: the cut is logged, not a reason to stop the gate)."""
    world = world_with_traffic()
    try:
        aegis, db = world.aegis, world.aegis.data_dir / "ledger.db"
        for n in range(4):
            assert world.call("GET", f"/bear/echo/v{n}", agent="bot").status == 200
        newest = verified(aegis)["last_id"]
        cut = newest - 2
        edit(db, "DELETE FROM ledger WHERE id > ?", cut)
        edit(db, "UPDATE sqlite_sequence SET seq = ? WHERE name = 'ledger'", cut)
        verdict, human = verify(aegis)
        assert verdict["reason"] == f"row {newest}, the newest row the running aegisd has written, is not in " \
            f"ledger.db (its chain ends at row {cut}): the file was replaced, or rows were cut from its end, while " \
            "aegisd was running", verdict

        assert world.call("GET", "/bear/echo/on", agent="bot").status == 200
        verdict, human = verify(aegis)
        deleted = f"row {newest}, the newest row aegisd had written then, was deleted from ledger.db while aegisd " \
            "was running: rows were cut from its end by another program"
        assert verdict["reason"].startswith(f"{deleted} (what ledger.db holds now: "), verdict
        assert deleted in human
        assert aegis.log().count(deleted) == 1
        world.assert_no_leaks()
    finally:
        world.close()


def test_a_ledger_renamed_over_with_its_log_left_is_not_damaged_at_the_next_start() -> None:
    """Found by a review of the fix above: with only ledger.db renamed over (a plain `mv`, its -wal left), the
    -wal at the path was still the old file's. aegisd no longer closes that connection at stop (closing would
    remove whatever log is at the path), so the old file's pages stayed in the log and the next start applied them
    to the copy: its integrity check failed and verify reported rows missing. The log is now emptied into the file
    it belongs to as soon as the swap is found."""
    world = world_with_traffic()
    try:
        aegis, db = world.aegis, world.aegis.data_dir / "ledger.db"
        for n in range(3):
            assert world.call("GET", f"/bear/echo/before{n}", agent="bot").status == 200
        copy = consistent_copy(db, aegis.data_dir / "copy.db")
        for n in range(40):  # enough pages in the log to damage the copy were they applied to it
            assert world.call("GET", f"/bear/echo/after-the-copy{n}", agent="bot").status == 200
        os.replace(copy, db)  # -wal and -shm left where they are
        assert world.call("GET", "/bear/echo/caught", agent="bot").status == 503
        assert aegis.stop() == 0
        aegis.start()
        world.unlock()
        assert world.call("GET", "/bear/echo/restarted", agent="bot").status == 200
        verdict = verified(aegis)  # the integrity check included
        assert "after-the-copy" not in json.dumps(world.ledger()) and verdict["last_id"] > 0
        world.assert_no_leaks()
    finally:
        world.close()
