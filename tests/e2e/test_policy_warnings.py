"""Warnings, not errors, for policy files naming what the vault does not have: a misspelt `agent:` (the file
stays valid and loaded, and the agent meant stays ungoverned) and a rule for a service no credential
provides. Through the real aegisd and aegisctl: `policy validate|list|test`, `doctor`, locked and unlocked."""

from __future__ import annotations

import json
from typing import Any

from tests.e2e.gate_support import GateWorld
from tests.e2e.policy_support import policy_world, write_policy
from tests.e2e.support import policy_status_in_process

SECRET = "sk-policy-warning-secret-5Rt8Yu2Io0"
TYPO = "agent: my-agnet\nrules:\n  - service: svc\n    methods: [GET]\n"
NOBODY = "no agent named 'my-agnet' (aegisctl agent list); the file applies to nobody yet"
# Line 5, column 14: the value of the second rule's `service:`.
ECHOO = "agent: bot\nrules:\n  - service: svc\n    methods: [GET]\n  - service: echoo\n    methods: [GET]\n"
NO_ECHOO = "no credential provides service 'echoo' (aegisctl vault list)"


def _doctor_policies(world: GateWorld, *, as_program: bool = False) -> dict[str, Any]:
    """doctor's policies check; warnings alone leave doctor's exit status 0. Run in this process unless
    `as_program` (the real aegisctl)."""
    result = world.aegis.ctl("doctor", "--json") if as_program else world.aegis.ctl_in_process("doctor", "--json")
    assert result.code == 0, result.out + result.err
    [check] = [c for c in json.loads(result.out)["checks"] if c["name"] == "policies"]
    assert isinstance(check, dict)
    return check


def test_a_misspelt_agent_is_warned_about_everywhere_until_that_agent_exists() -> None:
    world, directory = policy_world({"my-agent.yaml": TYPO})
    try:
        up = world.upstream()
        world.credential("svc", SECRET, up.entry())
        world.agent("my-agent", "svc")  # the agent the file was meant for
        aegis = world.aegis

        # validate: the file is valid (exit 0), and a warning line says the agent does not exist.
        path = directory / "my-agent.yaml"
        validated = aegis.ctl("policy", "validate", str(directory)).ok()
        lines = validated.out.splitlines()
        assert f"{path}: ok (agent my-agnet, 1 rules, enforce)" in lines
        assert f"warning: {path}: {NOBODY}" in lines
        assert "error" not in validated.err
        as_json = json.loads(aegis.ctl_in_process("policy", "validate", "--json", str(path)).ok().out)
        assert as_json[0]["valid"] is True and as_json[0]["issues"] == []
        assert as_json[0]["warnings"] == [{"file": str(path), "line": 0, "column": 0, "field": "",
                                           "message": NOBODY}]

        # list: the file stays loaded for its (absent) agent, and says so.
        listed = aegis.ctl("policy", "list").ok().out
        assert f"warning: my-agent.yaml: {NOBODY}" in listed.splitlines()
        assert "ok, 1 warning(s)" in listed
        status = policy_status_in_process(world.aegis)
        assert [a["agent"] for a in status["agents"]] == ["my-agnet"]
        [loaded] = status["files"]
        assert loaded["valid"] and loaded["warnings"][0]["message"] == NOBODY

        # Unchanged behaviour: the agent meant is ungoverned, so its POST goes through.
        assert world.call("POST", "/svc/echo/anything", agent="my-agent", body=b"{}").status == 200
        tested = json.loads(aegis.ctl("policy", "test", "--agent", "my-agnet", "--service", "svc", "--method", "GET",
                                      "--path", "/x", "--json").ok().out)
        assert tested["decision"] == "allowed" and tested["warnings"] == ["no agent named 'my-agnet' (aegisctl "
                                                                          "agent list)"]

        check = _doctor_policies(world, as_program=True)
        assert check["status"] == "warn", check
        assert "my-agent.yaml: no agent named 'my-agnet'" in check["message"] and "agent add" in check["hint"]

        # Locked: agent names are stored in clear, so the warning stands, and a real agent is not warned about.
        write_policy(directory, "real.yaml", "agent: my-agent\nmode: dry-run\nrules:\n  - service: svc\n")
        aegis.ctl_in_process("lock").ok()
        listed = aegis.ctl_in_process("policy", "list").ok().out
        assert f"warning: my-agent.yaml: {NOBODY}" in listed.splitlines()
        real = aegis.ctl_in_process("policy", "validate", str(directory / "real.yaml")).ok().out
        assert "warning" not in real, real
        assert _doctor_policies(world)["status"] == "warn"
        world.unlock()

        # Once the agent exists, every warning is gone (no reload needed), and the file governs it.
        world.agent("my-agnet", "svc")
        revalidated = aegis.ctl_in_process("policy", "validate", str(directory)).ok().out
        assert "warning" not in revalidated, revalidated
        listed = aegis.ctl_in_process("policy", "list").ok().out
        assert "warning" not in listed, listed
        assert all(f["warnings"] == [] for f in policy_status_in_process(world.aegis)["files"])
        check = _doctor_policies(world)
        assert check["status"] == "pass", check
        assert world.call("POST", "/svc/echo/anything", agent="my-agnet", body=b"{}").status == 403
        world.assert_no_leaks()
    finally:
        world.close()


