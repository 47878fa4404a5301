"""A real aegisd for the benchmark, set up the way a user would with aegisctl.

The layout under `root` (data/, run/aegisd.sock, aegisd.log) matches tests/harness.py, so the smoke
test can search it for leaks the same way.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench.services import ServiceError, free_port

BIN = Path(sys.executable).parent


# Rate limits that run on every request but never refuse one in a benchmark.
NEVER_BITES = "10000000/min"
POLICY = f"""\
# The benchmark agent: exactly the calls the load makes, one rule with a rate limit.
agent: bench-agent
rules:
  - service: bench
    methods: [GET]
    paths: ["/small", "/echo-auth"]
    rate_limit: {NEVER_BITES}
  - service: bench
    methods: [POST]
    paths: ["/upload"]
  - service: sse
    methods: [GET]
    paths: ["/stream"]
"""


class SetupError(Exception):
    """An aegisctl step failed; the message carries its output (never a secret: none goes in argv)."""


@dataclass
class BenchDaemon:
    root: Path
    gate_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    outputs: list[str] = field(default_factory=list)

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
    def policies_dir(self) -> Path:
        return self.root / "policies"

    @property
    def gate_url(self) -> str:
        return f"http://127.0.0.1:{self.gate_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AEGIS_", "NOTIFY_", "WATCHDOG_")) and k not in ("CREDENTIALS_DIRECTORY",)}
        env.update({"AEGIS_DATA_DIR": str(self.data_dir), "AEGIS_SOCKET": str(self.socket),
                    "AEGIS_GATE_LISTEN": f"127.0.0.1:{self.gate_port}", "AEGIS_POLICIES_DIR": str(self.policies_dir)})
        return env

    def start(self, timeout: float = 30.0) -> float:
        """Start aegisd and wait until `aegisctl status` answers; returns the seconds that took."""
        self.gate_port = self.gate_port or free_port()
        self.policies_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        started = time.perf_counter()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([str(BIN / "aegisd")], env=self.env(), stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(f"aegisd exited {self.proc.returncode} at start; see {self.log_path}")
            if self.socket.exists() and self.ctl("status", "--json", check=False).returncode == 0:
                return time.perf_counter() - started
            time.sleep(0.05)
        raise ServiceError(f"aegisd was not ready within {timeout:g}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def ctl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(BIN / "aegisctl"), *args], input=input, capture_output=True, text=True,
                              env=self.env(), timeout=600, check=False)
        self.outputs.extend([proc.stdout, proc.stderr])
        if check and proc.returncode != 0:
            raise SetupError(f"aegisctl {args[0]} {args[1] if len(args) > 1 else ''} exited {proc.returncode}: "
                             f"{proc.stderr.strip()}")
        return proc

    def ctl_seconds(self, *args: str) -> float:
        """Wall time of one aegisctl command, process start included (what a user waits for)."""
        started = time.perf_counter()
        self.ctl(*args)
        return time.perf_counter() - started

    def ledger_counters(self) -> tuple[float, float]:
        """(group commits, rows committed) since the daemon started, from /_aegis/metrics."""
        status, text = _http(self.gate_port, "GET", "/_aegis/metrics", {})
        if status != 200:
            raise ServiceError(f"/_aegis/metrics answered {status}")
        names = ("aegis_ledger_commits_total", "aegis_ledger_rows_committed_total")
        values = {sample.name: sample.value for family in text_string_to_metric_families(text)
                  for sample in family.samples if sample.name in names}
        if set(values) != set(names):
            raise ServiceError(f"/_aegis/metrics lacks {sorted(set(names) - set(values))}")
        return values[names[0]], values[names[1]]

    def write_policy(self, name: str, text: str) -> None:
        """Write a policy file and have the daemon load it now (it would also notice by itself)."""
        (self.policies_dir / name).write_text(text)
        self.ctl("policy", "reload")

    def has_command(self, *path: str) -> bool:
        """Whether this aegisctl has a (sub)command, e.g. ("ledger", "stats"): features land over time."""
        return self.ctl(*path, "--help", check=False).returncode == 0


@dataclass
class Setup:
    """What the benchmark needs from the configured daemon."""

    token: str
    secret: str
    features: dict[str, bool | str]


def start_configured(stack: ExitStack, daemon: BenchDaemon, upstream_url: str, sse_url: str | None = None) -> Setup:
    """Start `daemon` (stopped when `stack` closes) and configure it as `make bench` does, with the bench's
    secret: AEGIS_BENCH_SECRET (so a smoke test can look for it in every output), else a fresh one."""
    stack.callback(daemon.stop)
    daemon.start()
    secret = os.environ.get("AEGIS_BENCH_SECRET") or "sk-bench-" + secrets.token_urlsafe(24)
    return configure(daemon, upstream_url, sse_url, secret)


def configure(daemon: BenchDaemon, upstream_url: str, sse_url: str | None, secret: str) -> Setup:
    """init, vault add, agent add, grant: the steps from the README, with every protection at its default."""
    daemon.ctl("init", "--passphrase-stdin", input=secrets.token_urlsafe(24) + "\n")
    daemon.ctl("vault", "add", "bench", "--service", "bench", "--domains", upstream_url, "--body-inspection",
               "block", "--rate-limit", NEVER_BITES, "--secret-stdin", input=secret + "\n")
    if sse_url is not None:
        daemon.ctl("vault", "add", "bench-sse", "--service", "sse", "--domains", sse_url, "--secret-stdin",
                   input=secrets.token_urlsafe(24) + "\n")
    token = json.loads(daemon.ctl("agent", "add", "bench-agent", "--json").stdout)["token"]
    daemon.ctl("grant", "bench-agent", "bench")
    if sse_url is not None:
        daemon.ctl("grant", "bench-agent", "bench-sse")
    if daemon.has_command("policy"):
        daemon.write_policy("bench-agent.yaml", POLICY)
    return Setup(token=token, secret=secret, features=probe_features(daemon, token, secret))


def probe_features(daemon: BenchDaemon, token: str, secret: str) -> dict[str, bool | str]:
    """Which protections this build really applies, checked by behaviour rather than assumed.

    body_inspection: a body carrying the secret is refused; redaction: the upstream's echo of the
    injected credential does not reach the agent; metrics: /_aegis/metrics answers; policy: a path
    the agent's policy file does not list is refused.
    """
    headers = {"X-Aegis-Agent": token, "Content-Type": "application/json"}
    inspect_status, _ = _http(daemon.gate_port, "POST", "/bench/upload", headers, json.dumps({"leak": secret}))
    echo_status, echo_body = _http(daemon.gate_port, "GET", "/bench/echo-auth", headers)
    metrics_status, _ = _http(daemon.gate_port, "GET", "/_aegis/metrics", {})
    policy_status, _ = _http(daemon.gate_port, "GET", "/bench/outside-the-policy", headers)
    return {
        "agent_auth": True,
        "grants": True,
        "durable_ledger": True,
        "body_inspection": inspect_status == 403,
        "redaction": echo_status == 200 and secret not in echo_body,
        "metrics": metrics_status == 200,
        "policy": policy_status == 403,
        "rate_limits": "credential and policy rule, " + NEVER_BITES,
        "ledger_stats": daemon.has_command("ledger", "stats"),
        "ledger_export": daemon.has_command("ledger", "export"),
    }


def _http(port: int, method: str, path: str, headers: dict[str, str], body: str | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        reply = conn.getresponse()
        return reply.status, reply.read().decode(errors="replace")
    finally:
        conn.close()
