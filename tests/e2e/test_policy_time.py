"""Time windows and the instants they are judged at, through the real daemon and aegisctl: a host without a
timezone database, zone rules changed under a running daemon, and what `policy test --at` judged.

The daemon gets its own PYTHONTZPATH (the directories zoneinfo searches for the system's database): an empty
one stands for a host that has none, a private one holds a zone the test writes and rewrites.
"""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

from tests.e2e.gate_support import GateWorld
from tests.e2e.policy_support import hhmm, policy_status, policy_world, refusal, wait_reloads
from tests.harness import PASSPHRASE, new_aegis
from tests.upstreams import make_pki

SECRET = "sk-policy-time-secret-4Rt7Wq2Zx9"
NO_DATABASE = "aegisd found no timezone database"


def _world(files: dict[str, str], daemon_env: dict[str, str]) -> tuple[GateWorld, Path]:
    """policy_world's daemon, with `daemon_env` for it alone (aegisctl, run in this process too, keeps the test's
    own timezone database), and one upstream as credential `svc` for service `svc`."""
    aegis = new_aegis()
    policies = aegis.root / "policies"
    policies.mkdir()
    for name, text in files.items():
        (policies / name).write_text(text)
    pki = make_pki(aegis.root / "pki")
    aegis.env.update({"SSL_CERT_FILE": str(pki.ca_pem), "AEGIS_POLICIES_DIR": str(policies)})
    try:
        aegis.start(env=daemon_env)
        aegis.init()
    except BaseException:
        aegis.cleanup()
        raise
    world = GateWorld(aegis, pki, secrets=[PASSPHRASE])
    world.credential("svc", SECRET, world.upstream().entry())
    return world, policies


def _around_now(offset_hours: int = 0) -> str:
    """A window from two hours before to two after the current time at UTC+`offset_hours`: open now, and closed
    at any time more than two hours away (ten hours away, say)."""
    local = datetime.now(UTC) + timedelta(hours=offset_hours)
    return f'{{start: "{hhmm(local - timedelta(hours=2))}", end: "{hhmm(local + timedelta(hours=2))}"'


def _judge(world: GateWorld, agent: str, at: str, method: str = "GET") -> dict[str, Any]:
    """`policy test --json` for `method` /x of service svc at `at`."""
    result = world.aegis.ctl_in_process("policy", "test", "--agent", agent, "--service", "svc", "--method", method,
                                        "--path", "/x", "--at", at, "--json").ok()
    value = json.loads(result.out)
    assert isinstance(value, dict)
    return value


def _issues(status: dict[str, Any], name: str) -> list[dict[str, Any]]:
    (found,) = [f for f in status["files"] if f["name"] == name]
    issues = found["issues"]
    assert isinstance(issues, list)
    return issues


UTC_POLICY = "agent: bot\nrules:\n  - service: svc\n    time_window: {window}}}\n"
BERLIN_POLICY = ('agent: berliner\nrules:\n  - service: svc\n    time_window: {start: "09:00", end: "10:00", '
                 "timezone: Europe/Berlin}\n")


