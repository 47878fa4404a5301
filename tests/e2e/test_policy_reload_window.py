"""A policy deploy caught half-way by the one-second poll, through the real daemon: a file rewritten in place in
several writes, and files removed and copied back one by one. Found by a cold review: the poll applied whatever it
found, so a file cut after `- service: svc` (no `methods:` or `paths:` yet: every request to the service allowed)
or a file not yet copied back (its agent ungoverned) was put in force, wider than both the old and the new policy.
Now the poll applies a change only once two polls in a row find the directory the same.

The writes below go on while the gate is asked: each one changes the directory well within a poll interval, so the
daemon never finds it at rest until the deploy is done. Nothing here measures time."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.e2e.gate_support import GateWorld
from tests.e2e.policy_support import RELOAD_DEADLINE_SECONDS, Expected, check_rows, policy_world, refusal
from tests.e2e.support import policy_status_in_process

SECRET = "sk-reload-window-secret-5Tq8Wn2Rb7"
OLD = 'agent: bot\nrules:\n  - service: svc\n    methods: [GET]\n    paths: ["/echo/user"]\n'
HEAD, TAIL = OLD.split("    methods:")  # cut after `- service: svc`: alone, it allows every method and path
TAIL = "    methods:" + TAIL
OTHER = 'agent: other\nrules:\n  - service: svc\n    methods: [GET]\n'
ROUNDS = 12  # writes a deploy makes, a tenth of a second apart: several poll intervals in all
PAUSE = 0.1


def _deploying(world: GateWorld, step: Callable[[int], None]) -> list[Expected]:
    """Make the deploy's writes, asking the gate for the forbidden DELETE after each: refused by the old policy,
    never let through by a half-way state; and the daemon has not reloaded meanwhile."""
    reloads = policy_status_in_process(world.aegis)["reloads"]
    expected: list[Expected] = []
    for n in range(ROUNDS):
        step(n)
        reply = world.call("DELETE", "/svc/echo/admin", agent="bot")
        refusal(reply, 403, "policy_denied")
        expected.append((reply, "denied", "policy_denied", None))
        time.sleep(PAUSE)
    assert policy_status_in_process(world.aegis)["reloads"] == reloads  # nothing half-way was applied
    return expected


def wait_reloads_in_process(world: GateWorld, beyond: int) -> dict[str, Any]:
    """policy_support's wait_reloads, with aegisctl run in this process (ordering, not timing)."""
    deadline = time.monotonic() + RELOAD_DEADLINE_SECONDS
    while (status := policy_status_in_process(world.aegis))["reloads"] <= beyond:
        assert time.monotonic() < deadline, f"no reload after {beyond}: {status}"
        time.sleep(0.2)
    return status


def _append(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text)


def test_a_deploy_caught_half_way_by_the_poll_is_applied_only_once_it_is_done() -> None:
    world, directory = policy_world({"bot.yaml": OLD, "other.yaml": OTHER})
    try:
        up = world.upstream()
        world.credential("svc", SECRET, up.entry())
        world.agent("bot", "svc")
        bot = directory / "bot.yaml"
        expected: list[Expected] = []

        # A script writing the same policy again in place, a line at a time (`echo ... >> bot.yaml`).
        def rewrite(n: int) -> None:
            if n == 0:
                bot.write_text(HEAD)
            else:
                _append(bot, f"# line {n}\n")  # YAML comments: the file stays the cut one, valid

        expected += _deploying(world, rewrite)
        reloads = policy_status_in_process(world.aegis)["reloads"]
        _append(bot, TAIL)
        status = wait_reloads_in_process(world, reloads)
        assert status["trigger"] == "file change" and all(f["valid"] for f in status["files"]), status
        refused = world.call("DELETE", "/svc/echo/admin", agent="bot")
        refusal(refused, 403, "policy_denied")
        expected.append((refused, "denied", "policy_denied", None))
        assert world.call("GET", "/svc/echo/user", agent="bot").status == 200

        # A deploy that removes the files, then copies them back one by one, the first one slowly.
        def redeploy(n: int) -> None:
            if n == 0:
                bot.unlink()
                (directory / "other.yaml").unlink()
                (directory / "other.yaml").write_text(OTHER)
            else:
                _append(directory / "other.yaml", f"# line {n}\n")

        expected += _deploying(world, redeploy)
        reloads = policy_status_in_process(world.aegis)["reloads"]
        bot.write_text(OLD)
        wait_reloads_in_process(world, reloads)
        refused = world.call("DELETE", "/svc/echo/admin", agent="bot")
        refusal(refused, 403, "policy_denied")
        expected.append((refused, "denied", "policy_denied", None))

        # A file that stays removed is dropped, a poll or two later: the change still takes effect.
        reloads = policy_status_in_process(world.aegis)["reloads"]
        bot.unlink()
        status = wait_reloads_in_process(world, reloads)
        assert [f["name"] for f in status["files"]] == ["other.yaml"], status
        assert world.call("DELETE", "/svc/echo/admin", agent="bot").status == 200  # grants and scopes only now
        check_rows(world, expected)
        world.assert_no_leaks()
    finally:
        world.close()
