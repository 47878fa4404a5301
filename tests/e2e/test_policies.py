"""Policy files through the real daemon, a real upstream and aegisctl: what each rule allows and denies,
time windows on the real clock, the three modes and their ledger rows, validation errors, reloads."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from aegisd.api.aegis.v1 import policy_pb2, policy_pb2_grpc
from tests.e2e.gate_support import GateWorld, read_reply, untouched
from tests.e2e.policy_support import (
    RELOAD_DEADLINE_SECONDS,
    Expected,
    check_rows,
    hhmm,
    noon_zone,
    policy_status,
    policy_world,
    refusal,
    wait_reloads,
    write_policy,
)
from tests.e2e.support import assert_failed, policy_status_in_process
from tests.harness import Aegis

SECRET = "sk-policy-test-secret-7Hq2Lm9Xv4"
OTHER_SECRET = "sk-policy-other-secret-3Np8Kd1Wz6"

BOT_POLICY = """\
# research-bot may read its repositories and the user, and open issues
agent: bot
rules:
  - service: svc
    methods: [GET]
    paths: ["/echo/repos/acme/.*", "/echo/user", "/echo/files/[^/]+[.]txt"]
  - service: svc
    methods: [post]
    paths: ["/echo/repos/acme/[a-z]+/issues"]
"""


# policy_support's system_rows and wait_reloads, with aegisctl run in this process: reads (and a poll) around what
# these tests check; `policy list`, `policy test`, `policy validate` and `policy reload` run as the program too.
def system_rows_in_process(world: GateWorld) -> list[dict[str, Any]]:
    """The ledger's system events, newest first."""
    rows = json.loads(world.aegis.ctl_in_process("ledger", "show", "--json", "--limit", "100000").ok().out)
    return [row for row in rows if row["kind"] == "system"]


def wait_reloads_in_process(world: GateWorld, beyond: int) -> dict[str, Any]:
    """Poll `policy list` until the daemon has reloaded more than `beyond` times (ordering, not timing)."""
    deadline = time.monotonic() + RELOAD_DEADLINE_SECONDS
    while True:
        status = policy_status_in_process(world.aegis)
        if status["reloads"] > beyond:
            return status
        assert time.monotonic() < deadline, f"no reload after {beyond}: {status}"
        time.sleep(0.2)


def _world(files: dict[str, str], **gate: float) -> tuple[GateWorld, Path]:
    world, directory = policy_world(files, **gate)
    up = world.upstream()
    world.credential("svc", SECRET, up.entry())
    world.credential("other", OTHER_SECRET, up.entry())
    return world, directory


def test_rules_allow_and_deny_by_method_path_and_service() -> None:
    world, _ = _world({"bot.yaml": BOT_POLICY})
    try:
        up = world.upstreams[0]
        world.agent("bot", "svc", "other")
        world.agent("free", "svc", "other")

        expected: list[Expected] = []
        # Allowed: method and whole path match some rule for the service.
        for method, target in (("GET", "/svc/echo/user"), ("GET", "/svc/echo/repos/acme/widgets"),
                               ("GET", "/svc/echo/%75ser"),  # decoded before matching
                               # with and without its `;` parameters (a Java servlet upstream drops them)
                               ("GET", "/svc/echo/repos/acme/widgets;v=1/tags;jsessionid=1"),
                               ("GET", "/svc/echo/files/a%3B.txt"),  # encoded: no parameter to a servlet either
                               ("POST", "/svc/echo/repos/acme/widgets/issues")):
            reply = world.call(method, target, agent="bot", body=b"{}" if method == "POST" else None)
            assert reply.status == 200, reply.text()
            expected.append((reply, "allowed", "", ""))

        # Denied, and nothing reaches the upstream: anchored paths, methods, services without a rule.
        with untouched(up):
            cases = [("GET", "/svc/echo/x/user", "path"), ("GET", "/svc/echo/user/x", "path"),
                     ("GET", "/svc/echo/repos/acme", "path"), ("DELETE", "/svc/echo/user", "method"),
                     ("POST", "/svc/echo/repos/acme/widgets", "path"), ("GET", "/other/echo/user", "no_rule"),
                     # found by a cold review at the 27th stop: Tomcat, Jetty and Spring serve /files/secret.pdf
                     ("GET", "/svc/echo/files/secret.pdf;.txt", "path")]
            for method, target, miss in cases:
                reply = world.call(method, target, agent="bot")
                message = refusal(reply, 403, "policy_denied")["message"]
                assert "no rule" in message
                assert ("judged without them too" in message) == (";" in target), message
                rule = {"method": "#rules[0]", "path": "#rules[0]" if method == "GET" else "#rules[1]"}.get(miss)
                expected.append((reply, "denied", "policy_denied",
                                 f"policy={miss}@bot.yaml{rule}" if rule else "policy=no_rule"))
        check_rows(world, expected)

        # An agent no policy names is governed by its grants and scopes only.
        for target in ("/svc/echo/x/user", "/other/echo/anything"):
            assert world.call("GET", target, agent="free").status == 200

        # policy test prints the decision and the rule that decided.
        allowed = json.loads(world.aegis.ctl("policy", "test", "--agent", "bot", "--service", "svc", "--method",
                                             "GET", "--path", "/echo/repos/acme/x", "--json").ok().out)
        assert allowed["decision"] == "allowed" and allowed["mode"] == "enforce"
        assert allowed["rule"] == {"file": "bot.yaml", "index": 0, "line": 4, "ref": "bot.yaml#rules[0]"}
        issues = world.aegis.ctl("policy", "test", "--agent", "bot", "--service", "svc", "--method", "post",
                                 "--path", "/echo/repos/acme/a/issues").ok()
        assert "allowed" in issues.out and "bot.yaml#rules[1] (line 7)" in issues.out
        denied = world.aegis.ctl_in_process("policy", "test", "--agent", "bot", "--service", "svc", "--method", "GET",
                                            "--path", "/echo/x/user").ok()
        assert "denied" in denied.out and "path matches none" in denied.out
        free = json.loads(world.aegis.ctl_in_process("policy", "test", "--agent", "free", "--service", "svc",
                                                     "--method", "GET", "--path", "/x", "--json").ok().out)
        assert free["decision"] == "ungoverned" and free["rule"] is None
        bad = world.aegis.ctl_in_process("policy", "test", "--agent", "bot", "--service", "svc", "--method", "FETCH",
                                         "--path", "/x")
        assert_failed(bad, "method 'FETCH'")

        status = policy_status_in_process(world.aegis)
        assert status["files"] == [{"name": "bot.yaml", "agent": "bot", "mode": "enforce", "rules": 2,
                                    "valid": True, "issues": [], "warnings": []}]
        assert status["agents"] == [{"agent": "bot", "state": "enforce", "files": ["bot.yaml"], "rules": 2,
                                     "services": ["svc"]}]
        assert status["trigger"] == "startup" and status["reloads"] == 1
        listed = world.aegis.ctl("policy", "list").ok().out
        assert "bot.yaml" in listed and "enforce" in listed and "ok" in listed
        world.assert_no_leaks()
    finally:
        world.close()