def test_without_any_timezone_database_utc_windows_work_and_a_named_zone_says_why_it_cannot(tmp_path: Path) -> None:
    """Reading the UTC default from the database made every file with a time window invalid on such a host, as
    `could not parse this file: ZoneInfoNotFoundError`. The tzdata package is hidden from the daemon by an empty
    one first on its path, so the host has no database at all."""
    empty = tmp_path / "zoneinfo"
    empty.mkdir()
    hidden = tmp_path / "no-tzdata"
    (hidden / "tzdata").mkdir(parents=True)
    (hidden / "tzdata" / "__init__.py").write_text('"""No timezone data: stands in for a missing tzdata package."""\n')
    path = os.pathsep.join(p for p in (str(hidden), os.environ.get("PYTHONPATH", "")) if p)
    explicit = 'agent: ops\nrules:\n  - service: svc\n    time_window: {start: "22:00", end: "06:00", timezone: UTC}\n'
    world, _ = _world({"utc.yaml": UTC_POLICY.format(window=_around_now()), "explicit.yaml": explicit,
                       "berlin.yaml": BERLIN_POLICY}, {"PYTHONTZPATH": str(empty), "PYTHONPATH": path})
    try:
        world.agent("bot", "svc")
        world.agent("berliner", "svc")
        status = policy_status(world)
        assert [issue["message"] for name in ("utc.yaml", "explicit.yaml") for issue in _issues(status, name)] == []
        # The window without a timezone is UTC's, on the real clock, at the gate.
        assert world.call("GET", "/svc/echo/x", agent="bot").status == 200
        # `timezone: UTC` needs no database either: 22:00-06:00 judged in UTC.
        assert _judge(world, "ops", "2030-01-01T23:00:00Z")["decision"] == "allowed"
        assert _judge(world, "ops", "2030-01-01T12:00:00Z")["decision"] == "denied"

        # A named zone cannot be looked up: the issue names it and says that no database was found, where.
        (issue,) = _issues(status, "berlin.yaml")
        assert (issue["line"], issue["field"]) == (4, "rules[0].time_window.timezone"), issue
        assert issue["message"].startswith(f"timezone 'Europe/Berlin' cannot be looked up: {NO_DATABASE} "
                                           f"(searched {empty} and the tzdata Python package)"), issue
        assert "could not parse" not in json.dumps(status)
        refusal(world.call("GET", "/svc/echo/x", agent="berliner"), 403, "policy_invalid")  # fails closed
        world.assert_no_leaks()
    finally:
        world.close()


def test_without_a_system_timezone_database_the_tzdata_package_provides_named_zones(tmp_path: Path) -> None:
    """The tzdata package (a dependency) is zoneinfo's fallback when the system has no database."""
    empty = tmp_path / "zoneinfo"
    empty.mkdir()
    world, _ = _world({"utc.yaml": UTC_POLICY.format(window=_around_now()), "berlin.yaml": BERLIN_POLICY},
                      {"PYTHONTZPATH": str(empty)})
    try:
        world.agent("bot", "svc")
        status = policy_status(world)
        assert [issue["message"] for f in status["files"] for issue in f["issues"]] == []
        assert world.call("GET", "/svc/echo/x", agent="bot").status == 200
        # 09:00-10:00 Berlin time, daylight saving included: 08:30Z is 09:30 in winter, 07:30Z in summer.
        for at, decision in (("2030-01-01T08:30:00Z", "allowed"), ("2030-01-01T09:30:00Z", "denied"),
                             ("2030-07-01T07:30:00Z", "allowed"), ("2030-07-01T08:30:00Z", "denied")):
            assert _judge(world, "berliner", at)["decision"] == decision, at
    finally:
        world.close()


def _zone_file(name: str) -> bytes:
    """The TZif file of zone `name` from the tzdata package."""
    return resources.files("tzdata").joinpath("zoneinfo", *name.split("/")).read_bytes()


def _install_zone(directory: Path, data: bytes) -> None:
    """Write Test/Zone as a tzdata update would: aside, then renamed over the old file."""
    staging = directory / "Test" / ".Zone.tmp"
    staging.write_bytes(data)
    os.replace(staging, directory / "Test" / "Zone")


