"""Input without an end: a secret, passphrase or unlock key on stdin with no line break (`< /dev/zero`), and a config
file that never ends (`--config /dev/zero`).

Found by a cold review: aegisctl read stdin's first line, and the whole config file, with no bound, so either ran
until MemoryError (a traceback) or the machine ran out of memory. Each read is bounded now: a line past the limit is
refused without quoting it and nothing is sent; a config file past 1 MiB is refused, by aegisd as well. Each program
here runs with its address space capped, so that without the bound it fails fast instead of taking the machine's
memory."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from aegisctl.secrets_input import MAX_LINE_BYTES, MAX_SECRET_BYTES
from aegisd.api.config_file import MAX_CONFIG_BYTES
from tests.e2e.support import assert_failed, status
from tests.harness import AEGISCTL, AEGISD, PASSPHRASE, Aegis, Result

ZERO = Path("/dev/zero")
pytestmark = pytest.mark.skipif(not ZERO.exists(), reason="needs /dev/zero, a stream with no end")
MEMORY_CAP = 1536 << 20  # address space for each program: plenty for aegisctl, far less than an endless line
ENDLESS_SECRET = "sk-endless-" + "x" * 70_000 + "\n"  # a real line, past every limit


def capped(*argv: str) -> list[str]:
    """`argv` run with its address space capped, set by the shell: a `preexec_fn` makes subprocess fork, and
    grpc's fork handler in this process (the tests hold channels) can hang that fork for good."""
    return ["sh", "-c", f'ulimit -v {MEMORY_CAP >> 10} && exec "$@"', "sh", *argv]