def test_time_windows_on_the_real_clock() -> None:
    zone, _ = noon_zone()  # it is 12:xx in `zone` now
    berlin = datetime.now(ZoneInfo("Europe/Berlin"))

    def rule(service: str, start: str, end: str, tz: str = zone) -> str:
        return (f"  - service: {service}\n    time_window: {{start: \"{start}\", end: \"{end}\", "
                f"timezone: {tz}}}\n")

    policy = "agent: bot\nrules:\n" + "".join([
        rule("day-in", "11:00", "14:00"),
        rule("day-out", "14:00", "15:00"),
        rule("night-in", "11:00", "10:00"),  # spans midnight, includes 12:xx
        rule("night-out", "14:00", "10:00"),  # spans midnight, excludes 12:xx
        rule("berlin", hhmm(berlin - timedelta(hours=2)), hhmm(berlin + timedelta(hours=2)), "Europe/Berlin"),
        rule("fixed", "22:00", "06:00", "UTC"),
        rule("far-east", "09:00", "18:00", "Pacific/Kiritimati"),  # UTC+14
        rule("far-west", "09:00", "18:00", "Etc/GMT+12"),  # UTC-12
    ])
    world, _ = policy_world({"bot.yaml": policy})
    try:
        up = world.upstream()
        services = ("day-in", "day-out", "night-in", "night-out", "berlin")
        for index, service in enumerate(services):
            world.credential(service, f"{SECRET}-{index}", up.entry())
        world.agent("bot", *services)
        for service, expected in (("day-in", 200), ("night-in", 200), ("berlin", 200)):
            reply = world.call("GET", f"/{service}/echo/x", agent="bot")
            assert reply.status == expected, (service, reply.text())
        for service in ("day-out", "night-out"):
            reply = world.call("GET", f"/{service}/echo/x", agent="bot")
            row = world.assert_refused(reply, 403, "policy_denied")
            assert row["flags"] == "policy=time_window@bot.yaml#rules[" + str(services.index(service)) + "]"
            assert "time window" in reply.error()["message"]

        # The judgement at a chosen instant: a window spanning midnight, end exclusive.
        for at, decision in (("2030-01-01T21:59:00Z", "denied"), ("2030-01-01T22:00:00Z", "allowed"),
                             ("2030-01-01T23:30:00Z", "allowed"), ("2030-01-02T03:00:00Z", "allowed"),
                             ("2030-01-02T05:59:00Z", "allowed"), ("2030-01-02T06:00:00Z", "denied"),
                             ("2030-01-02T12:00:00Z", "denied")):
            result = json.loads(world.aegis.ctl_in_process("policy", "test", "--agent", "bot", "--service", "fixed",
                                                           "--method", "GET", "--path", "/x", "--at", at,
                                                           "--json").ok().out)
            assert result["decision"] == decision, (at, result)

        # The ends of the calendar: the last and first days judged are real dates in every timezone...
        for service, at, decision in (("far-east", "9999-12-30T23:59:59Z", "allowed"),  # 13:59 on 9999-12-31
                                      ("far-west", "0001-01-02T00:00:00Z", "allowed")):  # 12:00 on 0001-01-01
            result = json.loads(world.aegis.ctl_in_process("policy", "test", "--agent", "bot", "--service", service,
                                                           "--method", "GET", "--path", "/x", "--at", at,
                                                           "--json").ok().out)
            assert result["decision"] == decision, (at, result)
        # ... and a time past them is a usage error in aegisctl, never a traceback or a time sent to aegisd...
        for at in ("9999-12-31T23:00:00Z", "9999-12-31T23:59:59-12:00", "0001-01-01T00:00:00+14:00", "999999999d"):
            refused = world.aegis.ctl_in_process("policy", "test", "--agent", "bot", "--service", "far-east",
                                                 "--method", "GET", "--path", "/x", "--at", at)
            assert_failed(refused, "outside the times aegisctl handles", "0001-01-02 to 9999-12-30", code=2)
        # ... and INVALID_ARGUMENT from aegisd to any other client: out of protobuf's range, bad nanos, or a local
        # time past year 9999 (23:59 on 9999-12-31 UTC is 13:59 on 10000-01-01 in Kiritimati).
        with grpc.insecure_channel(f"unix:{world.aegis.socket}") as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            for stamp in (Timestamp(seconds=253402300799), Timestamp(seconds=10**15), Timestamp(seconds=-(10**12)),
                          Timestamp(seconds=0, nanos=-1)):
                with pytest.raises(grpc.RpcError) as caught:
                    stub.Test(policy_pb2.TestPolicyRequest(agent="bot", service="far-east", method="GET", path="/x",
                                                           at=stamp), timeout=30)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (stamp, caught.value)
                assert "between 0001-01-02T00:00:00Z and 9999-12-30T23:59:59Z" in str(caught.value.details())
        assert "control RPC" not in world.aegis.log()
        world.assert_no_leaks()
    finally:
        world.close()


def test_modes_enforce_dry_run_off_and_their_ledger_rows() -> None:
    rules = 'rules:\n  - service: svc\n    methods: [GET]\n    paths: ["/echo/ok"]\n'
    files = {
        "enforced.yaml": "agent: strict\n" + rules,
        "dry.yaml": "agent: trial\nmode: dry-run\n" + rules.replace('["/echo/ok"]', '["/echo/ok"]\n    '
                                                                    "rate_limit: 1/day"),
        "off.yaml": "agent: loose\nmode: off\n" + rules,
    }
    world, _ = _world(files)
    try:
        up = world.upstreams[0]
        for name in ("strict", "trial", "loose"):
            world.agent(name, "svc")

        with untouched(up):
            world.assert_refused(world.call("GET", "/svc/echo/nope", agent="strict"), 403, "policy_denied",
                                 flags="policy=path@enforced.yaml#rules[0]")

        before = len(up.requests)
        dry = world.call("GET", "/svc/echo/nope", agent="trial")
        assert dry.status == 200 and len(up.requests) == before + 1
        row = world.row(dry.request_id)
        assert (row["decision"], row["reason"], row["status"]) == ("allowed", "would_deny", 200)
        assert row["flags"] == "policy=path@dry.yaml#rules[0]"
        # A dry-run rule's rate limit: the first allowed request uses it, the second would be refused.
        first = world.call("GET", "/svc/echo/ok", agent="trial")
        assert world.row(first.request_id)["reason"] == ""
        second = world.call("GET", "/svc/echo/ok", agent="trial")
        assert second.status == 200 and second.header("Retry-After") is None
        row = world.row(second.request_id)
        assert (row["decision"], row["reason"], row["flags"]) == ("allowed", "would_deny",
                                                                   "rate_limit=rule@dry.yaml#rules[0]")

        off = world.call("GET", "/svc/echo/nope", agent="loose")
        assert off.status == 200
        row = world.row(off.request_id)
        assert (row["decision"], row["reason"], row["flags"]) == ("allowed", "", "")

        dry_test = world.aegis.ctl_in_process("policy", "test", "--agent", "trial", "--service", "svc", "--method",
                                              "GET", "--path", "/echo/nope").ok().out
        assert "dry-run" in dry_test and "would_deny" in dry_test
        status = policy_status_in_process(world.aegis)
        assert {a["agent"]: a["state"] for a in status["agents"]} == {"strict": "enforce", "trial": "dry-run"}
        assert {f["name"]: f["mode"] for f in status["files"]} == {"dry.yaml": "dry-run", "enforced.yaml": "enforce",
                                                                    "off.yaml": "off"}
        world.assert_no_leaks()
    finally:
        world.close()


