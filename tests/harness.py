"""Drive the real programs: aegisd as a subprocess on temp paths, aegisctl as a subprocess.

Everything either program prints is kept, so a test can search all of it (and the data
directory's files) for a secret in clear.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
AEGISD = str(BIN / "aegisd")
AEGISCTL = str(BIN / "aegisctl")
PASSPHRASE = "correct horse battery staple 42"
# The line aegisd logs once its control socket and gate both listen and its signal handlers are in place
# (the human and the JSON format), at info, the default level.
STARTED = re.compile(rb"Z info +aegisd started[ \n]|\"msg\": \"aegisd started\"")
STARTED_TAIL = 64  # bytes of the log kept between reads, so a line split across two reads is still seen
# Without that line (a daemon told to log only warnings, or to the journal), `aegisctl status` answering
# is taken as ready, as it always was, once the control socket has existed this long (the line follows the
# socket by milliseconds).
UNLOGGED_READY_AFTER = 0.5


def bytecode_env() -> dict[str, str]:
    """Let the programs under test cache their bytecode when the environment forbids writing it next to the
    sources (PYTHONDONTWRITEBYTECODE): in a private directory of this user's, outside every tree. Otherwise
    each aegisd start compiles the daemon's modules again; nothing the programs do depends on it."""
    if not os.environ.get("PYTHONDONTWRITEBYTECODE") or os.environ.get("PYTHONPYCACHEPREFIX"):
        return {}
    cache = Path(tempfile.gettempdir()) / f"aegis-tests-pycache-{os.getuid()}"
    try:
        cache.mkdir(mode=0o700, exist_ok=True)
        info = cache.lstat()
    except OSError:
        return {}
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        return {}  # not a directory only this user can write to: go without, as before
    return {"PYTHONPYCACHEPREFIX": str(cache)}


BYTECODE_ENV = bytecode_env()
# The least Argon2id cost aegisd accepts, five times cheaper than its default: the suite derives a key a few
# hundred times. A test that sets either to "" gets the default (test_sealed_secrets checks it).
CHEAPEST_KDF = {"AEGIS_KDF_MEMORY_MIB": "19", "AEGIS_KDF_ITERATIONS": "2"}


