"""Shared pieces for the gate's end-to-end tests: a daemon with upstreams, clients, ledger reads.

`GateWorld` is one real aegisd (optionally with a config file and a test CA in SSL_CERT_FILE)
plus the secrets and tokens it was given, so any test can end with `assert_no_leaks` over every
output, the log, the data directory, the ledger's JSON and everything the agent received.
Requests go through a real HTTP client (`http.client`), or as raw bytes over a socket for the
shapes a well-behaved client refuses to send.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import functools
import http.client
import ipaddress
import itertools
import json
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aegisd.config import load_config
from tests.harness import PASSPHRASE, Aegis, free_port, new_aegis
from tests.upstreams import PKI, Upstream, accepted, make_pki

# The keys issue 3 promises in `ledger show --json`.
LEDGER_KEYS = {"time", "request_id", "agent", "credential", "service", "method", "path", "target_host",
               "decision", "reason", "status", "duration_ms", "bytes_in", "bytes_out"}
REQUEST_ID = "X-Aegis-Request-Id"


@dataclass
class Reply:
    """What the agent got back from the gate."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    closed: bool | None = None  # for raw exchanges asked to wait: did the gate close the connection?

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def request_id(self) -> str:
        values = self.all(REQUEST_ID)
        assert len(values) == 1, f"expected one {REQUEST_ID}, got {values} (status {self.status})"
        return values[0]

    def error(self) -> dict[str, str]:
        """The error object, after checking the documented shape and the request-id header."""
        assert "application/json" in (self.header("Content-Type") or ""), self.text()
        body = self.json()
        assert set(body) == {"error"}, body
        error = body["error"]
        assert set(error) == {"code", "message", "request_id"}, error
        assert all(isinstance(error[k], str) and error[k] for k in error), error
        assert error["request_id"] == self.request_id
        return dict(error)

    def text(self) -> str:
        head = "\n".join(f"{k}: {v}" for k, v in self.headers)
        return f"{self.status}\n{head}\n\n{self.body.decode('utf-8', 'replace')}"


def _parse_head(head: bytes) -> tuple[int, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:] if line)]
    return status, headers


def raw_exchange(port: int, data: bytes, *, wait_close: bool = False, timeout: float = 30.0) -> Reply:
    """Send `data` as-is and read one response; with wait_close, also report whether the gate hung up."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        reply = read_reply(sock)
        if wait_close:
            reply.closed = _wait_closed(sock)
        return reply


def read_reply(sock: socket.socket) -> Reply:
    """One response from a connection whose request was sent by hand (framed by length or chunks)."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response; got {buffer!r}")
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    status, headers = _parse_head(head)
    reply = Reply(status, headers, b"")
    length = reply.header("Content-Length")
    if length is not None:
        while len(rest) < int(length):
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        reply.body = rest[: int(length)]
    elif (reply.header("Transfer-Encoding") or "").lower() == "chunked":
        while not rest.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        reply.body = _dechunk(rest)
    return reply


def _wait_closed(sock: socket.socket) -> bool:
    """True once the peer closes (or resets) the connection; False if it stays open past the timeout."""
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2:]
    return out