ERROR_FILES = {
    "syntax.yaml": "agent: a\nrules:\n  - service: svc\n    methods: [GET\n",
    "unknown.yaml": "agent: b\nrules:\n  - service: svc\n    verbs: [GET]\n",
    "method.yaml": "agent: c\nrules:\n  - service: svc\n    methods: [GET, FETCH]\n",
    "regex.yaml": "agent: d\nrules:\n  - service: svc\n    paths: [\"/ok\", \"/repos/(acme\"]\n",
    "rate.yaml": "agent: e\nrules:\n  - service: svc\n    rate_limit: 100/fortnight\n",
    "time.yaml": "agent: f\nrules:\n  - service: svc\n    time_window: {start: \"25:00\", end: \"18:00\"}\n",
    "zone.yaml": "agent: g\nrules:\n  - service: svc\n    time_window: {start: \"09:00\", end: \"18:00\", "
                 "timezone: Mars/Olympus_Mons}\n",
    "nozone.yaml": "agent: h\nrules:\n  - service: svc\n    time_window: {start: \"09:00\", end: \"18:00\", "
                   "timezone: \"\"}\n",  # e.g. "${TZ}" with TZ unset: must not drop the window
    "keytag.yaml": "agent: i\nrules:\n  - service: svc\n    !custom methods: [GET]\n",  # 27th stop: it was read
    "many.yaml": ("agent: Not Valid\nmode: sometimes\ncolour: blue\nrules:\n  - service: svc\n"
                  "    methods: [GET, TRACE]\n    paths: [\"[z-a]\"]\n    rate_limit: fast\n"
                  "    time_window: {start: \"9\", end: \"18:00\", timezone: Nowhere/City}\n  - methods: [GET]\n"),
}
EXPECTED = {
    "syntax.yaml": [("syntax.yaml:5:1", "", "YAML syntax error: expected ',' or ']'")],
    "unknown.yaml": [("unknown.yaml:4:5", "rules[0].verbs", "unknown field 'verbs'")],
    "method.yaml": [("method.yaml:4:20", "rules[0].methods[1]", "unknown method 'FETCH'")],
    "regex.yaml": [("regex.yaml:4:20", "rules[0].paths[1]", "invalid regular expression '/repos/(acme'")],
    "rate.yaml": [("rate.yaml:4:17", "rules[0].rate_limit", "rate '100/fortnight' must look like N/sec")],
    "time.yaml": [("time.yaml:4:26", "rules[0].time_window.start", "time '25:00' must be HH:MM")],
    "zone.yaml": [("zone.yaml:4:59", "rules[0].time_window.timezone", "unknown timezone 'Mars/Olympus_Mons'")],
    "nozone.yaml": [("nozone.yaml:4:59", "rules[0].time_window.timezone", "timezone has no value")],
    "keytag.yaml": [("keytag.yaml:4:5", "rules[0].methods", "unsupported YAML tag '!custom'")],
    "many.yaml": [("many.yaml:1:8", "agent", "agent name 'Not Valid'"),
                  ("many.yaml:2:7", "mode", "mode 'sometimes' must be one of: enforce, dry-run, off"),
                  ("many.yaml:3:1", "colour", "unknown field 'colour'"),
                  ("many.yaml:6:20", "rules[0].methods[1]", "unknown method 'TRACE'"),
                  ("many.yaml:7:13", "rules[0].paths[0]", "invalid regular expression '[z-a]'"),
                  ("many.yaml:8:17", "rules[0].rate_limit", "rate 'fast'"),
                  ("many.yaml:9:26", "rules[0].time_window.start", "time '9' must be HH:MM"),
                  ("many.yaml:9:55", "rules[0].time_window.timezone", "unknown timezone 'Nowhere/City'"),
                  ("many.yaml:10:5", "rules[1].service", "missing required field 'service'")],
}


def test_validate_reports_every_error_with_file_line_and_field(aegis: Aegis, tmp_path: Path) -> None:
    for name, text in ERROR_FILES.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "good.yml").write_text(BOT_POLICY)
    (tmp_path / "notes.txt").write_text("not a policy")

    result = aegis.ctl("policy", "validate", str(tmp_path))  # a directory: every *.yaml / *.yml in it
    assert result.code == 1, result.out + result.err
    assert f"{len(ERROR_FILES)} of {len(ERROR_FILES) + 1} file(s)" in result.err
    lines = result.out.splitlines()
    assert f"{tmp_path / 'good.yml'}: ok (agent bot, 2 rules, enforce)" in lines
    for name, expected in EXPECTED.items():
        found = [line for line in lines if line.startswith(f"{tmp_path / name}:")]
        assert len(found) == len(expected), (name, found)
        for line, (where, field, message) in zip(found, expected, strict=True):
            assert line.startswith(f"{tmp_path}/{where}: " + (f"{field}: " if field else "")), (line, where, field)
            assert message in line, (line, message)
    assert "notes.txt" not in result.out

    as_json = aegis.ctl_in_process("policy", "validate", "--json", str(tmp_path / "many.yaml"),
                                   str(tmp_path / "good.yml"))
    assert as_json.code == 1
    files = {Path(f["name"]).name: f for f in json.loads(as_json.out)}
    assert files["good.yml"]["valid"] and not files["good.yml"]["issues"]
    many = files["many.yaml"]
    assert not many["valid"]
    assert [(i["line"], i["field"]) for i in many["issues"]] == [
        (int(w.split(":")[1]), f) for w, f, _ in EXPECTED["many.yaml"]]

    assert aegis.ctl_in_process("policy", "validate", str(tmp_path / "good.yml")).ok().out.strip().endswith("enforce)")
    # Two files for one agent must agree on the mode.
    (tmp_path / "bot-dry.yaml").write_text("agent: bot\nmode: dry-run\nrules: []\n")
    mixed = aegis.ctl_in_process("policy", "validate", str(tmp_path / "good.yml"), str(tmp_path / "bot-dry.yaml"))
    assert_failed(mixed, "2 of 2 file(s)")
    assert "different modes" in mixed.out
    missing = aegis.ctl_in_process("policy", "validate", str(tmp_path / "absent.yaml"))
    assert missing.code == 2 and "does not exist" in missing.err

    # Found by a cold review: every file goes in one gRPC message, and past 4 MiB in all aegisd's server refused
    # it as "Received message larger than max". aegisctl now refuses before sending: a file over aegisd's own
    # 1024 KiB limit, or files that together are more than one request carries.
    large = tmp_path / "large"
    large.mkdir()
    (large / "huge.yaml").write_bytes(b"#" * (1024 * 1024 + 1))
    too_big = aegis.ctl_in_process("policy", "validate", str(large / "huge.yaml"), str(tmp_path / "good.yml"))
    assert_failed(too_big, f"{large / 'huge.yaml'} is larger than 1024 KiB, aegisd's limit for a policy file",
                  "nothing was sent")
    (large / "huge.yaml").unlink()
    for n in range(5):
        (large / f"bot{n}.yaml").write_text(f"agent: bot{n}\nrules: []\n" + "#" * (1024 * 1024 - 40) + "\n")
    together = aegis.ctl_in_process("policy", "validate", str(large))
    assert_failed(together, "the 5 policy files come to", "more than the 4096 KiB one request to aegisd can carry",
                  "nothing was sent", "smaller groups")
    assert "larger than max" not in together.err
    assert aegis.ctl_in_process("policy", "validate", *(str(large / f"bot{n}.yaml") for n in range(3))).ok()