def test_a_rule_for_a_service_no_credential_provides_is_warned_about_with_its_line() -> None:
    world, directory = policy_world({"bot.yaml": ECHOO})
    try:
        up = world.upstream()
        world.credential("svc", SECRET, up.entry())
        world.agent("bot", "svc")
        aegis = world.aegis
        path = directory / "bot.yaml"

        validated = aegis.ctl_in_process("policy", "validate", str(path)).ok()
        lines = validated.out.splitlines()
        assert f"{path}: ok (agent bot, 2 rules, enforce)" in lines
        [warning] = [line for line in lines if line.startswith("warning:")]
        assert warning.startswith(f"warning: {path}:5:14: rules[1].service: {NO_ECHOO}"), warning
        as_json = json.loads(aegis.ctl_in_process("policy", "validate", "--json", str(path)).ok().out)
        [entry] = as_json[0]["warnings"]
        assert (entry["line"], entry["column"], entry["field"]) == (5, 14, "rules[1].service")
        assert entry["message"].startswith(NO_ECHOO)

        listed = aegis.ctl_in_process("policy", "list").ok().out
        assert any(line.startswith(f"warning: bot.yaml:5:14: rules[1].service: {NO_ECHOO}")
                   for line in listed.splitlines()), listed
        check = _doctor_policies(world)
        assert check["status"] == "warn", check
        assert "bot.yaml:5: rules[1].service: no credential provides service 'echoo'" in check["message"], check

        # policy test for a service no credential provides says so, as text and as JSON: whether a rule names it
        # (the policy would allow it, the gate never gets that far) or not (a typo on the command line).
        text = aegis.ctl("policy", "test", "--agent", "bot", "--service", "echoo", "--method", "GET",
                         "--path", "/x").ok().out
        assert "allowed" in text and f"warning:  {NO_ECHOO}" in text, text
        tested = json.loads(aegis.ctl_in_process("policy", "test", "--agent", "bot", "--service", "echoo", "--method",
                                                 "GET", "--path", "/x", "--json").ok().out)
        assert tested["decision"] == "allowed" and len(tested["warnings"]) == 1
        assert tested["warnings"][0].startswith(NO_ECHOO) and "not_granted" in tested["warnings"][0]
        text = aegis.ctl_in_process("policy", "test", "--agent", "bot", "--service", "scv", "--method", "GET",
                                    "--path", "/x").ok().out
        assert "no rule for service 'scv'" in text and "no credential provides service 'scv'" in text, text
        known = json.loads(aegis.ctl_in_process("policy", "test", "--agent", "bot", "--service", "svc", "--method",
                                                "GET", "--path", "/x", "--json").ok().out)
        assert known["warnings"] == []

        # Once a credential provides the service, the warnings are gone.
        world.credential("echoo", SECRET + "-2", up.entry())
        assert "warning" not in aegis.ctl_in_process("policy", "validate", str(path)).ok().out
        assert "warning" not in aegis.ctl_in_process("policy", "list").ok().out
        assert _doctor_policies(world)["status"] == "pass"
        tested = json.loads(aegis.ctl_in_process("policy", "test", "--agent", "bot", "--service", "echoo", "--method",
                                                 "GET", "--path", "/x", "--json").ok().out)
        assert tested["warnings"] == []
        world.assert_no_leaks()
    finally:
        world.close()