def _listening(port: int) -> bool:
    """Whether a TCP socket on this machine listens on `port` (Linux: read from /proc, so the gate sees no
    connection; elsewhere assumed)."""
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not any(table.exists() for table in tables):
        return True
    for table in tables:
        for line in table.read_text().splitlines()[1:] if table.exists() else []:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rpartition(":")[2], 16) == port:  # 0A: LISTEN
                return True
    return False


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; macOS starts at 49152


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range. A port bind(0) hands out comes from that
    range, so once a daemon on it stops, any outgoing connection (another test's, under load) may take it as
    its local port, and the daemon restarted on it fails with "address already in use"."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(10_000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Result:
    args: list[str]
    code: int
    out: str
    err: str

    def ok(self) -> Result:
        assert self.code == 0, f"aegisctl {' '.join(self.args)} exited {self.code}\n{self.out}\n{self.err}"
        return self


@dataclass
class Aegis:
    """One real aegisd on a private temp directory, and the aegisctl that drives it."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    outputs: list[str] = field(default_factory=list)
    gate_port: int = 0
    extra_args: list[str] = field(default_factory=list)
    _log_offset: int = field(default=0, repr=False)  # the log's size when the daemon was last started

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket(self) -> Path:
        return self.root / "run" / "aegisd.sock"

    @property
    def log_path(self) -> Path:
        return self.root / "aegisd.log"

    @property
    def gate_url(self) -> str:
        return f"http://127.0.0.1:{self.gate_port}"

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AEGIS_", "NOTIFY_", "WATCHDOG_"))}
        env.pop("CREDENTIALS_DIRECTORY", None)
        env.pop("JOURNAL_STREAM", None)
        if BYTECODE_ENV:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env.update(BYTECODE_ENV)
        env.update({"AEGIS_DATA_DIR": str(self.data_dir), "AEGIS_SOCKET": str(self.socket),
                    "AEGIS_GATE_LISTEN": f"127.0.0.1:{self.gate_port}", **CHEAPEST_KDF})
        env.update(self.env)
        return env

    def start(self, *args: str, env: Mapping[str, str] | None = None, wait: bool = True) -> Aegis:
        if not self.gate_port:
            self.gate_port = free_port()
        full_env = self.base_env()
        full_env.update(env or {})
        log = self.log_path.open("ab")
        self._log_offset = log.tell()
        self.proc = subprocess.Popen([AEGISD, *self.extra_args, *args], env=full_env, stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL)
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Until this start's `aegisd started` line is in the log: read from the file, so waiting costs no
        process and no call the daemon serves, and the gate is listening too by then."""
        deadline = time.monotonic() + timeout
        offset, tail = self._log_offset, b""
        socket_seen: float | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"aegisd exited {self.proc.returncode} at start:\n{self.log()}")
            if self.log_path.exists():
                with self.log_path.open("rb") as fh:
                    fh.seek(offset)
                    fresh = fh.read()
                offset += len(fresh)
                tail += fresh
                if STARTED.search(tail):
                    return
                tail = tail[-STARTED_TAIL:]
            if socket_seen is None and self.socket.exists():
                socket_seen = time.monotonic()
            if socket_seen is not None and time.monotonic() - socket_seen > UNLOGGED_READY_AFTER:
                answer = self.ctl("status", "--json")
                if answer.code == 0 and _listening(int(json.loads(answer.out)["gate_address"].rpartition(":")[2])):
                    return
            time.sleep(0.01)
        raise AssertionError(f"aegisd not ready after {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ctl(self, *args: str, input: str | None = None, env: Mapping[str, str] | None = None,
            timeout: float = 60.0) -> Result:
        full_env = self.base_env()
        full_env.update(env or {})
        proc = subprocess.run([AEGISCTL, *args], input=input, capture_output=True, text=True, env=full_env,
                              timeout=timeout, check=False)
        self.outputs.extend([proc.stdout, proc.stderr])
        return Result(list(args), proc.returncode, proc.stdout, proc.stderr)

    def ctl_in_process(self, *args: str, input: str | None = None) -> Result:
        """The same aegisctl code as `ctl`, run in this process by click's CliRunner instead of as a program. For
        the setup and ledger reads most tests make around what they test: an interpreter started for each (0.2
        CPU-s, 2,000 times) was a third of the suite's CPU. Tests of the command line itself use `ctl`."""
        from click.testing import CliRunner

        from aegisctl.cli import root

        # As base_env does for the program: none of the test runner's own AEGIS_* settings leak in.
        env: dict[str, str | None] = {name: None for name in os.environ if name.startswith("AEGIS_")}
        env.update({"AEGIS_SOCKET": str(self.socket), "AEGIS_DATA_DIR": str(self.data_dir)})
        if self.gate_port:
            env["AEGIS_GATE_LISTEN"] = f"127.0.0.1:{self.gate_port}"
        env.update({k: v for k, v in self.env.items() if k.startswith("AEGIS_")})
        result = CliRunner().invoke(root, list(args), input=input, env=env, catch_exceptions=True)
        err = result.stderr
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            err += "".join(traceback.format_exception(result.exception))
        self.outputs.extend([result.stdout, err])
        return Result(list(args), result.exit_code, result.stdout, err)

    def init(self, passphrase: str = PASSPHRASE, *extra: str) -> Result:
        return self.ctl_in_process("init", "--passphrase-stdin", *extra, input=passphrase + "\n").ok()

    def add_credential(self, name: str, secret: str, *args: str) -> Result:
        return self.ctl_in_process("vault", "add", name, "--secret-stdin", *args, input=secret + "\n").ok()

    def assert_no_leaks(self, secrets: Iterable[str], extra_text: Iterable[str] = ()) -> None:
        """No secret in clear in anything printed, logged, or stored in the data directory."""
        texts = [*self.outputs, self.log(), *extra_text]
        files = [p for p in self.data_dir.rglob("*") if p.is_file()] if self.data_dir.exists() else []
        for secret in secrets:
            needle = secret.encode()
            for text in texts:
                assert secret not in text, f"secret found in output: ...{text[:200]}"
            for path in files:
                assert needle not in path.read_bytes(), f"secret found in clear in {path}"

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def new_aegis() -> Aegis:
    # Short root: Unix socket paths are limited to 107 bytes.
    return Aegis(Path(tempfile.mkdtemp(prefix="ag", dir="/tmp")))