def test_validate_shows_control_characters_from_a_policy_file_as_escapes(aegis: Aegis, tmp_path: Path) -> None:
    """A policy file (say, from a cloned repository) can hold terminal escapes in its name and in what its
    errors quote; aegisctl shows them as escapes, never sends them to the operator's terminal."""
    evil = tmp_path / "evil\x1b]0;pwned\x07.yaml"  # OSC: click strips only CSI sequences, and only off a TTY
    evil.write_text('agent: bot\nrules:\n  - service: svc\n    paths: ["\\e]0;pwned\\a["]\n')
    result = aegis.ctl("policy", "validate", str(tmp_path))
    assert result.code == 1, result.out + result.err
    assert "\x1b" not in result.out + result.err and "\x07" not in result.out + result.err
    assert r"evil\x1b]0;pwned\x07.yaml:4:" in result.out
    assert r"invalid regular expression '\x1b]0;pwned\x07['" in result.out
    # A name that is not UTF-8 at all: shown with the same escapes, not a traceback.
    (tmp_path / os.fsdecode(b"latin\xe9.yaml")).write_text("agent: bot\nrules: []\n")
    result = aegis.ctl("policy", "validate", str(tmp_path))
    assert result.code == 1 and "Traceback" not in result.err, result.err
    assert rf"{tmp_path}/latin\xe9.yaml: ok (agent bot, 0 rules, enforce)" in result.out.splitlines()


def test_broken_file_fails_closed_for_its_agent_and_keeps_the_others() -> None:
    alice = "agent: alice\nrules:\n  - service: svc\n    paths: [\"/echo/a\"]\n"
    bob = "agent: bob\nrules:\n  - service: svc\n    paths: [\"/echo/b\"]\n"
    world, directory = _world({"alice.yaml": alice, "bob.yaml": bob})
    try:
        up = world.upstreams[0]
        for name in ("alice", "bob", "carol"):
            world.agent(name, "svc")
        assert world.call("GET", "/svc/echo/a", agent="alice").status == 200

        write_policy(directory, "alice.yaml", alice.replace("paths: [", "paths: [[\n"))  # YAML syntax error
        write_policy(directory, "bob.yaml", bob.replace("/echo/b", "/echo/b2"))  # a valid change, same reload
        result = world.aegis.ctl("policy", "reload")
        assert_failed(result, "reloaded with errors")
        assert "alice.yaml:" in result.out and "YAML syntax error" in result.out
        status = policy_status_in_process(world.aegis)
        assert status["trigger"] == "aegisctl"
        assert {a["agent"]: a["state"] for a in status["agents"]} == {"alice": "invalid", "bob": "enforce"}

        with untouched(up):
            reply = world.call("GET", "/svc/echo/a", agent="alice")
            world.assert_refused(reply, 403, "policy_invalid", flags="policy=invalid")
            assert "alice" in reply.error()["message"] and "alice.yaml" in reply.error()["message"]
            world.assert_refused(world.call("GET", "/svc/echo/b", agent="bob"), 403, "policy_denied")
        assert world.call("GET", "/svc/echo/b2", agent="bob").status == 200
        assert world.call("GET", "/svc/echo/anything", agent="carol").status == 200  # no policy: grants only
        event = system_rows_in_process(world)[0]
        assert event["reason"] == "policy_invalid" and "alice.yaml (agent alice)" in event["detail"]

        # A file whose agent cannot be told at all: every agent fails closed, governed or not.
        write_policy(directory, "mystery.yaml", "rules:\n  - service: svc\n    methods: [GET\n")
        world.aegis.ctl_in_process("policy", "reload")
        for name in ("bob", "carol"):
            world.assert_refused(world.call("GET", "/svc/echo/b2", agent=name), 403, "policy_invalid")
        assert policy_status_in_process(world.aegis)["fail_all"] == ["mystery.yaml"]
        assert "EVERY agent fails closed" in world.aegis.ctl_in_process("policy", "list").out

        (directory / "mystery.yaml").unlink()
        write_policy(directory, "alice.yaml", alice)
        world.aegis.ctl_in_process("policy", "reload").ok()
        assert world.call("GET", "/svc/echo/a", agent="alice").status == 200
        assert world.call("GET", "/svc/echo/b2", agent="bob").status == 200
        assert system_rows_in_process(world)[0]["reason"] == "policy_reloaded"

        # Broken so that its agent cannot be read: the file borrows it from its last version that could be,
        # and keeps it over later reloads, so the others never fail with it.
        write_policy(directory, "alice.yaml", "rules: [[\n")
        world.aegis.ctl_in_process("policy", "reload")
        write_policy(directory, "bob.yaml", bob)  # an unrelated change: another reload
        world.aegis.ctl_in_process("policy", "reload")
        assert policy_status_in_process(world.aegis)["fail_all"] == []
        world.assert_refused(world.call("GET", "/svc/echo/a", agent="alice"), 403, "policy_invalid")
        assert world.call("GET", "/svc/echo/b", agent="bob").status == 200

        # Two `agent:` keys (a template line left above the real one): the file is invalid, and every agent it
        # names fails closed, the last one (the one a YAML reader takes) included.
        write_policy(directory, "bob.yaml", "agent: dave\n" + bob)
        assert_failed(world.aegis.ctl_in_process("policy", "reload"), "reloaded with errors")
        listed = {f["name"]: f for f in policy_status_in_process(world.aegis)["files"]}["bob.yaml"]
        assert listed["agent"] == "dave, bob" and any("given twice" in i["message"] for i in listed["issues"])
        assert "bob.yaml (agents dave, bob)" in system_rows_in_process(world)[0]["detail"]
        with untouched(up):
            world.assert_refused(world.call("GET", "/svc/echo/b", agent="bob"), 403, "policy_invalid")
        # Broken YAML: every `agent:` line in its text fails closed, and so does the agent of the file's last
        # valid version (bob), kept over reloads; dave, named only by a version that was never valid, is not.
        write_policy(directory, "bob.yaml", "agent: erin\nagent: frank\nrules: [[\n")
        world.aegis.ctl_in_process("policy", "reload")
        for name, decision in (("erin", "invalid"), ("frank", "invalid"), ("bob", "invalid"), ("dave", "ungoverned")):
            tested = json.loads(world.aegis.ctl_in_process("policy", "test", "--agent", name, "--service", "svc",
                                                           "--method", "GET", "--path", "/echo/b", "--json").ok().out)
            assert tested["decision"] == decision, (name, tested)
        with untouched(up):
            world.assert_refused(world.call("GET", "/svc/echo/b", agent="bob"), 403, "policy_invalid")
        assert world.call("GET", "/svc/echo/c", agent="carol").status == 200
        write_policy(directory, "bob.yaml", bob)

        # A policy file that is a link to nothing is not skipped: it fails closed like an unreadable file.
        write_policy(directory, "alice.yaml", alice)
        (directory / "carol.yaml").symlink_to(directory / "gone.yaml")
        result = world.aegis.ctl_in_process("policy", "reload")
        assert_failed(result, "reloaded with errors")
        assert "carol.yaml:" in result.out and "cannot read the file" in result.out
        assert policy_status_in_process(world.aegis)["fail_all"] == ["carol.yaml"]
        world.assert_refused(world.call("GET", "/svc/echo/b", agent="bob"), 403, "policy_invalid")
        world.assert_no_leaks()
    finally:
        world.close()


