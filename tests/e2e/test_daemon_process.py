"""aegisd as a process: signals, reload, core dumps, the systemd notify protocol, --help."""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import socket
import stat
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.support import assert_failed, status
from tests.harness import AEGISCTL, AEGISD, PASSPHRASE, Aegis

ENV_VARS = ("AEGIS_CONFIG", "AEGIS_DATA_DIR", "AEGIS_SOCKET", "AEGIS_GATE_LISTEN")


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def send(aegis: Aegis, sig: int) -> None:
    assert aegis.proc is not None
    aegis.proc.send_signal(sig)


def test_sigterm_exits_0_and_logs_stopped(unlocked: Aegis) -> None:
    assert unlocked.stop(signal.SIGTERM) == 0
    log = unlocked.log()
    assert "aegisd stopping" in log and "aegisd stopped" in log
    assert "Traceback" not in log
    assert not unlocked.socket.exists()
    # The database was closed cleanly: no WAL left for the next start to recover.
    assert not (unlocked.data_dir / "vault.db-wal").exists()
    unlocked.assert_no_leaks([PASSPHRASE])


def test_sigint_exits_0(aegis: Aegis) -> None:
    assert aegis.stop(signal.SIGINT) == 0
    assert "aegisd stopped" in aegis.log()


def test_sighup_reloads_and_keeps_running(aegis: Aegis) -> None:
    send(aegis, signal.SIGHUP)
    assert wait_for(lambda: "reloaded" in aegis.log()), aegis.log()
    assert aegis.proc is not None and aegis.proc.poll() is None
    assert status(aegis)["state"] == "uninitialized"
    send(aegis, signal.SIGHUP)
    assert wait_for(lambda: aegis.log().count("reloaded") >= 2), aegis.log()
    assert aegis.stop() == 0


def test_sighups_during_a_stop_neither_kill_nor_reload(aegis: Aegis) -> None:
    """Found by a cold review: closing the event loop put SIGHUP back to its default, exit, so a SIGHUP late in a
    stop (logrotate, a script) ended aegisd by signal instead of with status 0, and one earlier in the stop ran a
    reload after `aegisd stopping`. SIGHUPs sent all through a stop are ignored now."""
    assert aegis.proc is not None
    proc, started = aegis.proc, len(aegis.log())
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGHUP)
        time.sleep(0.002)
    assert proc.wait(10) == 0
    aegis.proc = None
    stop = aegis.log()[started:]
    assert "aegisd stopped" in stop and "Traceback" not in stop, stop
    assert "configuration reloaded" not in stop.partition("aegisd stopping")[2], stop  # one handled first may run


