"""Helpers for the policy and rate-limit tests: a gate world with a policy directory, policy files
written atomically, waiting for a reload by its count, and time windows relative to the real clock.

Windows are computed by the test in the policy's own timezone from the real current time, so the
daemon's real clock path is what gets tested; there is no clock backdoor in the daemon.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.e2e.gate_support import GateWorld, Reply, write_config
from tests.harness import PASSPHRASE, new_aegis
from tests.upstreams import make_pki

RELOAD_DEADLINE_SECONDS = 20.0
Expected = tuple[Reply, str, str, "str | None"]  # reply, decision, reason, flags (None: not checked)


def policy_world(files: dict[str, str] | None = None, **gate: float) -> tuple[GateWorld, Path]:
    """A started, initialised daemon whose policy directory holds `files`; [gate] settings as given."""
    aegis = new_aegis()
    policies = aegis.root / "policies"
    policies.mkdir()
    for name, text in (files or {}).items():
        (policies / name).write_text(text)
    pki = make_pki(aegis.root / "pki")
    aegis.env.update({"SSL_CERT_FILE": str(pki.ca_pem), "AEGIS_POLICIES_DIR": str(policies)})
    if gate:
        aegis.env["AEGIS_CONFIG"] = str(write_config(aegis.root, **gate))
    try:
        aegis.start()
        aegis.init()
    except BaseException:
        aegis.cleanup()
        raise
    return GateWorld(aegis, pki, secrets=[PASSPHRASE]), policies


def write_policy(directory: Path, name: str, text: str) -> None:
    """Replace a policy file the way editors do (write aside, rename), so no reload sees half a file."""
    staging = directory / f".{name}.tmp"
    staging.write_text(text)
    os.replace(staging, directory / name)


def policy_status(world: GateWorld) -> dict[str, Any]:
    value = json.loads(world.aegis.ctl("policy", "list", "--json").ok().out)
    assert isinstance(value, dict)
    return value


def wait_reloads(world: GateWorld, beyond: int) -> dict[str, Any]:
    """Poll `policy list` until the daemon has reloaded more than `beyond` times (ordering, not timing)."""
    deadline = time.monotonic() + RELOAD_DEADLINE_SECONDS
    while True:
        status = policy_status(world)
        if status["reloads"] > beyond:
            return status
        assert time.monotonic() < deadline, f"no reload after {beyond}: {status}"
        time.sleep(0.2)


def system_rows(world: GateWorld) -> list[dict[str, Any]]:
    """The ledger's system events, newest first."""
    rows = json.loads(world.aegis.ctl("ledger", "show", "--json", "--limit", "100000").ok().out)
    return [row for row in rows if row["kind"] == "system"]


def hhmm(moment: datetime) -> str:
    return moment.strftime("%H:%M")


def noon_zone() -> tuple[str, datetime]:
    """An Etc/GMT zone in which it is now between 12:00 and 12:59, and the local time there.

    Windows around local noon that span midnight (start later in the day than end) are then
    unambiguous for the next ten hours whatever the real time of day is.
    """
    now = datetime.now(UTC)
    offset = (12 - now.hour + 12) % 24 - 12  # -12..11 hours east of UTC
    # POSIX sign convention: Etc/GMT-3 is three hours *east* (UTC+3).
    name = "Etc/GMT" if offset == 0 else f"Etc/GMT{-offset:+d}"
    return name, now + timedelta(hours=offset)


def refusal(reply: Reply, status: int, code: str) -> dict[str, str]:
    """The agent got `status` with error `code` (its ledger row is checked in a batch by `check_rows`)."""
    assert reply.status == status, reply.text()
    error = reply.error()
    assert error["code"] == code, error
    return error


def check_rows(world: GateWorld, expected: list[Expected]) -> None:
    """One ledger read for many requests: each (reply, decision, reason, flags or None to skip)."""
    rows = world.ledger()
    for reply, decision, reason, flags in expected:
        row = world.row(reply.request_id, rows)
        assert (row["decision"], row["reason"], row["status"]) == (decision, reason, reply.status), row
        if flags is not None:
            assert row["flags"] == flags, row