def test_reload_on_sighup_and_on_file_change_each_a_ledger_event() -> None:
    world, directory = _world({"bot.yaml": "agent: bot\nrules:\n  - service: svc\n    paths: [\"/echo/one\"]\n"})
    try:
        world.agent("bot", "svc")
        world.assert_refused(world.call("GET", "/svc/echo/two", agent="bot"), 403, "policy_denied")

        # The watcher sees the file change on its own.
        reloads = policy_status_in_process(world.aegis)["reloads"]
        write_policy(directory, "bot.yaml", "agent: bot\nrules:\n  - service: svc\n    paths: [\"/echo/two\"]\n")
        status = wait_reloads_in_process(world, reloads)
        assert status["trigger"] == "file change"
        assert world.call("GET", "/svc/echo/two", agent="bot").status == 200

        # SIGHUP re-reads the directory even when nothing changed.
        reloads = status["reloads"]
        assert world.aegis.proc is not None
        world.aegis.proc.send_signal(signal.SIGHUP)
        status = wait_reloads_in_process(world, reloads)
        assert status["trigger"] == "SIGHUP"
        sighup = [row for row in system_rows_in_process(world) if "(SIGHUP)" in row["detail"]]
        assert sighup and sighup[0]["reason"] == "policy_reloaded"

        details = [row["detail"] for row in system_rows_in_process(world)]
        assert any(d.startswith("policies reloaded (file change): 1 files, 1 agents") for d in details)
        assert any(d.startswith("policies reloaded (startup)") for d in details)
        assert world.aegis.ctl_in_process("ledger", "verify").code == 0
        world.assert_no_leaks()
    finally:
        world.close()


def test_a_request_admitted_before_a_policy_change_is_judged_by_the_new_policy() -> None:
    """A body still arriving when the policy changes: the request is forwarded only if the new policy allows it."""
    allow = "agent: bot\nrules:\n  - service: svc\n    methods: [POST]\n    paths: [\"/echo/slow\"]\n"
    world, directory = _world({"bot.yaml": allow})
    try:
        up = world.upstreams[0]
        world.agent("bot", "svc")
        with socket.create_connection(("127.0.0.1", world.port), timeout=30) as sock:
            sock.sendall(f"POST /svc/echo/slow HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Aegis-Agent: {world.tokens['bot']}"
                         "\r\nContent-Length: 4\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n".encode())
            assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue")  # admitted under the old policy
            write_policy(directory, "bot.yaml", allow.replace("/echo/slow", "/echo/other"))
            world.aegis.ctl_in_process("policy", "reload").ok()
            with untouched(up):
                sock.sendall(b"body")
                reply = read_reply(sock)
        world.received.append(reply.text())
        world.assert_refused(reply, 403, "policy_denied", agent="bot", credential="svc")
        world.assert_no_leaks()
    finally:
        world.close()


def test_missing_policy_directory_stops_the_start(fresh: Aegis) -> None:
    fresh.start(env={"AEGIS_POLICIES_DIR": str(fresh.root / "nowhere")}, wait=False)
    assert fresh.proc is not None
    assert fresh.proc.wait(30) == 1
    log = fresh.log()
    assert "cannot read the policy directory" in log and "--policies-dir" in log
    # At start-up there are no previous policies to keep, and a start that never served wrote nothing to explain:
    # the one error line says it all.
    assert "previous policies stay" not in log and "not written to the ledger" not in log, log
    assert log.count("cannot read the policy directory") == 1, log


def test_a_reload_that_cannot_read_the_directory_says_the_previous_policies_stay() -> None:
    """Found by a cold review at the 27th stop: `policy reload` on a directory that could not be read said the agents
    listed "fail closed until they are fixed", while the previous policies in fact stay in force, as documented."""
    world, directory = _world({"bot.yaml": BOT_POLICY})
    try:
        world.agent("bot", "svc")
        aside = directory.rename(directory.with_name("policies-aside"))
        result = world.aegis.ctl("policy", "reload")
        assert_failed(result, "the policy directory could not be read; the previous policies stay in force")
        assert "fail closed" not in result.err and "cannot read the policy directory" in result.out, result.out
        assert world.call("GET", "/svc/echo/user", agent="bot").status == 200  # bot.yaml still in force
        refusal(world.call("GET", "/svc/echo/x/user", agent="bot"), 403, "policy_denied")
        aside.rename(directory)
        world.assert_no_leaks()
    finally:
        world.close()


ALICE = "agent: alice\nrules:\n  - service: svc\n    paths: [\"/echo/a\"]\n"
# Broken so that its text names another agent only: what frees alice unless her policy's last valid version
# is remembered.
ALICE_SWAPPED = "agent: mallory\nrules:\n  - service: svc\n    methods: [FETCH]\n"
MEMORY_FILE = "policy-memory.json"


def _restart(world: GateWorld, env: dict[str, str] | None = None, *, broken: Path | None = None) -> None:
    """Stop aegisd, change its environment and, with `broken`, swap that directory's alice.yaml for an invalid
    one while it is stopped; then start and unlock it again."""
    assert world.aegis.stop() == 0
    if broken is not None:
        write_policy(broken, "alice.yaml", ALICE_SWAPPED)
    world.aegis.env.update(env or {})
    world.aegis.start()
    world.unlock()


def _memory(world: GateWorld) -> list[tuple[str, dict[str, str]]]:
    """What the policy memory holds: (resolved policy directory, its mapping), the most recent first."""
    path = world.aegis.data_dir / MEMORY_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    value = json.loads(path.read_text())
    assert isinstance(value, dict) and value["version"] == 2
    return [(entry["policies_dir"], entry["files"]) for entry in value["directories"]]