def test_changed_zone_rules_apply_at_the_next_reload_without_a_restart(tmp_path: Path) -> None:
    """ZoneInfo's cache served the rules a zone was first read with until aegisd restarted, whatever reload
    came after a tzdata update. Test/Zone is UTC+5 (Etc/GMT-5), then becomes UTC-5 (Etc/GMT+5): ten hours
    apart, so a window open now around UTC+5's local time is closed in UTC-5's."""
    zones = tmp_path / "zoneinfo"
    (zones / "Test").mkdir(parents=True)
    _install_zone(zones, _zone_file("Etc/GMT-5"))
    # GET on the real clock at the gate; POST in a fixed window, for `policy test --at`.
    policy = (f"agent: bot\nrules:\n  - service: svc\n    methods: [GET]\n    time_window: {_around_now(5)}, "
              "timezone: Test/Zone}\n  - service: svc\n    methods: [POST]\n    time_window: "
              '{start: "16:00", end: "18:00", timezone: Test/Zone}\n')
    world, _ = _world({"bot.yaml": policy}, {"PYTHONTZPATH": str(zones)})
    try:
        world.agent("bot", "svc")
        assert world.call("GET", "/svc/echo/x", agent="bot").status == 200
        assert _judge(world, "bot", "2030-01-01T12:00:00Z", "POST")["decision"] == "allowed"  # 17:00 at UTC+5

        _install_zone(zones, _zone_file("Etc/GMT+5"))
        # Zones are resolved when the policies load: the gate's requests never read the database.
        assert world.call("GET", "/svc/echo/x", agent="bot").status == 200
        reloaded = world.aegis.ctl("policy", "reload", "--json").ok()
        assert json.loads(reloaded.out)["files"][0]["issues"] == []
        denied = world.call("GET", "/svc/echo/x", agent="bot")
        assert "time window" in refusal(denied, 403, "policy_denied")["message"]
        assert world.row(denied.request_id)["flags"] == "policy=time_window@bot.yaml#rules[0]"
        assert _judge(world, "bot", "2030-01-01T12:00:00Z", "POST")["decision"] == "denied"  # 07:00 at UTC-5
        # The second window of the same zone follows too: 17:00 at UTC-5 is 22:00Z.
        assert _judge(world, "bot", "2030-01-01T22:00:00Z", "POST")["decision"] == "allowed"

        # And back, by SIGHUP: the same daemon, never restarted.
        _install_zone(zones, _zone_file("Etc/GMT-5"))
        reloads = policy_status(world)["reloads"]
        assert world.aegis.proc is not None
        world.aegis.proc.send_signal(signal.SIGHUP)
        wait_reloads(world, reloads)
        assert world.call("GET", "/svc/echo/x", agent="bot").status == 200
        assert _judge(world, "bot", "2030-01-01T12:00:00Z", "POST")["decision"] == "allowed"
        world.assert_no_leaks()
    finally:
        world.close()


def _field(text: str, key: str) -> str:
    """The value of line `key:` in `policy test`'s human output."""
    lines = [line for line in text.splitlines() if line.startswith(f"{key}:")]
    assert len(lines) == 1, f"no single {key!r} line in:\n{text}"
    return lines[0].removeprefix(f"{key}:").strip()


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_policy_test_prints_the_instant_it_judged() -> None:
    """`--at 45m` is 45 minutes ago and a time without an offset is UTC: the output says which instant that was.
    The window is open from three hours to half an hour ago, so an age read as "45 minutes ahead", or the
    instant printed and the one judged differing, shows in the decision."""
    now = datetime.now(UTC)
    window = f'{{start: "{hhmm(now - timedelta(hours=3))}", end: "{hhmm(now - timedelta(minutes=30))}"}}'
    world, _ = policy_world({"bot.yaml": f"agent: bot\nrules:\n  - service: svc\n    time_window: {window}\n"})
    try:
        ctl = world.aegis.ctl
        base = ("policy", "test", "--agent", "bot", "--service", "svc", "--method", "GET", "--path", "/x")

        # An age: that long ago, judged and printed, in the human output and in --json.
        before = time.time()
        ago = ctl(*base, "--at", "45m").ok().out
        ago_json = json.loads(ctl(*base, "--at", "45m", "--json").ok().out)
        after = time.time()
        assert (_field(ago, "decision"), ago_json["decision"]) == ("allowed", "allowed"), (ago, ago_json)
        for printed in (_field(ago, "at"), ago_json["at"]):
            assert printed.endswith("Z"), printed
            assert before - 2700 - 1 <= _epoch(printed) <= after - 2700, (printed, before, after)

        # No --at: now, which is outside the window, and printed too.
        before = time.time()
        current = json.loads(ctl(*base, "--json").ok().out)
        after = time.time()
        assert current["decision"] == "denied", current
        assert before - 1 <= _epoch(current["at"]) <= after, (current, before, after)

        # A time without an offset is UTC; one with an offset is converted; both printed as UTC.
        for at, printed in (("2030-01-01T09:15", "2030-01-01T09:15:00.000Z"),
                            ("2030-01-01T09:15:00+05:00", "2030-01-01T04:15:00.000Z"),
                            ("2030-01-01T09:15:30.250Z", "2030-01-01T09:15:30.250Z")):
            assert _field(ctl(*base, "--at", at).ok().out, "at") == printed, at
            assert json.loads(ctl(*base, "--at", at, "--json").ok().out)["at"] == printed, at

        helped = " ".join(ctl("policy", "test", "--help").ok().out.split())
        assert "UTC unless it names an offset" in helped and "an age, meaning that long ago" in helped, helped
    finally:
        world.close()