def ctl_from(aegis: Aegis, stdin: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    """aegisctl with stdin read from `stdin`, its memory capped."""
    with stdin.open("rb") as source:
        proc = subprocess.run(capped(AEGISCTL, *args), stdin=source, capture_output=True,
                              env=aegis.base_env() | (env or {}), timeout=120, check=False)
    out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    aegis.outputs.extend([out, err])
    return Result(list(args), proc.returncode, out, err)


def assert_refused_unquoted(result: Result, *needles: str, code: int) -> None:
    assert_failed(result, *needles, code=code)
    assert "MemoryError" not in result.err and "\x00" not in result.err and "\\x00" not in result.err, result.err
    assert len(result.err.splitlines()) <= 4, result.err  # one error line (after click's usage lines), no more


def test_a_secret_on_endless_stdin_gets_the_daemons_refusal(unlocked: Aegis) -> None:
    """--secret-stdin: a secret past aegisd's limit, whatever its size, is refused in aegisd's words (exit 1, as
    test_secret_size has it), before anything is sent."""
    message = f"the secret is longer than {MAX_SECRET_BYTES} bytes"
    add = ("vault", "add", "zz", "--service", "zz", "--domains", "api.example.com", "--secret-stdin")
    long_line = unlocked.root / "long-secret"
    long_line.write_text(ENDLESS_SECRET)
    for source in (ZERO, long_line):
        result = ctl_from(unlocked, source, *add)
        assert_refused_unquoted(result, message, code=1)
        assert result.err == f"aegisctl: error: {message}\n", result.err
    unlocked.add_credential("rotated", "sk-first-secret-0123456789", "--service", "rot", "--domains", "api.example.com")
    assert_refused_unquoted(ctl_from(unlocked, ZERO, "vault", "rotate", "rotated", "--secret-stdin"), message, code=1)
    assert '"zz"' not in unlocked.ctl_in_process("vault", "list", "--json").ok().out
    unlocked.assert_no_leaks([ENDLESS_SECRET[:40], "sk-first-secret-0123456789"])


@pytest.mark.parametrize(("args", "flag", "what"), [
    (("unlock", "--passphrase-stdin"), "--passphrase-stdin", "passphrase"),
    (("unlock", "--unlock-key-stdin"), "--unlock-key-stdin", "unlock key"),
    (("passphrase", "--passphrase-stdin"), "--passphrase-stdin", "current passphrase"),
])
def test_a_passphrase_or_key_on_endless_stdin_is_a_usage_error(unlocked: Aegis, args: tuple[str, ...], flag: str,
                                                               what: str) -> None:
    unlocked.ctl_in_process("lock").ok()
    result = ctl_from(unlocked, ZERO, *args)
    assert_refused_unquoted(result, f"{flag}: the {what} on standard input is longer than {MAX_LINE_BYTES} bytes",
                            "nothing was sent", code=2)
    assert status(unlocked)["state"] == "locked"


def test_init_with_an_endless_passphrase_makes_no_vault(aegis: Aegis) -> None:
    result = ctl_from(aegis, ZERO, "init", "--passphrase-stdin")
    assert_refused_unquoted(result, "--passphrase-stdin: the passphrase on standard input is longer than",
                            "nothing was sent", code=2)
    assert status(aegis)["state"] == "uninitialized"
    long_line = aegis.root / "long-passphrase"
    long_line.write_text("p" * (MAX_LINE_BYTES + 1) + "\n")
    assert_refused_unquoted(ctl_from(aegis, long_line, "init", "--passphrase-stdin"), "longer than", code=2)
    edge = aegis.root / "edge-passphrase"
    edge.write_text(PASSPHRASE + " " + "q" * (MAX_LINE_BYTES - len(PASSPHRASE) - 1) + "\r\n")  # the limit itself
    ctl_from(aegis, edge, "init", "--passphrase-stdin").ok()
    assert status(aegis)["state"] == "unlocked"


def test_a_webhook_url_on_endless_stdin_gets_the_url_refusal(unlocked: Aegis) -> None:
    result = ctl_from(unlocked, ZERO, "webhook", "add", "--url-stdin", "--events", "blocked_request")
    assert_refused_unquoted(result, "the webhook URL is longer than 2048 characters", code=1)
    assert unlocked.ctl_in_process("webhook", "list", "--json").ok().out.strip() == "[]"


def test_an_endless_config_file_is_a_usage_error(unlocked: Aegis) -> None:
    """`aegisctl --config /dev/zero status` (and AEGIS_CONFIG) read the whole file: now at most 1 MiB, by the reader
    aegisd uses (aegisd.api.config_file)."""
    big = unlocked.root / "big.toml"
    big.write_text("# " + "x" * MAX_CONFIG_BYTES + "\n")
    for config in (str(ZERO), str(big)):
        by_env = {"AEGIS_SOCKET": "", "AEGIS_CONFIG": config}
        for how, env in ((["--config", config], {"AEGIS_SOCKET": ""}), ([], by_env)):
            result = ctl_from(unlocked, Path("/dev/null"), *how, "status", env=env)
            assert_refused_unquoted(result, f"config file {config} is larger than 1024 KiB", code=2)
    fine = unlocked.root / "fine.toml"
    fine.write_text(f'socket = "{unlocked.socket}"\n' + "# padding\n" * 1000)
    assert '"unlocked"' in ctl_from(unlocked, Path("/dev/null"), "--config", str(fine), "status", "--json",
                                    env={"AEGIS_SOCKET": ""}).ok().out
    latin1 = unlocked.root / "latin1.toml"
    latin1.write_bytes(b'socket = "/tmp/caf\xe9"\n')  # was a UnicodeDecodeError traceback
    assert_refused_unquoted(ctl_from(unlocked, Path("/dev/null"), "--config", str(latin1), "status",
                                     env={"AEGIS_SOCKET": ""}), "is not UTF-8 text", code=2)


def test_aegisd_refuses_an_endless_config_file(fresh: Aegis) -> None:
    proc = subprocess.run(capped(AEGISD, "--config", str(ZERO)), capture_output=True, env=fresh.base_env(),
                          timeout=120, check=False, stdin=subprocess.DEVNULL)
    err = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode == 2, err
    assert f"config file {ZERO} is larger than 1024 KiB" in err and "Traceback" not in err, err