def _remembered(world: GateWorld, directory: Path) -> dict[str, str]:
    """The mapping the policy memory holds for `directory` (empty if none)."""
    return dict(_memory(world)).get(str(directory.resolve()), {})


def test_a_broken_file_fails_closed_for_its_last_valid_agent_after_a_restart() -> None:
    """The last valid agent of each file is kept in the data directory, so an edit that swaps the `agent:`
    line and a restart together never free the agent the file restricted."""
    world, directory = _world({"alice.yaml": ALICE})
    try:
        up = world.upstreams[0]
        for name in ("alice", "mallory", "carol"):
            world.agent(name, "svc")
        world.assert_refused(world.call("GET", "/svc/echo/x", agent="alice"), 403, "policy_denied")

        # Broken while aegisd is stopped, so the running daemon never saw it: the restart must still know
        # whom the file restricted.
        _restart(world)
        _restart(world, broken=directory)
        with untouched(up):
            world.assert_refused(world.call("GET", "/svc/echo/x", agent="alice"), 403, "policy_invalid")
            world.assert_refused(world.call("GET", "/svc/echo/x", agent="mallory"), 403, "policy_invalid")
        listed = {f["name"]: f for f in policy_status_in_process(world.aegis)["files"]}["alice.yaml"]
        assert listed["agent"] == "mallory, alice" and not listed["valid"]
        assert world.call("GET", "/svc/echo/x", agent="carol").status == 200
        assert _remembered(world, directory) == {"alice.yaml": "alice"}

        # Restarted again, and reloaded by SIGHUP with the same directory: still remembered.
        _restart(world)
        reloads = policy_status_in_process(world.aegis)["reloads"]
        assert world.aegis.proc is not None
        world.aegis.proc.send_signal(signal.SIGHUP)
        wait_reloads_in_process(world, reloads)
        with untouched(up):
            world.assert_refused(world.call("GET", "/svc/echo/a", agent="alice"), 403, "policy_invalid")

        # Valid again: her new rules apply, and a version naming someone else is what is remembered next.
        write_policy(directory, "alice.yaml", ALICE.replace("alice", "mallory", 1))
        world.aegis.ctl_in_process("policy", "reload").ok()
        assert _remembered(world, directory) == {"alice.yaml": "mallory"}
        assert world.call("GET", "/svc/echo/x", agent="alice").status == 200  # ungoverned now
        world.assert_refused(world.call("GET", "/svc/echo/x", agent="mallory"), 403, "policy_denied")
        world.assert_no_leaks()
    finally:
        world.close()


def test_an_unreadable_policy_memory_fails_every_agent_closed_while_a_file_is_invalid() -> None:
    """Which agent a now-broken file restricted cannot be told from a damaged memory: rather than free that
    agent, every agent fails closed (as for a file naming nobody) until the file is valid again."""
    bob = ALICE.replace("alice", "bob").replace("/echo/a", "/echo/b")
    world, directory = _world({"alice.yaml": ALICE, "bob.yaml": bob})
    try:
        up = world.upstreams[0]
        for name in ("alice", "bob", "carol"):
            world.agent(name, "svc")
        memory = world.aegis.data_dir / MEMORY_FILE
        assert _remembered(world, directory) == {"alice.yaml": "alice", "bob.yaml": "bob"}

        # Every file valid: a damaged memory changes nothing and is rebuilt from the files.
        assert world.aegis.stop() == 0
        memory.write_text('{"version": 1, "files": {"alice.yaml": ')
        world.aegis.start()
        world.unlock()
        assert f"cannot use the policy memory {memory}: it is not JSON" in world.aegis.log()
        assert world.call("GET", "/svc/echo/a", agent="alice").status == 200
        assert world.call("GET", "/svc/echo/x", agent="carol").status == 200
        assert _remembered(world, directory) == {"alice.yaml": "alice", "bob.yaml": "bob"}

        # Damaged (here: too large to be one) while a file is broken so that it names only someone else.
        assert world.aegis.stop() == 0
        memory.write_bytes(b" " * (1 << 20) + b"{}")
        write_policy(directory, "alice.yaml", ALICE_SWAPPED)
        for _ in range(2):  # the file stays unknown over a restart: the memory now says so
            world.aegis.start()
            world.unlock()
            with untouched(up):
                for name in ("alice", "bob", "carol"):
                    world.assert_refused(world.call("GET", "/svc/echo/b", agent=name), 403, "policy_invalid")
            status = policy_status_in_process(world.aegis)
            assert status["fail_all"] == ["alice.yaml"]
            assert {f["name"]: f["agent"] for f in status["files"]} == {"alice.yaml": None, "bob.yaml": "bob"}
            assert "alice.yaml (every agent)" in system_rows_in_process(world)[0]["detail"]
            assert _remembered(world, directory) == {"alice.yaml": "", "bob.yaml": "bob"}
            assert world.aegis.stop() == 0
        assert world.aegis.log().count("larger than 1048576 bytes") == 1

        # Valid again: only its agent is governed by it.
        write_policy(directory, "alice.yaml", ALICE)
        world.aegis.start()
        world.unlock()
        assert world.call("GET", "/svc/echo/a", agent="alice").status == 200
        assert world.call("GET", "/svc/echo/b", agent="bob").status == 200
        assert world.call("GET", "/svc/echo/x", agent="carol").status == 200
        assert _remembered(world, directory) == {"alice.yaml": "alice", "bob.yaml": "bob"}
        assert "Traceback" not in world.aegis.log()
        world.assert_no_leaks()
    finally:
        world.close()


def test_the_policy_memory_of_another_policy_directory_is_not_applied() -> None:
    """What a file's last valid version named belongs to that directory's file, not to a namesake elsewhere:
    the same rule as for a SIGHUP that changes `policies_dir` while aegisd runs. The first directory's memory is
    kept meanwhile, so a file broken there while aegisd used another still fails closed when it is back."""
    world, directory = _world({"alice.yaml": ALICE})
    try:
        up = world.upstreams[0]
        for name in ("alice", "mallory"):
            world.agent(name, "svc")
        assert _memory(world) == [(str(directory.resolve()), {"alice.yaml": "alice"})]
        elsewhere = world.aegis.root / "elsewhere"
        elsewhere.mkdir()
        write_policy(elsewhere, "alice.yaml", ALICE_SWAPPED)

        _restart(world, {"AEGIS_POLICIES_DIR": str(elsewhere)})
        assert world.call("GET", "/svc/echo/x", agent="alice").status == 200  # no file there ever restricted her
        world.assert_refused(world.call("GET", "/svc/echo/x", agent="mallory"), 403, "policy_invalid")
        files = policy_status_in_process(world.aegis)["files"]
        assert {f["name"]: f["agent"] for f in files} == {"alice.yaml": "mallory"}
        assert _memory(world) == [(str(directory.resolve()), {"alice.yaml": "alice"})]  # nothing for elsewhere

        # Back to the first directory, whose file was broken meanwhile: its memory was kept.
        _restart(world, {"AEGIS_POLICIES_DIR": str(directory)}, broken=directory)
        with untouched(up):
            world.assert_refused(world.call("GET", "/svc/echo/x", agent="alice"), 403, "policy_invalid")
        world.assert_no_leaks()
    finally:
        world.close()


