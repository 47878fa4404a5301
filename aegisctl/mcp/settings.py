"""What the MCP bridge needs before it starts: the agent token and the gate's URL.

The token comes from `--token-file` or `AEGIS_AGENT_TOKEN` (flag over environment). A token
file that group or others may read is refused, as ssh refuses such a key: anyone who can read
it can act as this agent. The gate URL comes from `--gate-url`, `AEGIS_GATE_URL`, then
`http://` + the gate's listen address (`mcp config` only: as the running aegisd reports it; then
`AEGIS_GATE_LISTEN`, aegisd's config file, 127.0.0.1:3100).
The gate must be on loopback: the token goes to it with every call.

The HTTP transport authenticates its caller with a bearer of its own, never the agent token: a
random `aegis-mcp_...` secret kept in a 0600 file beside the token file (or `--bearer-file`),
created on first use and kept, so a host's configuration stays valid across restarts. The gate
accepts no such bearer, so whoever receives it (a process squatting the port while the bridge is
down) gains nothing at the gate.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from aegisctl.paths import PathError, read_config

DEFAULT_GATE_LISTEN = "127.0.0.1:3100"
GATE_TIMEOUT = 10.0  # seconds for one of the gate's own /_aegis answers, which need no upstream
# aegisd's defaults for [gate] connect_timeout and read_timeout: the gate can be silent that long before
# an upstream's answer starts, and read_timeout between two of its reads; MARGIN covers the rest.
GATE_CONNECT_TIMEOUT, GATE_READ_TIMEOUT, MARGIN = 10.0, 120.0, 20.0
MAX_TIMEOUT = 86400.0
TOKEN_CHARS = re.compile(r"^[\x21-\x7e]{1,512}\Z")  # what one HTTP header value can carry verbatim
LOOPBACK_LISTEN = {"127.0.0.1": "127.0.0.1", "localhost": "127.0.0.1", "::1": "::1", "[::1]": "::1"}
BEARER_PREFIX = "aegis-mcp_"  # not the gate's "aegis_": the gate never takes it for an agent token
BEARER = re.compile(r"^aegis-mcp_[A-Za-z0-9_-]{43,128}\Z")
BEARER_SUFFIX = ".mcp-bearer"


class SettingsError(Exception):
    """The bridge cannot start as configured; `message` says why and `hint` what to do next."""

    def __init__(self, message: str, hint: str = "", *, usage: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.usage = usage


@dataclass(frozen=True)
class Timeouts:
    """How long the bridge waits for the gate: `gate` for a whole /_aegis answer, `read` between two
    reads of a proxied call (the gate's own upstream timeouts fire first, so this is a stalled gate)."""

    gate: float = GATE_TIMEOUT
    read: float = GATE_CONNECT_TIMEOUT + GATE_READ_TIMEOUT + MARGIN


@dataclass(frozen=True)
class BridgeSettings:
    gate_url: str
    token: str
    timeouts: Timeouts = Timeouts()
    config_path: str | None = None  # aegisctl's --config: where the control socket's path may come from

    def __repr__(self) -> str:  # never show the token, even in a traceback or a debugger
        return (f"BridgeSettings(gate_url={self.gate_url!r}, token=<hidden>, timeouts={self.timeouts!r}, "
                f"config_path={self.config_path!r})")


def load(token_file: Path | None, gate_url_flag: str | None, env: Mapping[str, str] | None = None,
         config_path: str | None = None) -> BridgeSettings:
    env = os.environ if env is None else env
    return BridgeSettings(gate_url(gate_url_flag, env, config_path), agent_token(token_file, env),
                          timeouts(env, config_path), config_path)


def timeouts(env: Mapping[str, str], config_path: str | None = None) -> Timeouts:
    """AEGIS_MCP_GATE_TIMEOUT, else 10 s; AEGIS_MCP_READ_TIMEOUT, else the gate's connect_timeout +
    read_timeout (from [gate] in AEGIS_CONFIG's file, else aegisd's defaults) + 20 s."""
    try:
        gate = _gate_section(config_path or env.get("AEGIS_CONFIG"))
    except SettingsError:
        gate = {}  # only defaults come from it here; gate_url says what is wrong with the file when it needs it
    connect = _seconds(gate.get("connect_timeout", GATE_CONNECT_TIMEOUT), "[gate] connect_timeout")
    read = _seconds(gate.get("read_timeout", GATE_READ_TIMEOUT), "[gate] read_timeout")
    return Timeouts(_seconds(env.get("AEGIS_MCP_GATE_TIMEOUT") or GATE_TIMEOUT, "AEGIS_MCP_GATE_TIMEOUT"),
                    _seconds(env.get("AEGIS_MCP_READ_TIMEOUT") or connect + read + MARGIN, "AEGIS_MCP_READ_TIMEOUT"))


def _seconds(value: object, name: str) -> float:
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        seconds = 0.0
    if not 0 < seconds <= MAX_TIMEOUT:
        raise SettingsError(f"{name} = {value!r} is not a number of seconds between 0 and {MAX_TIMEOUT:.0f}",
                            f"set {name} to e.g. 30", usage=True)
    return seconds


def gate_url(flag: str | None, env: Mapping[str, str], config_path: str | None = None,
             running: str | None = None) -> str:
    """The gate's base URL, checked, on loopback, and without a trailing slash. `running` is the gate address
    the running aegisd reports (`mcp config` asks it; the bridge, an agent, does not): it comes after the flag
    and AEGIS_GATE_URL, and before the listen address aegisctl would otherwise assume."""
    raw, source = flag, "--gate-url"
    if not raw:
        raw, source = env.get("AEGIS_GATE_URL"), "AEGIS_GATE_URL"
    if not raw and running:
        raw, source = "http://" + _reachable(running), "the running aegisd's gate address"
    if not raw:
        config = config_path or env.get("AEGIS_CONFIG")
        listen, source = env.get("AEGIS_GATE_LISTEN"), "AEGIS_GATE_LISTEN"
        if not listen:
            listen, source = _configured_listen(config), f"[gate] listen in {config}"
        raw = "http://" + _reachable(listen or DEFAULT_GATE_LISTEN)
    parts = urlsplit(raw.strip())
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if (parts.scheme not in ("http", "https") or not parts.hostname or not port_ok or parts.username
            or parts.password or parts.path not in ("", "/") or parts.query or parts.fragment):
        raise SettingsError(f"the gate URL {raw!r} (from {source}) is not a plain http(s)://HOST:PORT address",
                            "set AEGIS_GATE_URL (or --gate-url) to e.g. http://127.0.0.1:3100", usage=True)
    if not is_loopback(parts.hostname):
        # The agent token goes to this address with every call. aegisd's gate is a local service; a
        # config shared in a repository (.mcp.json) could otherwise send the token to anyone's host,
        # over https as easily as over http.
        dotted = (" (a name ending in '.' is looked up in DNS, which may answer with any address; write "
                  "localhost without the dot)" if parts.hostname.endswith(".") else "")
        raise SettingsError(f"the gate URL {raw!r} (from {source}) is not a loopback address{dotted}: the bridge "
                            "sends the agent token only to a gate on 127.0.0.1, [::1] or localhost, never to another "
                            "host",
                            f"set {source if source in ('--gate-url', 'AEGIS_GATE_URL') else 'AEGIS_GATE_URL'} "
                            "to the gate's loopback address, e.g. http://127.0.0.1:3100", usage=True)
    return f"{parts.scheme}://{parts.netloc}"


def _reachable(listen: str) -> str:
    """A gate listening on every address (0.0.0.0, [::], [0::0]) is reached, like any local one, on loopback."""
    host, sep, port = listen.rpartition(":")
    if not sep:
        return listen
    try:
        unspecified = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return listen
    if not unspecified.is_unspecified:
        return listen
    return ("127.0.0.1" if unspecified.version == 4 else "[::1]") + sep + port


def is_loopback(host: str) -> bool:
    """`localhost`, or an address in 127.0.0.0/8 or ::1 (an IPv4-mapped one too); never another name.

    `localhost` exactly: the system answers it itself (/etc/hosts, systemd-resolved), but glibc sends the fully
    qualified `localhost.` (or `localhost..`) to DNS, which may answer with any address (aegisd's webhooks
    refuse it for the same reason).
    """
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def gate_url_is_default(flag: str | None, env: Mapping[str, str], config_path: str | None = None) -> bool:
    """Whether gate_url fell back to 127.0.0.1:3100 for want of a flag, variable or config file saying more."""
    return not (flag or env.get("AEGIS_GATE_URL") or env.get("AEGIS_GATE_LISTEN")
                or _configured_listen(config_path or env.get("AEGIS_CONFIG")))


def _configured_listen(config_path: str | None) -> str | None:
    listen = _gate_section(config_path).get("listen")
    return str(listen) if listen else None


def _gate_section(config_path: str | None) -> dict[str, object]:
    try:
        gate = read_config(config_path).get("gate")
    except PathError as exc:
        raise SettingsError(str(exc), "fix AEGIS_CONFIG, or set AEGIS_GATE_URL", usage=True) from None
    return gate if isinstance(gate, dict) else {}


def agent_token(token_file: Path | None, env: Mapping[str, str]) -> str:
    if token_file is not None:
        token = read_token_file(token_file)
    else:
        token = env.get("AEGIS_AGENT_TOKEN", "").strip()
        if not token:
            raise SettingsError("no agent token: set AEGIS_AGENT_TOKEN or pass --token-file PATH",
                                "create one with `aegisctl agent add NAME` and grant it credentials with "
                                "`aegisctl grant NAME CREDENTIAL`", usage=True)
    if not TOKEN_CHARS.match(token):
        raise SettingsError("the agent token contains spaces or characters an HTTP header cannot carry",
                            "copy the token again exactly as `aegisctl agent add` printed it")
    return token


def check_token_file(path: Path, what: str = "token file", reader: str = "can act as this agent") -> os.stat_result:
    """Refuse a missing, non-regular or group/other-accessible token (or bearer) file, with the fix."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise SettingsError(f"the {what} {path} does not exist",
                            f"save a token there, private from the start: (umask 077; aegisctl agent add NAME > {path})"
                            ) from None
    except OSError as exc:
        raise SettingsError(f"the {what} {path} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise SettingsError(f"the {what} {path} is not a regular file")
    if info.st_mode & 0o077:
        raise SettingsError(f"the {what} {path} is accessible by group or others (mode "
                            f"{stat.S_IMODE(info.st_mode):04o}); anyone who reads it {reader}",
                            f"chmod 600 {path}")
    return info


def read_token_file(path: Path) -> str:
    check_token_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise SettingsError(f"the token file {path} cannot be read: {reason}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise SettingsError(f"the token file {path} must hold the agent token alone on one line "
                            f"(it has {len(lines)} non-empty lines)")
    return lines[0]


def listen_address(value: str) -> tuple[str, int]:
    """`--listen HOST:PORT` for the HTTP transport: loopback only, since agents are local."""
    host, sep, port_text = value.strip().rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise SettingsError(f"--listen {value!r} must be HOST:PORT, e.g. 127.0.0.1:3300", usage=True)
    bind = LOOPBACK_LISTEN.get(host.lower())
    if bind is None:
        raise SettingsError(f"--listen {value!r}: the MCP bridge listens on loopback only (127.0.0.1, [::1] "
                            "or localhost); it serves a local AI host, never the network", usage=True)
    return bind, int(port_text)


@dataclass(frozen=True)
class HttpListen:
    """The HTTP transport: where it listens, and the bearer its callers must send."""

    host: str
    port: int
    bearer: str
    bearer_file: Path
    created: bool  # the bearer file was made just now

    def __repr__(self) -> str:  # never show the bearer
        return f"HttpListen(host={self.host!r}, port={self.port}, bearer=<hidden>, bearer_file={self.bearer_file})"


def bearer_path(token_file: Path | None, bearer_file: Path | None) -> Path:
    """`--bearer-file`, else the token file's path plus `.mcp-bearer`; with neither, a usage error."""
    if bearer_file is not None:
        return bearer_file.expanduser().absolute()
    if token_file is not None:
        token_file = token_file.expanduser().absolute()
        return token_file.with_name(token_file.name + BEARER_SUFFIX)
    raise SettingsError("the HTTP transport keeps its own bearer in a file, by default beside --token-file, and no "
                        "token file was given", "pass --token-file PATH, or --bearer-file PATH", usage=True)


def mcp_bearer(path: Path) -> tuple[str, bool]:
    """The bearer kept in `path` and whether it was created now: made (0600, atomically) if missing."""
    if not os.path.lexists(path):
        try:
            return _create_bearer(path), True
        except FileExistsError:
            pass  # another bridge or `mcp config` made it meanwhile: use theirs
    return _read_bearer(path), False


def _create_bearer(path: Path) -> str:
    bearer = BEARER_PREFIX + secrets.token_urlsafe(32)
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, (bearer + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(partial, path)  # whole or not at all, and never over a file that appeared meanwhile
    except FileExistsError:
        raise
    except OSError as exc:
        raise SettingsError(f"cannot create the MCP bearer file {path}: {exc.strerror}",
                            "create its directory, or choose another place with --bearer-file PATH") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(partial)
    return bearer


def _read_bearer(path: Path) -> str:
    check_token_file(path, "MCP bearer file", "can use this bridge while it runs")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise SettingsError(f"the MCP bearer file {path} cannot be read: {reason}") from None
    if len(lines) != 1 or not BEARER.match(lines[0]):
        raise SettingsError(f"the MCP bearer file {path} does not hold one {BEARER_PREFIX}... bearer",
                            "remove it and a new one is made (then give the host the new one: aegisctl mcp config "
                            "HOST --transport http ...)")
    return lines[0]
