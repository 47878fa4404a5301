"""What aegisctl tells a new user: the `next:` hint on a clash, `vault adopt`'s marks, and the help texts."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.e2e.gate_support import request
from tests.e2e.support import assert_failed
from tests.harness import AEGISD, PASSPHRASE, Aegis, new_aegis

SECRET = "sk-live-hintsSecret-5b7d9e1f3a"


@pytest.fixture(scope="module")
def shared() -> Iterator[Aegis]:
    """One unlocked daemon holding credential 'github' for service 'github', left unchanged by the tests."""
    instance = new_aegis()
    instance.start()
    instance.init()
    instance.add_credential("github", SECRET, "--service", "github", "--domains", "api.github.com")
    instance.add_credential("gitlab", SECRET + "-2", "--service", "gitlab", "--domains", "gitlab.com")
    yield instance
    instance.cleanup()


def next_line(err: str) -> str:
    return next(line for line in err.splitlines() if line.strip().startswith("next:"))


def test_a_service_clash_says_to_use_another_service(shared: Aegis) -> None:
    result = shared.ctl("vault", "add", "github-work", "--service", "github", "--domains", "api.github.com",
                        "--secret-stdin", input="sk-live-otherSecret-0001\n")
    assert_failed(result, "already", "service 'github'")
    hint = next_line(result.err)
    assert "another --service" in hint and "pick another name" not in hint, hint
    assert "`aegisctl vault update NAME --service OTHER`" in hint and "`aegisctl vault remove NAME`" in hint


def test_an_update_onto_a_taken_service_says_to_use_another_service(shared: Aegis) -> None:
    result = shared.ctl_in_process("vault", "update", "gitlab", "--service", "github")
    assert_failed(result, "already", "service 'github'")
    hint = next_line(result.err)
    assert "another --service" in hint and "vault update NAME" in hint and "vault remove NAME" in hint, hint
    assert json.loads(shared.ctl_in_process("vault", "show", "gitlab", "--json").ok().out)["service"] == "gitlab"


def test_a_name_clash_still_says_to_pick_another_name(shared: Aegis) -> None:
    result = shared.ctl_in_process("vault", "add", "github", "--service", "github2", "--domains", "api.github.com",
                                   "--secret-stdin", input="sk-live-otherSecret-0002\n")
    assert_failed(result, "already", "named 'github'")
    hint = next_line(result.err)
    assert "pick another name" in hint and "--service" not in hint, hint


def test_nothing_to_adopt_is_not_marked_mixed(shared: Aegis) -> None:
    listed = json.loads(shared.ctl_in_process("vault", "adopt", "--json").ok().out)
    assert listed == {"credentials": [], "agents": [], "grants": [], "mixed": False, "adopted": False}
    assert shared.ctl_in_process("vault", "adopt").ok().out.startswith("Nothing to adopt")


def test_help_texts_state_the_defaults_and_every_stdin_flag(shared: Aegis) -> None:
    ctl = " ".join(shared.ctl_in_process("--help").ok().out.split())
    for flag in ("--secret-stdin", "--passphrase-stdin", "--unlock-key-stdin", "--url-stdin"):
        assert flag in ctl, flag
    assert "$XDG_DATA_HOME/aegis, else ~/.local/share/aegis" in ctl
    daemon = subprocess.run([AEGISD, "--help"], capture_output=True, text=True, env=shared.base_env(),
                            timeout=60, check=True).stdout
    assert "$XDG_DATA_HOME/aegis or ~/.local/share/aegis" in " ".join(daemon.split())


def test_an_argument_that_is_not_utf8_is_a_usage_error_before_anything_is_read_or_sent(shared: Aegis) -> None:
    """Found by a cold review: argv bytes that are not UTF-8 (`$'bad\\xff'`) failed with a UnicodeEncodeError
    traceback while being sent, for `vault add` after the secret was read. Now a usage error names where the
    argument is, never what it holds, and nothing is read or sent."""
    bad = os.fsdecode(b"bad\xff")  # how Python hands such bytes over, and how subprocess sends them back
    secret = "sk-live-notUtf8ArgSecret-0003"
    cases = [
        (["agent", "add", bad], "argument 3 is not UTF-8 text"),
        (["ledger", "show", "--agent", bad], "argument 4 (after --agent) is not UTF-8 text"),
        (["ledger", "show", f"--agent={bad}"], "the value of --agent (argument 3) is not UTF-8 text"),
        (["vault", "add", "notutf8", "--service", "notutf8", "--domains", os.fsdecode(b"api.\xffexample.com"),
          "--secret-stdin"], "argument 7 (after --domains) is not UTF-8 text"),
    ]
    for argv, needle in cases:
        result = shared.ctl(*argv, input=secret + "\n")
        assert_failed(result, needle, "nothing was sent", code=2)
        assert "xff" not in result.err and "bad" not in result.err and "\ufffd" not in result.err, result.err
    assert json.loads(shared.ctl_in_process("agent", "list", "--json").ok().out) == []
    assert [c["name"] for c in json.loads(shared.ctl_in_process("vault", "list", "--json").ok().out)] == [
        "github", "gitlab"]
    shared.assert_no_leaks([PASSPHRASE, SECRET, secret])


def test_text_the_output_encoding_cannot_hold_is_escaped_not_a_traceback(shared: Aegis) -> None:
    """Found by a cold review: `PYTHONIOENCODING=latin-1 aegisctl ledger show` with a row whose path holds a `€`
    (any request without a token writes one) failed with a UnicodeEncodeError traceback, as did a CSV export to
    stdout. Such characters are now printed as escapes (Python already does so on stderr)."""
    assert request(shared.gate_port, "GET", "/%E2%82%AC/latin").status == 401  # service '€', path /latin
    for argv in (["ledger", "show"], ["ledger", "export", "--format", "csv"]):
        result = shared.ctl(*argv, env={"PYTHONIOENCODING": "latin-1"})
        assert result.code == 0 and "Traceback" not in result.err, result.err
        [row] = [line for line in result.out.splitlines() if "/latin" in line]
        assert "\\u20ac" in row, result.out