def test_the_policy_memory_follows_the_directory_not_the_path_naming_it() -> None:
    """Found by a review: the memory was kept under the path as configured, so the policy directory named by
    a symlink on one start and by its real path on the next lost it, and a file broken in between freed the
    agent it restricted. It is kept under the resolved path."""
    world, directory = _world({"alice.yaml": ALICE})
    try:
        up = world.upstreams[0]
        for name in ("alice", "mallory", "carol"):
            world.agent(name, "svc")
        alias = world.aegis.root / "policies-link"
        alias.symlink_to(directory)
        _restart(world, {"AEGIS_POLICIES_DIR": str(alias)})
        assert policy_status_in_process(world.aegis)["directory"] == str(alias)
        world.assert_refused(world.call("GET", "/svc/echo/x", agent="alice"), 403, "policy_denied")
        assert _memory(world) == [(str(directory.resolve()), {"alice.yaml": "alice"})]

        # Broken while aegisd is stopped, and started again with the real path.
        _restart(world, {"AEGIS_POLICIES_DIR": str(directory)}, broken=directory)
        with untouched(up):
            world.assert_refused(world.call("GET", "/svc/echo/x", agent="alice"), 403, "policy_invalid")
            world.assert_refused(world.call("GET", "/svc/echo/x", agent="mallory"), 403, "policy_invalid")
        assert world.call("GET", "/svc/echo/x", agent="carol").status == 200
        assert _memory(world) == [(str(directory.resolve()), {"alice.yaml": "alice"})]
        world.assert_no_leaks()
    finally:
        world.close()


def test_a_long_path_is_matched_in_linear_time_and_what_re2_cannot_run_fails_closed(tmp_path: Path) -> None:
    """Found by a cold review: path patterns ran with Python's backtracking `re` on the event loop, before rate
    limits, so one governed agent's 60 KB path against `.../.*/issues/.*` stalled every agent for seconds. They
    run with RE2 now (the unit tests check the matcher is RE2); a pattern RE2 cannot run in linear time
    (lookaround, backreference) makes its file invalid instead of falling back to `re`."""
    slow = "agent: bot\nrules:\n  - service: svc\n    paths: [\"/echo/repos/acme/.*/issues/.*\"]\n"
    lookahead = "agent: eve\nrules:\n  - service: svc\n    paths: [\"/echo/(?!admin)[a-z]+\"]\n"
    world, _ = _world({"bot.yaml": slow, "eve.yaml": lookahead})
    try:
        up = world.upstreams[0]
        for name in ("bot", "eve", "free"):
            world.agent(name, "svc")
        # + %0a: `.` stops at the decoded newline, nothing matches. 7.7 KB, still judged: a path the patterns could
        # not match quickly (the review's was 60 KB) is refused unjudged now, 414 (the last test here).
        attack = "/repos/acme/" + "issues/" * 1100
        with untouched(up):
            reply = world.call("GET", "/svc/echo" + attack + "%0a", agent="bot")
            world.assert_refused(reply, 403, "policy_denied", flags="policy=path@bot.yaml#rules[0]")
        assert world.call("GET", "/svc/echo/repos/acme/x/issues/1", agent="bot").status == 200
        assert world.call("GET", "/svc/echo/x", agent="free").status == 200
        # `policy test` judges with the same matcher.
        tested = json.loads(world.aegis.ctl_in_process("policy", "test", "--agent", "bot", "--service", "svc",
                                                       "--method",
                                                       "GET", "--path", "/echo" + attack + "\n", "--json").ok().out)
        assert tested["decision"] == "denied"

        # The lookahead: the file is invalid, reported with its line and why, and fails closed for its agent.
        listed = {f["name"]: f for f in policy_status_in_process(world.aegis)["files"]}["eve.yaml"]
        assert not listed["valid"] and listed["agent"] == "eve"
        [issue] = listed["issues"]
        assert (issue["line"], issue["field"]) == (4, "rules[0].paths[0]")
        assert "lookahead" in issue["message"] and "RE2 cannot match in linear time" in issue["message"]
        with untouched(up):
            world.assert_refused(world.call("GET", "/svc/echo/x", agent="eve"), 403, "policy_invalid")
        (tmp_path / "eve.yaml").write_text(lookahead)
        (tmp_path / "backref.yaml").write_text(
            "agent: eve\nrules:\n  - service: svc\n    paths: ['/echo/([a-z]+)/\\1']\n")
        result = world.aegis.ctl_in_process("policy", "validate", str(tmp_path))
        assert result.code == 1, result.out + result.err
        assert f"{tmp_path / 'eve.yaml'}:4:13: rules[0].paths[0]: invalid regular expression " in result.out
        assert "uses a backreference" in result.out and "aegisd matches paths with RE2" in result.out
        world.assert_no_leaks()
    finally:
        world.close()


HUGE_REPEAT = "agent: bob\nrules:\n  - service: svc\n    paths: [\"/echo/only/a{4294967296}\"]\n"
DEEP_YAML = "agent: carol\nrules:\n  - service: svc\n    paths: " + "[" * 3000 + "]" * 3000 + "\n"


def test_a_file_that_crashed_the_parser_is_invalid_alone_and_aegisd_stays_up(tmp_path: Path) -> None:
    """Found by a cold review: `a{4294967296}` made `re` raise OverflowError, and deep nesting RecursionError,
    out of the parser: the reload aborted (the file failed open, no other change applied, no ledger event) and
    at startup aegisd would not start. Now each is an issue on its own file, which fails closed."""
    alice = "agent: alice\nrules:\n  - service: svc\n"
    world, directory = _world({"alice.yaml": alice})
    try:
        up = world.upstreams[0]
        for name in ("alice", "bob", "carol", "dave"):
            world.agent(name, "svc")
        assert world.call("GET", "/svc/echo/x", agent="bob").status == 200  # not governed yet

        write_policy(directory, "bob.yaml", HUGE_REPEAT)
        write_policy(directory, "carol.yaml", DEEP_YAML)
        write_policy(directory, "alice.yaml", "agent: alice\nrules: []\n")  # a valid change in the same reload
        result = world.aegis.ctl_in_process("policy", "reload")
        assert_failed(result, "reloaded with errors")
        assert "repetition '{4294967296}': RE2 allows counts up to 1000" in result.out
        assert "the YAML is nested too deeply to read" in result.out
        status = policy_status_in_process(world.aegis)
        assert {a["agent"]: a["state"] for a in status["agents"]} == {"alice": "enforce", "bob": "invalid",
                                                                      "carol": "invalid"}
        with untouched(up):
            for name in ("bob", "carol"):
                world.assert_refused(world.call("GET", "/svc/echo/only/a", agent=name), 403, "policy_invalid")
            world.assert_refused(world.call("GET", "/svc/echo/x", agent="alice"), 403, "policy_denied")
        assert world.call("GET", "/svc/echo/x", agent="dave").status == 200
        event = system_rows_in_process(world)[0]
        assert event["reason"] == "policy_invalid"
        assert "bob.yaml (agent bob)" in event["detail"] and "carol.yaml (agent carol)" in event["detail"]

        for name, text in (("bob.yaml", HUGE_REPEAT), ("carol.yaml", DEEP_YAML)):
            (tmp_path / name).write_text(text)
        checked = world.aegis.ctl_in_process("policy", "validate", str(tmp_path))
        assert checked.code == 1 and "Traceback" not in checked.err, checked.out + checked.err
        assert (f"{tmp_path / 'bob.yaml'}:4:13: rules[0].paths[0]: invalid regular expression "
                "'/echo/only/a{4294967296}': repetition '{4294967296}': RE2 allows counts up to 1000") in checked.out
        assert f"{tmp_path / 'carol.yaml'}: the YAML is nested too deeply to read" in checked.out

        # At a start with both files in place: aegisd starts, and they still fail closed.
        _restart(world)
        with untouched(up):
            for name in ("bob", "carol"):
                world.assert_refused(world.call("GET", "/svc/echo/only/a", agent=name), 403, "policy_invalid")
        assert world.call("GET", "/svc/echo/x", agent="dave").status == 200
        log = world.aegis.log()
        assert "Traceback" not in log and "policy reload failed" not in log
        world.assert_no_leaks()
    finally:
        world.close()


