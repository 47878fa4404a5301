"""What aegisctl does when its standard output cannot take what it prints: closed (`>&-`), full (`> /dev/full`),
or a reader gone (`| head`).

Found by a cold review: an agent's token (and a webhook's signing secret), which exists nowhere else once aegisctl
exits, was lost without a word and exit 0 on a closed stdout; and a failed write (ENOSPC, EIO) ended in a Python
traceback. Now a value shown once that cannot be delivered fails the command, exit 1, saying what exists and how to
get a new value; any other failed write is one line, exit 1."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import IO

import pytest

from tests.e2e.support import assert_failed
from tests.harness import AEGISCTL, Aegis, Result

FULL = Path("/dev/full")
pytestmark = pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full, a device every write to fails ENOSPC")
NO_SPACE = "aegisctl: error: cannot write output: No space left on device"
HOOK_URL = "http://127.0.0.1:9/hook"


def env_for(aegis: Aegis, buffered: bool) -> dict[str, str]:
    """The programs' environment, Python's stdout block-buffered (as for most users) or not (PYTHONUNBUFFERED)."""
    env = aegis.base_env()
    if buffered:
        env.pop("PYTHONUNBUFFERED", None)
    else:
        env["PYTHONUNBUFFERED"] = "1"
    return env


def ctl_to(aegis: Aegis, stdout: int | IO[bytes] | None, *args: str, close_stdout: bool = False,
           buffered: bool = True) -> Result:
    """aegisctl with its stdout `stdout` (a file, a pipe), or closed (fd 1 not open at all, as `>&-` leaves it)."""
    command = ["sh", "-c", 'exec "$0" "$@" >&-', AEGISCTL, *args] if close_stdout else [AEGISCTL, *args]
    proc = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE,
                          env=env_for(aegis, buffered), timeout=60, check=False)
    err = proc.stderr.decode(errors="replace")
    aegis.outputs.append(err)
    return Result(list(args), proc.returncode, "", err)


def ctl_to_full(aegis: Aegis, *args: str, buffered: bool = True) -> Result:
    with FULL.open("wb") as full:
        return ctl_to(aegis, full, *args, buffered=buffered)


def agents(aegis: Aegis) -> list[str]:
    return [a["name"] for a in json.loads(aegis.ctl_in_process("agent", "list", "--json").ok().out)]


def assert_token_lost(result: Result, why: str, name: str, made: str) -> None:
    assert_failed(result, why, f"agent '{name}' {made}", "its token was not delivered", "cannot be shown again",
                  f"next: run `aegisctl agent regenerate {name}` for a new token")
    assert len(result.err.splitlines()) == 2, result.err  # the error line and its `next:` line, nothing else
    assert "aegis_" not in result.err  # nor the token itself, anywhere


@pytest.mark.parametrize("as_json", [False, True])
def test_an_agent_token_printed_to_a_closed_stdout_fails_saying_how_to_get_one(unlocked: Aegis, as_json: bool) -> None:
    """The review's repro: `aegisctl agent add x >&-` made the agent, printed "not shown again" and exited 0."""
    flags = ["--json"] if as_json else []
    result = ctl_to(unlocked, None, "agent", "add", "bot", *flags, close_stdout=True)
    assert_token_lost(result, "aegisctl: error: standard output is closed", "bot", "was created")
    assert "not shown again" not in result.err  # the once-only warning is for a token that was shown
    assert agents(unlocked) == ["bot"]

    result = ctl_to(unlocked, None, "agent", "regenerate", "bot", *flags, close_stdout=True)
    assert_token_lost(result, "standard output is closed", "bot", "has a new token (the old one no longer works)")
    token = unlocked.ctl("agent", "regenerate", "bot").ok().out.strip()  # what the hint says: a token again
    assert token.startswith("aegis_")
    unlocked.outputs.remove(token + "\n")  # its one delivery; nowhere else (stderr, the log, the data directory)
    unlocked.assert_no_leaks([token])


@pytest.mark.parametrize("buffered", [True, False])
@pytest.mark.parametrize("as_json", [False, True])
def test_an_agent_token_printed_to_a_full_device_fails_saying_how_to_get_one(unlocked: Aegis, as_json: bool,
                                                                             buffered: bool) -> None:
    """`> /dev/full`: a traceback (OSError: [Errno 28]) after the agent was made; now (C) and (B) in one."""
    result = ctl_to_full(unlocked, "agent", "add", "full", *(["--json"] if as_json else []), buffered=buffered)
    assert_token_lost(result, "aegisctl: error: cannot write output: No space left on device", "full", "was created")
    assert "Exception ignored" not in result.err
    assert agents(unlocked) == ["full"]


def test_a_webhook_secret_printed_to_a_closed_or_full_stdout_fails_saying_how_to_get_one(unlocked: Aegis) -> None:
    for how, why in (("closed", "standard output is closed"), ("full", NO_SPACE)):
        args = ("webhook", "add", HOOK_URL, "--events", "blocked_request")
        result = ctl_to(unlocked, None, *args, close_stdout=True) if how == "closed" else ctl_to_full(unlocked, *args)
        hooks = json.loads(unlocked.ctl_in_process("webhook", "list", "--json").ok().out)
        assert len(hooks) == 1, hooks
        hook = hooks[0]["id"]
        assert_failed(result, why, f"webhook {hook} was added", "its signing secret was not delivered",
                      f"next: remove it (`aegisctl webhook remove {hook} --yes`) and add it again")
        assert len(result.err.splitlines()) == 2, result.err
        # Nor the secret itself, anywhere it could be read later.
        assert "whsec_" not in result.err and "whsec_" not in unlocked.log(), result.err
        unlocked.ctl_in_process("webhook", "remove", hook, "--yes").ok()


@pytest.mark.parametrize("args", [("agent", "list", "--json"), ("agent", "list"), ("status",),
                                  ("ledger", "export"), ("--help",), ("agent", "--help"), ("--version",)])
def test_output_to_a_full_device_is_one_error_line(unlocked: Aegis, args: tuple[str, ...]) -> None:
    """The review's repro: `aegisctl agent list --json > /dev/full` ended in a Python traceback."""
    unlocked.ctl_in_process("agent", "add", "bot").ok()
    for buffered in (True, False):
        result = ctl_to_full(unlocked, *args, buffered=buffered)
        assert result.code == 1, result.err
        assert result.err == NO_SPACE + "\n", result.err


def test_a_reader_that_goes_away_still_ends_quietly(unlocked: Aegis) -> None:
    """A broken pipe (`aegisctl ... | head -0`) ends aegisctl as before, nothing said: click's exit 1, or 0 where the
    command expects it (ledger export, built to be cut short)."""
    unlocked.ctl_in_process("agent", "add", "bot").ok()
    cases = [(args, code, buffered) for args, code in ((("agent", "list", "--json"), 1), (("status", "--json"), 1),
                                                        (("ledger", "export"), 0)) for buffered in (True, False)]
    for args, code, buffered in cases:
        proc = subprocess.Popen([AEGISCTL, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env_for(unlocked, buffered))
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # the reader is gone before anything is written
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        assert proc.wait(60) == code, (args, buffered, err)
        assert err == "", (args, buffered, err)