def request(port: int, method: str, target: str, headers: Sequence[tuple[str, str]] = (),
            body: bytes | None = None, *, host: str | None = None, timeout: float = 30.0) -> Reply:
    """One request with a real HTTP client; only the headers given are sent (plus Host, Content-Length)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host if host is not None else f"127.0.0.1:{port}")
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        payload = response.read()
        return Reply(response.status, list(response.getheaders()), payload)
    finally:
        conn.close()


def write_config(root: Path, **gate: float) -> Path:
    """A TOML config file with these [gate] settings."""
    path = root / "aegisd.toml"
    lines = ["[gate]", *(f"{key} = {value}" for key, value in gate.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class GateWorld:
    """One real daemon, the secrets and tokens it holds, and every reply an agent received."""

    aegis: Aegis
    pki: PKI
    secrets: list[str] = field(default_factory=list)
    tokens: dict[str, str] = field(default_factory=dict)
    received: list[str] = field(default_factory=list)
    upstreams: list[Upstream] = field(default_factory=list)
    _ledger_text: str | None = None  # the last `ledger show` output, while no request has been made since

    @classmethod
    def start(cls, daemon_env: dict[str, str] | None = None, **gate_settings: float) -> GateWorld:
        """`daemon_env`: more environment for the daemon alone (aegisctl does not get it)."""
        aegis = new_aegis()
        pki = make_pki(aegis.root / "pki")
        env = {"SSL_CERT_FILE": str(pki.ca_pem)}
        if gate_settings:
            env["AEGIS_CONFIG"] = str(write_config(aegis.root, **gate_settings))
        aegis.env.update(env)
        aegis.start(env=daemon_env)
        aegis.init()
        return cls(aegis, pki, secrets=[PASSPHRASE])

    def upstream(self, tls: bool = False, pki: PKI | None = None) -> Upstream:
        """A started upstream (TLS with this world's CA unless another PKI is given); stopped at close."""
        context = (pki or self.pki).server_context() if tls or pki else None
        up = Upstream(context).start()
        self.upstreams.append(up)
        return up

    def close(self) -> None:
        for up in self.upstreams:
            up.stop()
        self.aegis.cleanup()

    @property
    def port(self) -> int:
        return self.aegis.gate_port

    # -- setup through aegisctl (run in this process: the command line itself is tested elsewhere) ----

    def credential(self, name: str, secret: str, domains: str | Iterable[str], *args: str,
                   service: str | None = None) -> None:
        listed = domains if isinstance(domains, str) else ",".join(domains)
        self.aegis.add_credential(name, secret, "--service", service or name, "--domains", listed, *args)
        self.secrets.append(secret)
        if "basic" in args:
            self.secrets.append(base64.b64encode(secret.encode()).decode())
        if quote(secret, safe="") != secret:
            self.secrets.append(quote(secret, safe=""))

    def agent(self, name: str, *grants: str) -> str:
        """Add agent `name` granted `grants`; its token is kept out of the outputs leak-checked later."""
        result = self.aegis.ctl_in_process("agent", "add", name, "--json").ok()
        token = str(json.loads(result.out)["token"])
        self.aegis.outputs.remove(result.out)  # the one place a token may appear
        self.tokens[name] = token
        for credential in grants:
            self.aegis.ctl_in_process("grant", name, credential).ok()
        return token

    def regenerate(self, name: str) -> str:
        result = self.aegis.ctl("agent", "regenerate", name, "--json").ok()
        token = str(json.loads(result.out)["token"])
        self.aegis.outputs.remove(result.out)
        self.secrets.append(self.tokens[name])  # the old token is a secret too from now on
        self.tokens[name] = token
        return token

    def unlock(self) -> None:
        self.aegis.ctl_in_process("unlock", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()

    # -- requests --------------------------------------------------------------------------------

    def call(self, method: str, target: str, headers: Sequence[tuple[str, str]] = (), body: bytes | None = None,
             *, agent: str | None = None, host: str | None = None) -> Reply:
        """A request to the gate as `agent` (its token in X-Aegis-Agent), recorded for the leak check."""
        sent = list(headers)
        if agent is not None:
            sent.insert(0, ("X-Aegis-Agent", self.tokens[agent]))
        self._ledger_text = None
        reply = request(self.port, method, target, sent, body, host=host)
        self._note(reply)
        return reply

    def raw(self, data: bytes, *, wait_close: bool = False) -> Reply:
        self._ledger_text = None
        reply = raw_exchange(self.port, data, wait_close=wait_close)
        self._note(reply)
        return reply

    def _note(self, reply: Reply) -> None:
        self.received.append(reply.text())
        if reply.status == 500:  # an unhandled error in the gate: show its traceback with the failure
            print(self.aegis.log()[-6000:])

    def raw_request(self, method: str, target: str, headers: Sequence[tuple[str, str]] = (), *,
                    agent: str | None = None, body: bytes = b"", wait_close: bool = False) -> Reply:
        """Build the bytes of a request whose target or headers a normal client would refuse."""
        lines = [f"{method} {target} HTTP/1.1".encode(), f"Host: 127.0.0.1:{self.port}".encode()]
        if agent is not None:
            lines.append(f"X-Aegis-Agent: {self.tokens[agent]}".encode())
        lines += [f"{k}: {v}".encode() for k, v in headers]  # UTF-8 on the wire, as a raw client would
        if body and not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in headers):
            lines.append(f"Content-Length: {len(body)}".encode())
        if not wait_close:  # else leave the connection keep-alive, so a close is the gate's own decision
            lines.append(b"Connection: close")
        return self.raw(b"\r\n".join(lines) + b"\r\n\r\n" + body, wait_close=wait_close)

    # -- the ledger ------------------------------------------------------------------------------

    def ledger(self, *filters: str) -> list[dict[str, Any]]:
        """Request rows from `aegisctl ledger show --json` (run in this process), newest first."""
        result = self.aegis.ctl_in_process("ledger", "show", "--json", "--limit", "100000", *filters).ok()
        # The ledger only grows, so the newest full listing (leak-checked in assert_no_leaks) covers this
        # one; keeping every listing would make each leak check slower than the last.
        self.aegis.outputs.remove(result.out)
        self._ledger_text = None if filters else result.out
        rows = json.loads(result.out)
        assert isinstance(rows, list)
        return [row for row in rows if row["kind"] == "request"]

    def row(self, request_id: str, rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The one ledger row for `request_id`, with every documented key."""
        found = [row for row in (rows if rows is not None else self.ledger()) if row["request_id"] == request_id]
        assert len(found) == 1, f"expected exactly one ledger row for {request_id}, got {found}"
        row = found[0]
        assert set(row) >= LEDGER_KEYS, f"missing keys: {LEDGER_KEYS - set(row)}"
        return row

    def assert_refused(self, reply: Reply, status: int, code: str, **expect_row: Any) -> dict[str, Any]:
        """The agent got `status` with error `code`, and the ledger has one denied row saying so."""
        assert reply.status == status, reply.text()
        row = self.row(reply.request_id)
        if row["method"] != "HEAD":  # a reply to HEAD has no body to check
            error = reply.error()
            assert error["code"] == code, error
        assert (row["decision"], row["reason"], row["status"]) == ("denied", code, status), row
        for key, value in expect_row.items():
            assert row[key] == value, (key, row)
        return row

    def assert_no_leaks(self, extra: Iterable[str] = ()) -> None:
        """No secret or live token in any output, the log, the data dir, the ledger, the replies or the metrics."""
        if self._ledger_text is None:
            self.ledger()
        ledger_json = self._ledger_text or ""
        self.aegis.assert_no_leaks([*self.secrets, *self.tokens.values()],
                                   extra_text=[*self.received, ledger_json, self.metrics_text(), *extra])

    def metrics_text(self) -> str:
        """The running daemon's /_aegis/metrics page ("" when no daemon runs, or its settings turn metrics off).

        Whether they are on is read from the settings the daemon itself started with ([gate] metrics in the config
        file its environment or --config names; on by default), so a daemon that should serve the page and answers
        404 fails here, and one with them off is not sent a request (nothing to read in its 404)."""
        proc = self.aegis.proc
        if proc is None or proc.poll() is not None or not _metrics_enabled(proc.pid):
            return ""
        reply = request(self.port, "GET", "/_aegis/metrics")
        assert reply.status == 200, reply.text()
        return reply.body.decode("utf-8", "replace")


def _metrics_enabled(pid: int) -> bool:
    """Whether the aegisd process `pid` serves /_aegis/metrics: its settings resolved as it resolved them at
    start, from its own environment and --config flag (a relative path being its working directory's)."""
    proc = Path(f"/proc/{pid}")
    cwd = proc.joinpath("cwd").readlink()
    environ: dict[str, str] = {}
    for entry in proc.joinpath("environ").read_bytes().decode("utf-8", "surrogateescape").split("\0"):
        name, _, value = entry.partition("=")
        environ[name] = value
    flags: dict[str, str] = {}
    argv = proc.joinpath("cmdline").read_bytes().decode("utf-8", "surrogateescape").split("\0")
    for arg, following in itertools.pairwise(argv):  # (it ends in a NUL: the last is '')
        if arg == "--config" or arg.startswith("--config="):
            flags["config"] = str(cwd / (following if arg == "--config" else arg.removeprefix("--config=")))
    if environ.get("AEGIS_CONFIG"):
        environ["AEGIS_CONFIG"] = str(cwd / environ["AEGIS_CONFIG"])
    return load_config(flags, environ).metrics_enabled


class ScriptedUpstream:
    """A plain-HTTP upstream on 127.0.0.1 that answers each request head with the bytes `answer(target)`
    gives, for answers no HTTP server library would send; it counts the connections it accepted."""

    def __init__(self, answer: Callable[[str], bytes]) -> None:
        self._answer = answer
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self.connections = 0
        threading.Thread(target=self._accept, name="scripted-upstream", daemon=True).start()

    def entry(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        for conn in accepted(self._server):
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        with conn, contextlib.suppress(OSError):
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                conn.sendall(self._answer(head.split(b" ", 2)[1].decode()))


@contextmanager
def untouched(*upstreams: Upstream) -> Iterator[None]:
    """Nothing inside the block made a connection or a request to any of these upstreams."""
    before = [up.contacts() for up in upstreams]
    yield
    after = [up.contacts() for up in upstreams]
    assert after == before, f"an upstream was contacted: (connections, requests) {before} -> {after}"


def names_resolving_to_loopback() -> list[str]:
    """Host names this machine resolves only to loopback addresses, other than the localhost family
    (which the allowlist treats as internal on purpose): an allowlist entry naming one is an SSRF probe."""
    candidates = [socket.gethostname()]
    hosts = Path("/etc/hosts")
    if hosts.exists():
        for line in hosts.read_text().splitlines():
            candidates += line.split("#")[0].split()[1:]
    found = []
    for name in dict.fromkeys(candidates):
        if name == "localhost" or name.endswith(".localhost"):
            continue
        try:
            infos = socket.getaddrinfo(name, None)
        except OSError:
            continue
        if infos and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos):
            found.append(name)
    return found


# -- the shared world most gate tests run against -------------------------------------------------

SECRETS = {
    "bear": "sk-bearer-secret-A1b2C3d4E5f6",
    "hdr": "hdr-secret-Z9y8X7w6V5u4",
    "basic": "svcuser:basic-pass-Q1w2E3r4",
    "query": "q-secret/with+chars&=T5y6",
    "ro": "sk-readonly-secret-R1R2R3",
    "wo": "sk-writeonly-secret-W1W2W3",
    "tls": "sk-tls-secret-L1L2L3L4",
    "rogue": "sk-rogue-secret-M1M2M3",
    "dead": "sk-dead-secret-D1D2D3",
    "multi": "sk-multi-secret-U1U2U3",
    "private": "sk-private-secret-P1P2P3",
}
CUSTOM_HEADER = "X-Custom-Key"
QUERY_PARAM = "api_key"


@dataclass
class Standard:
    """A daemon with max_body_bytes 4096, three upstreams and one credential of
    each kind. Agent `bot` holds every grant but `private`; agent `other` holds only `private`."""

    world: GateWorld
    up: Upstream  # plain HTTP on 127.0.0.1
    tls_up: Upstream  # HTTPS, certificate from the CA in the daemon's SSL_CERT_FILE
    rogue_up: Upstream  # HTTPS, certificate from a CA the daemon does not trust
    dead_port: int  # nothing listens here

    def close(self) -> None:
        self.world.close()


@functools.cache
def shared_standard() -> Standard:
    """One `standard()` per test process, shared by the modules whose tests leave it usable; each test
    uses its own paths, agents and credentials, so they do not see each other's traffic."""
    instance = standard()
    atexit.register(instance.close)
    return instance


def standard() -> Standard:

    world = GateWorld.start(max_body_bytes=4096)
    try:
        up, tls_up = world.upstream(), world.upstream(tls=True)
        rogue_up = world.upstream(pki=make_pki(world.aegis.root / "rogue-pki", label="Rogue"))
        dead_port = free_port()
        s = SECRETS
        world.credential("bear", s["bear"], up.entry())
        world.credential("hdr", s["hdr"], up.entry(), "--auth-type", "header", "--header-name", CUSTOM_HEADER)
        world.credential("basic", s["basic"], up.entry(), "--auth-type", "basic")
        world.credential("query", s["query"], up.entry(), "--auth-type", "query", "--query-param", QUERY_PARAM)
        world.credential("ro", s["ro"], up.entry(), "--scopes", "read")
        world.credential("wo", s["wo"], up.entry(), "--scopes", "write")
        world.credential("tls", s["tls"], tls_up.entry("localhost"))
        world.credential("rogue", s["rogue"], rogue_up.entry("localhost"))
        world.credential("dead", s["dead"], f"http://127.0.0.1:{dead_port}")
        # bücher.localhost goes through the resolver like any name (only `localhost` itself counts as this machine).
        world.credential("multi", s["multi"], [up.entry(), up.entry("localhost"), up.entry("bücher.localhost")],
                         "--allow-plain-http")
        world.credential("private", s["private"], up.entry(), service="secret-svc")
        world.agent("bot", *(name for name in s if name != "private"))
        world.agent("other", "private")
    except BaseException:
        world.close()
        raise
    return Standard(world, up, tls_up, rogue_up, dead_port)