def test_a_path_longer_than_its_patterns_can_judge_quickly_is_refused_unjudged(tmp_path: Path) -> None:
    """Found by a cold review: `/.*a.{1000}x` was valid, and a crafted 64 KiB path held the gate's event loop for
    ~5 s. A governed agent's path longer than its patterns can be matched against quickly (pattern.JUDGING_BUDGET)
    is refused now, 414 `path_too_long`, before any pattern runs (`policy test` too), and a pattern that alone would
    leave almost no path judgeable is invalid."""
    heavy = "agent: bot\nrules:\n  - service: svc\n    paths: [\"/echo/.*a.{400}x\", \"/echo/user\"]\n"
    world, _ = _world({"bot.yaml": heavy})
    try:
        up = world.upstreams[0]
        world.agent("bot", "svc")
        world.agent("free", "svc")
        crafted = "/echo/" + "a/" * 2000
        with untouched(up):
            row = world.assert_refused(world.call("GET", "/svc" + crafted, agent="bot"), 414, "path_too_long",
                                       flags="policy=path_too_long")
        assert row["agent"] == "bot"
        assert world.call("GET", "/svc/echo/user", agent="bot").status == 200
        assert world.call("GET", "/svc" + crafted, agent="free").status == 200  # ungoverned: no limit of policies
        tested = json.loads(world.aegis.ctl_in_process("policy", "test", "--agent", "bot", "--service", "svc",
                                                       "--method", "GET", "--path", crafted, "--json").ok().out)
        assert tested["decision"] == "denied" and "judges paths of at most" in tested["reason"]

        (tmp_path / "bot.yaml").write_text(heavy.replace("{400}", "{1000}.{1000}.{1000}"))
        checked = world.aegis.ctl_in_process("policy", "validate", str(tmp_path))
        assert checked.code == 1, checked.out + checked.err
        assert "RE2 instructions and aegisd takes at most 16384, since matching a path" in checked.out
        world.assert_no_leaks()
    finally:
        world.close()


def test_policies_another_user_could_change_are_not_taken() -> None:
    """Found by an audit of SECURITY.md: aegisd checked neither the owner nor the mode of the policy directory or
    its files, so any local user could write `mode: off` into a world-writable file (or remove it from a
    world-writable directory) and the next poll lifted the agent's limits; doctor said `all valid`. A file group or
    others may write is not read (it fails closed, as a file whose agent cannot be told: every agent); such a
    directory is not read at all (a reload keeps the policies in force; a start refuses)."""
    bot = "agent: bot\nrules:\n  - service: svc\n    paths: [\"/echo/a\"]\n"
    world, directory = _world({"bot.yaml": bot})
    try:
        world.agent("bot", "svc")
        world.assert_refused(world.call("GET", "/svc/echo/b", agent="bot"), 403, "policy_denied")

        (directory / "bot.yaml").chmod(0o666)
        result = world.aegis.ctl("policy", "reload")
        assert_failed(result, "reloaded with errors")
        assert "it is writable by group or others (mode 0666), so another local user could change it" in \
            result.out, result.out
        world.assert_refused(world.call("GET", "/svc/echo/a", agent="bot"), 403, "policy_invalid")

        # The fix alone is seen: the poll compares owners and modes too (its review: only a manual reload did)
        reloads = policy_status(world)["reloads"]
        (directory / "bot.yaml").chmod(0o644)
        wait_reloads(world, reloads)
        assert world.call("GET", "/svc/echo/a", agent="bot").status == 200

        directory.chmod(0o777)
        write_policy(directory, "bot.yaml", "agent: bot\nmode: off\nrules: []\n")  # what another user could do
        result = world.aegis.ctl("policy", "reload")
        assert result.code == 1 and "another local user could rewrite or remove a policy" in result.err + result.out
        world.assert_refused(world.call("GET", "/svc/echo/b", agent="bot"), 403, "policy_denied")  # as before
        doctor = json.loads(world.aegis.ctl_in_process("doctor", "--json").out)
        check = next(c for c in doctor["checks"] if c["name"] == "policies")
        assert check["status"] == "fail" and "chmod go-w" in check["hint"], check
        world.aegis.stop()
        refused = world.aegis.start(wait=False)
        assert refused.proc is not None and refused.proc.wait(15) != 0
        assert "another local user could rewrite or remove a policy" in world.aegis.log()

        directory.chmod(0o755)
        world.aegis.start()
        world.unlock()
        assert world.call("GET", "/svc/echo/b", agent="bot").status == 200  # the file in place is `mode: off` now
        world.assert_no_leaks()
    finally:
        world.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to give a directory to another user")
def test_a_policy_directory_reached_through_another_users_directory_is_not_taken() -> None:
    """From the review of the trust rule: the configured path was walked as written, so a symlink to a directory
    inside another user's directory passed; that user could point it elsewhere and drop every policy. The path a
    symlink leads to is walked too."""
    bot = "agent: bot\nrules:\n  - service: svc\n    paths: [\"/echo/a\"]\n"
    world, directory = _world({"bot.yaml": bot})
    try:
        world.agent("bot", "svc")
        theirs = world.aegis.root / "theirs"
        theirs.mkdir()
        os.chown(theirs, 4242, 4242)
        real = theirs / "policies"
        directory.rename(real)
        directory.symlink_to(real)  # the configured path is now a root-owned link into uid 4242's directory
        result = world.aegis.ctl("policy", "reload")
        assert result.code == 1 and f"{theirs}, above the policy directory {real}, belongs to uid 4242" in \
            result.err + result.out, result
        world.assert_refused(world.call("GET", "/svc/echo/b", agent="bot"), 403, "policy_denied")  # still in force
    finally:
        world.close()