def test_sighup_with_broken_config_keeps_old_settings(fresh: Aegis) -> None:
    config = fresh.root / "aegisd.toml"
    config.write_text('[log]\nlevel = "warning"\n')
    fresh.start("--config", str(config))
    fresh.init()
    assert "vault initialised" not in fresh.log()  # info lines are below the configured level

    config.write_text("[log\nlevel = = 'debug'\n")
    send(fresh, signal.SIGHUP)
    assert wait_for(lambda: "reload failed" in fresh.log()), fresh.log()
    assert str(config) in fresh.log() and "keeping the running settings" in fresh.log()
    assert fresh.proc is not None and fresh.proc.poll() is None
    fresh.ctl("lock").ok()
    assert "vault locked" not in fresh.log()  # still at warning: the broken file changed nothing
    config.write_bytes(b'[log]\nlevel = "caf\xe9"\n')  # not UTF-8: was an exception in the signal handler
    send(fresh, signal.SIGHUP)
    assert wait_for(lambda: "not UTF-8 text" in fresh.log()), fresh.log()
    assert "Traceback" not in fresh.log() and fresh.proc is not None and fresh.proc.poll() is None

    config.write_text('[log]\nlevel = "info"\n')
    send(fresh, signal.SIGHUP)
    assert wait_for(lambda: "reloaded" in fresh.log()), fresh.log()
    fresh.ctl("unlock", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    assert wait_for(lambda: "vault unlocked" in fresh.log()), fresh.log()  # the good reload applied
    assert fresh.stop() == 0
    fresh.assert_no_leaks([PASSPHRASE])


def test_broken_config_at_start_is_a_usage_error(fresh: Aegis) -> None:
    cases = [("[log\n", "not valid TOML"), ('surprise = "x"\n', "unknown setting"),
             ('[log]\nlevel = "loud"\n', "log level"), ("socket_mode = 666\n", "must be a string"),
             ("[gate]\nmax_connections = 1.5\n", "[gate] max_connections 1.5 (from"),  # was taken as 1
             ('socket_mode = "7600"\n', "at most 0777"),
             # found by a cold review: each was a traceback and exit 1 (OverflowError, ValueError, RecursionError)
             ("[gate]\nmax_body_bytes = " + "9" * 400 + "\n", "must be between 1024 and"),
             ("[gate]\nmax_body_bytes = " + "9" * 5000 + "\n", "a number too long"),
             ("a = " + "[" * 2000 + "]" * 2000 + "\n", "nested too deeply")]
    for text, message in cases:
        config = fresh.root / "bad.toml"
        config.write_text(text)
        fresh.log_path.unlink(missing_ok=True)
        fresh.start("--config", str(config), wait=False)
        assert fresh.proc is not None
        assert fresh.proc.wait(15) == 2
        fresh.proc = None
        assert message in fresh.log() and "Traceback" not in fresh.log()
    for args, message in ((("--config", str(fresh.root / "missing.toml")), "does not exist"),
                          (("--gate-listen", "nohost"), "HOST:PORT"),
                          (("--gate-listen", "127.0.0.1:99999"), "invalid port"),
                          (("--gate-listen", "0.0.0.0:3100"), "[gate] allow_non_loopback = true")):
        fresh.log_path.unlink(missing_ok=True)
        fresh.start(*args, wait=False)
        assert fresh.proc is not None
        assert fresh.proc.wait(15) == 2
        fresh.proc = None
        assert message in fresh.log() and "Traceback" not in fresh.log()


def test_gate_port_taken_is_one_clear_error(fresh: Aegis) -> None:
    """Found by a walkthrough: the clear error was followed by grpc's `Exception ignored in: Server.__del__ ...
    RuntimeError: Event loop is closed`, as the control server was never stopped before the loop closed."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        fresh.gate_port = taken.getsockname()[1]
        fresh.start(wait=False)
        assert fresh.proc is not None
        code = fresh.proc.wait(15)
    fresh.proc = None
    log = fresh.log()
    assert code == 1, log  # a start failure, as documented (2 is a usage error)
    assert f"aegisd: error: cannot listen on 127.0.0.1:{fresh.gate_port}" in log
    assert "address already in use" in log and "choose another --gate-listen" in log
    assert "Traceback" not in log and "Exception ignored" not in log, log
    # A start that never served keeps no account of ledger rows it did not write: only what is true of it.
    assert "not written to the ledger" not in log, log
    assert not fresh.socket.exists()  # the control socket it had bound is gone too


@pytest.mark.parametrize("mode", [0o755, 0o750], ids=["0755", "0750"])
def test_data_dir_open_to_group_or_others_is_warned_about(fresh: Aegis, mode: int) -> None:
    """Found by a walkthrough: aegisd started on a 0755 data directory without a word, and doctor then failed it."""
    fresh.data_dir.mkdir()
    fresh.data_dir.chmod(mode)
    fresh.start()
    warning = next((line for line in fresh.log().splitlines() if "data directory" in line and "warning" in line), "")
    assert f"{fresh.data_dir} is mode {mode:04o}, not 0700" in warning, fresh.log()
    assert f"chmod 700 {fresh.data_dir}" in warning and "aegisctl doctor" in warning
    assert stat.S_IMODE(fresh.data_dir.stat().st_mode) == mode  # warned, not changed behind the operator's back
    doctor = json.loads(fresh.ctl("doctor", "--json").out)
    failed = next(c for c in doctor["checks"] if c["name"] == "data_dir")
    assert failed["status"] == "fail" and f"mode {mode:04o}, not 0700" in failed["message"]
    assert fresh.stop() == 0
    # Private again: no warning at the next start.
    fresh.data_dir.chmod(0o700)
    fresh.log_path.unlink()
    fresh.start()
    assert "not 0700" not in fresh.log()


def test_database_files_open_to_others_are_made_private_at_start(fresh: Aegis) -> None:
    """Found by a cold review: a vault.db or ledger.db made 0644 (copied back by hand, restored by a tool) was
    served as it was, and SQLite gave its -wal and -shm the same mode, so every local user could copy the key
    slots and guess the passphrase offline. aegisd makes them 0600 at start, and says so."""
    fresh.start()
    fresh.init()
    assert fresh.stop() == 0
    loose = [p for p in fresh.data_dir.iterdir() if p.name.startswith(("vault.db", "ledger.db"))]
    assert {p.name for p in loose} >= {"vault.db", "ledger.db"}
    for path in loose:
        path.chmod(0o644)
    fresh.start()
    for path in fresh.data_dir.iterdir():
        if path.name.startswith(("vault.db", "ledger.db")):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in loose:
        assert f"{path} was open to group or other users (mode 644); made it 0600" in fresh.log()
    fresh.assert_no_leaks([PASSPHRASE])


def test_core_dumps_are_disabled(aegis: Aegis) -> None:
    assert aegis.proc is not None
    limits = Path(f"/proc/{aegis.proc.pid}/limits")
    if not limits.exists():
        pytest.skip("no /proc on this platform")
    line = next(line for line in limits.read_text().splitlines() if line.startswith("Max core file size"))
    assert line.split()[4:6] == ["0", "0"], line


class NotifyListener:
    """A real NOTIFY_SOCKET: an AF_UNIX datagram socket read by a thread, as systemd would."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def texts(self) -> list[str]:
        return [text for _, text in self.messages]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_systemd_notify_protocol(fresh: Aegis) -> None:
    pytest.importorskip("systemd.daemon", reason="systemd-python is the optional 'systemd' extra")
    listener = NotifyListener(fresh.root / "notify.sock")
    try:
        # A 1 s watchdog interval: pings every 0.5 s. (At 0.2 s, pings every 0.1 s had to keep a median gap under
        # 0.2 s: only 0.1 s of room for a loaded machine waking the daemon late.)
        fresh.start(env={"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "1000000"})
        assert wait_for(lambda: any("READY=1" in t for t in listener.texts()))
        ready = next(t for t in listener.texts() if "READY=1" in t)
        fields = dict(line.split("=", 1) for line in ready.splitlines())
        assert fields["STATUS"] and "vault uninitialized" in fields["STATUS"]
        assert fresh.proc is not None and fields["MAINPID"] == str(fresh.proc.pid)

        # Pings at half of WATCHDOG_USEC (0.5 s), from the running event loop.
        assert wait_for(lambda: sum(t == "WATCHDOG=1" for t in listener.texts()) >= 5, timeout=30)
        pings = [at for at, t in listener.messages if t == "WATCHDOG=1"]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        # Well inside the 1 s watchdog interval, which pings at the whole interval would not be: 0.3 s of room for
        # late wake-ups on a loaded machine, and 0.2 s below such pings.
        assert statistics.median(gaps) < 0.8, gaps
        ready_index = listener.texts().index(ready)
        assert all(t != "WATCHDOG=1" for t in listener.texts()[:ready_index])  # READY first

        # STATUS= follows the vault as it is initialised, locked and unlocked, and a reload keeps it.
        def statuses() -> list[str]:
            return [line[len("STATUS="):] for t in listener.texts() for line in t.splitlines()
                    if line.startswith("STATUS=")]

        fresh.init()
        assert wait_for(lambda: statuses()[-1].startswith("vault unlocked; gate ")), statuses()
        fresh.ctl("lock").ok()
        assert wait_for(lambda: statuses()[-1].startswith("vault locked; gate ")), statuses()
        fresh.ctl("unlock", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
        assert wait_for(lambda: statuses()[-1].startswith("vault unlocked; gate ")), statuses()

        send(fresh, signal.SIGHUP)
        assert wait_for(lambda: any("RELOADING=1" in t for t in listener.texts()))
        assert wait_for(lambda: sum("READY=1" in t for t in listener.texts()) == 2)
        reloaded = [t for t in listener.texts() if "READY=1" in t][-1]
        assert f"STATUS=vault unlocked; gate 127.0.0.1:{fresh.gate_port}" in reloaded.splitlines(), reloaded
        assert status(fresh)["state"] == "unlocked"

        assert fresh.stop(signal.SIGTERM) == 0
        texts = listener.texts()
        stopping = [i for i, t in enumerate(texts) if "STOPPING=1" in t]
        assert stopping, texts
        count = len(listener.messages)
        time.sleep(0.3)
        assert len(listener.messages) == count  # no pings after the process is gone
    finally:
        listener.close()


def test_without_notify_socket_nothing_is_sent(aegis: Aegis) -> None:
    # The harness strips NOTIFY_SOCKET; the daemon must start and run normally without it.
    assert "NOTIFY_SOCKET" not in aegis.base_env()
    assert "systemd" not in aegis.log().lower()
    assert aegis.stop() == 0


def test_help_documents_the_environment() -> None:
    for program in (AEGISD, AEGISCTL):
        result = subprocess.run([program, "--help"], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
        for name in ENV_VARS:
            assert name in result.stdout, f"{Path(program).name} --help does not mention {name}"
    ctl_help = subprocess.run([AEGISCTL, "--help"], capture_output=True, text=True, check=True).stdout
    for verb in ("init", "unlock", "lock", "status", "vault"):
        assert verb in ctl_help


def test_version_flags() -> None:
    for program in (AEGISD, AEGISCTL):
        result = subprocess.run([program, "--version"], capture_output=True, text=True, check=True)
        assert "version" in result.stdout


def test_usage_errors_exit_2() -> None:
    assert subprocess.run([AEGISD, "--no-such-flag"], capture_output=True, check=False).returncode == 2
    assert subprocess.run([AEGISCTL, "no-such-command"], capture_output=True, check=False).returncode == 2
    assert subprocess.run([AEGISCTL, "vault"], capture_output=True, check=False).returncode in (0, 2)


def test_python_dash_m_entry_points() -> None:
    for module in ("aegisd", "aegisctl"):
        result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                                check=False)
        assert result.returncode == 0 and "AEGIS_SOCKET" in result.stdout


def test_daemon_survives_a_failing_client_command(unlocked: Aegis) -> None:
    assert_failed(unlocked.ctl("vault", "show", "missing"), "no credential")
    assert unlocked.proc is not None and unlocked.proc.poll() is None
    assert status(unlocked)["state"] == "unlocked"
    unlocked.assert_no_leaks([PASSPHRASE])
