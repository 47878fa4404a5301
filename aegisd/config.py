"""Daemon settings: command-line flags > environment > TOML config file > defaults.

Defaults follow XDG for a user daemon and the directories systemd hands a service
(`$STATE_DIRECTORY`, `$RUNTIME_DIRECTORY`, `$CREDENTIALS_DIRECTORY`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from aegisd.api.config_file import ConfigFileError, read_config_file
from aegisd.vault.crypto import ARGON2_MAX
from aegisd.vault.domains import is_loopback_host

DEFAULT_GATE_LISTEN = "127.0.0.1:3100"
UNLOCK_CREDENTIAL_NAME = "aegis-unlock"
LOG_FORMATS = ("human", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
# The most of a config file read: far past any real one (a few hundred bytes); an endless file (/dev/zero) is then
# one clear error rather than all the memory there is. aegisctl reads the file with the same limit.
_T = TypeVar("_T")

# key in the TOML file -> (section, name); sections keep the file readable as it grows.
_TOML_KEYS: dict[str, tuple[str, ...]] = {
    "data_dir": ("data_dir",),
    "socket": ("socket",),
    "socket_group": ("socket_group",),
    "socket_mode": ("socket_mode",),
    "unlock_key_file": ("unlock_key_file",),
    "stop_grace": ("stop_grace",),
    "gate_listen": ("gate", "listen"),
    "gate_allow_non_loopback": ("gate", "allow_non_loopback"),
    "connect_timeout": ("gate", "connect_timeout"),
    "read_timeout": ("gate", "read_timeout"),
    "total_timeout": ("gate", "total_timeout"),
    "max_body_bytes": ("gate", "max_body_bytes"),
    "agent_max_concurrency": ("gate", "agent_max_concurrency"),
    "max_connections": ("gate", "max_connections"),
    "metrics_enabled": ("gate", "metrics"),
    "health_enabled": ("gate", "health"),
    "webhook_queue_size": ("webhooks", "queue_size"),
    "webhook_workers": ("webhooks", "workers"),
    "webhook_timeout": ("webhooks", "timeout"),
    "webhook_max_attempts": ("webhooks", "max_attempts"),
    "webhook_retry_delay": ("webhooks", "retry_delay"),
    "policies_dir": ("policy", "dir"),
    "kdf_memory_mib": ("vault", "kdf_memory_mib"),
    "kdf_iterations": ("vault", "kdf_iterations"),
    "log_format": ("log", "format"),
    "log_level": ("log", "level"),
}
_ENV_KEYS = {
    "data_dir": "AEGIS_DATA_DIR",
    "socket": "AEGIS_SOCKET",
    "socket_group": "AEGIS_SOCKET_GROUP",
    "socket_mode": "AEGIS_SOCKET_MODE",
    "gate_listen": "AEGIS_GATE_LISTEN",
    "gate_allow_non_loopback": "AEGIS_GATE_ALLOW_NON_LOOPBACK",
    "policies_dir": "AEGIS_POLICIES_DIR",
    "kdf_memory_mib": "AEGIS_KDF_MEMORY_MIB",
    "kdf_iterations": "AEGIS_KDF_ITERATIONS",
}


STOP_GRACE_SECONDS = 10.0
# Numeric settings: (default, minimum, maximum). Timeouts in seconds.
_NUMBERS: dict[str, tuple[float, float, float]] = {
    # How long a stop lets requests and control calls in flight finish, in all; within a service manager's own
    # stop timeout (TimeoutStopSec=30s in the packaged unit; `docker stop` waits 10 s).
    "stop_grace": (STOP_GRACE_SECONDS, 0.0, 300.0),
    "connect_timeout": (10.0, 0.1, 600.0),
    "read_timeout": (120.0, 0.1, 3600.0),
    "total_timeout": (600.0, 0.1, 86400.0),
    "max_body_bytes": (10 * 1024 * 1024, 1024, 1024**3),
    "agent_max_concurrency": (64, 1, 100_000),
    "max_connections": (1024, 1, 1_000_000),
    "webhook_queue_size": (1000, 1, 1_000_000),
    "webhook_workers": (4, 1, 64),
    "webhook_timeout": (10.0, 0.1, 300.0),
    "webhook_max_attempts": (5, 1, 20),
    "webhook_retry_delay": (1.0, 0.01, 3600.0),
    # Argon2id for new passphrase slots. The floor is OWASP's least (19 MiB, 2 passes); the default costs
    # about 0.2 s here. Unlocking uses the cost stored in the slot, whatever these say now.
    "kdf_memory_mib": (64, 19, ARGON2_MAX["memory_kib"] // 1024),
    "kdf_iterations": (3, 2, ARGON2_MAX["iterations"]),
}
# Numeric settings that count something, so a fraction is a mistake rather than a value to round.
_WHOLE_NUMBERS = frozenset({"max_body_bytes", "agent_max_concurrency", "max_connections", "webhook_queue_size",
                            "webhook_workers", "webhook_max_attempts", "kdf_memory_mib", "kdf_iterations"})
# On/off settings: true/false in TOML; in the environment (where one has a variable) also 1/0, yes/no, on/off.
_BOOLEANS: dict[str, bool] = {"metrics_enabled": True, "health_enabled": True, "gate_allow_non_loopback": False}
_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})
# Every setting, by the key the messages name it with (setting_name gives the config file's spelling).
SETTING_KEYS = tuple(_TOML_KEYS)
# Config fields named differently from their setting; every other field with a setting has its key's name.
_FIELD_SETTINGS = {"socket_path": "socket", "gate_host": "gate_listen", "gate_port": "gate_listen"}


class ConfigError(Exception):
    """A setting is malformed; the message names the setting and where it came from. When several are, it names
    every one, a line each, so that one edit fixes them all."""

    @classmethod
    def of(cls, problems: list[str]) -> ConfigError:
        if len(problems) == 1:
            return cls(problems[0])
        return cls(f"{len(problems)} problems in the settings:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class Config:
    data_dir: Path
    socket_path: Path
    gate_host: str
    gate_port: int
    gate_allow_non_loopback: bool = False  # the gate may listen where other machines reach it (warned at start)
    socket_group: str | None = None
    socket_mode: int = 0o600
    unlock_key_file: Path | None = None
    credentials_directory: Path | None = None
    log_format: str = "human"
    log_level: str = "info"
    config_file: Path | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    total_timeout: float = 600.0
    max_body_bytes: int = 10 * 1024 * 1024
    metrics_enabled: bool = True
    health_enabled: bool = True
    webhook_queue_size: int = 1000
    webhook_workers: int = 4
    webhook_timeout: float = 10.0
    webhook_max_attempts: int = 5
    webhook_retry_delay: float = 1.0
    stop_grace: float = STOP_GRACE_SECONDS
    agent_max_concurrency: int = 64
    max_connections: int = 1024  # agent connections open at once; past it new ones are reset
    policies_dir: Path | None = None  # None: no policy files; agents are governed by grants and scopes only
    kdf_memory_mib: int = 64
    kdf_iterations: int = 3
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def gate_address(self) -> str:
        host = f"[{self.gate_host}]" if ":" in self.gate_host else self.gate_host
        return f"{host}:{self.gate_port}"


def load_config(flags: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """Resolve every setting from flags, then environment, then the config file, then defaults."""
    env = os.environ if env is None else env
    config_file = _path_or_none(flags.get("config") or env.get("AEGIS_CONFIG"), "config file",
                                "--config" if flags.get("config") else "AEGIS_CONFIG")
    problems: list[str] = []  # every malformed setting, reported together at the end
    file_values = _read_toml(config_file, problems) if config_file else {}

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in _TOML_KEYS:
        if flags.get(key) not in (None, ""):
            values[key], sources[key] = flags[key], f"--{key.replace('_', '-')}"
        elif key in _ENV_KEYS and env.get(_ENV_KEYS[key]):
            values[key], sources[key] = env[_ENV_KEYS[key]], _ENV_KEYS[key]
        elif key in file_values:
            values[key], sources[key] = file_values[key], f"{config_file}"

    data_dir = (_checked(problems, default_data_dir(env), _home_path, values["data_dir"], "data directory",
                         sources["data_dir"]) if "data_dir" in values else default_data_dir(env))
    socket_path = (_checked(problems, default_socket(env, data_dir), _home_path, values["socket"], "socket path",
                            sources["socket"]) if "socket" in values else default_socket(env, data_dir))
    listen, listen_source = str(values.get("gate_listen", DEFAULT_GATE_LISTEN)), sources.get("gate_listen", "default")
    before = len(problems)
    gate_host, gate_port = _checked(problems, ("127.0.0.1", 3100), parse_listen, listen, listen_source)
    booleans = {key: _checked(problems, _BOOLEANS[key], _boolean, key, values.get(key), sources.get(key, "default"))
                for key in _BOOLEANS}
    # (Not judged on a listen address or an opt-in that is itself malformed: that is already said.)
    if len(problems) == before and not booleans["gate_allow_non_loopback"] and not is_loopback_host(gate_host.lower()):
        problems.append(
            f"gate listen address {listen!r} (from {listen_source}) is not a loopback address: other machines "
            "could reach the gate, and agent tokens would cross the network in clear; listen on 127.0.0.1 (or ::1), "
            "or, to allow it anyway, set [gate] allow_non_loopback = true (or AEGIS_GATE_ALLOW_NON_LOOPBACK=1)")
    socket_group = values.get("socket_group") or None
    socket_mode = _checked(problems, 0o600, _parse_mode, values.get("socket_mode"), socket_group,
                           sources.get("socket_mode", "default"))
    log_format = _checked(problems, "human", _choice, values.get("log_format", "human"), LOG_FORMATS, "log format",
                          sources.get("log_format", "default"))
    log_level = _checked(problems, "info", _choice, values.get("log_level", "info"), LOG_LEVELS, "log level",
                         sources.get("log_level", "default"))
    numbers = {key: _checked(problems, _NUMBERS[key][0], _number, key, values.get(key), sources.get(key, "default"))
               for key in _NUMBERS}
    if problems:
        raise ConfigError.of(problems)
    creds = env.get("CREDENTIALS_DIRECTORY")
    return Config(
        data_dir=data_dir,
        socket_path=socket_path,
        gate_host=gate_host,
        gate_port=gate_port,
        gate_allow_non_loopback=booleans["gate_allow_non_loopback"],
        socket_group=str(socket_group) if socket_group else None,
        socket_mode=socket_mode,
        unlock_key_file=_path_or_none(values.get("unlock_key_file"), "unlock key file",
                                      sources.get("unlock_key_file", "")),
        credentials_directory=Path(creds) if creds else None,
        log_format=log_format,
        log_level=log_level,
        config_file=config_file,
        connect_timeout=numbers["connect_timeout"],
        read_timeout=numbers["read_timeout"],
        total_timeout=numbers["total_timeout"],
        max_body_bytes=int(numbers["max_body_bytes"]),
        metrics_enabled=booleans["metrics_enabled"],
        health_enabled=booleans["health_enabled"],
        webhook_queue_size=int(numbers["webhook_queue_size"]),
        webhook_workers=int(numbers["webhook_workers"]),
        webhook_timeout=numbers["webhook_timeout"],
        webhook_max_attempts=int(numbers["webhook_max_attempts"]),
        webhook_retry_delay=numbers["webhook_retry_delay"],
        stop_grace=numbers["stop_grace"],
        agent_max_concurrency=int(numbers["agent_max_concurrency"]),
        max_connections=int(numbers["max_connections"]),
        policies_dir=_path_or_none(values.get("policies_dir"), "policy directory", sources.get("policies_dir", "")),
        kdf_memory_mib=int(numbers["kdf_memory_mib"]),
        kdf_iterations=int(numbers["kdf_iterations"]),
        sources=sources,
    )


def default_data_dir(env: Mapping[str, str]) -> Path:
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "aegis"


def default_socket(env: Mapping[str, str], data_dir: Path) -> Path:
    if env.get("RUNTIME_DIRECTORY"):
        return Path(env["RUNTIME_DIRECTORY"].split(":")[0]) / "aegisd.sock"
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "aegis" / "aegisd.sock"
    return data_dir / "run" / "aegisd.sock"


def parse_listen(text: str, source: str = "default") -> tuple[str, int]:
    """Parse `host:port` or `[v6]:port` for the gate listener."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"gate listen address {text!r} (from {source}) must be HOST:PORT, e.g. 127.0.0.1:3100")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"gate listen address {text!r} (from {source}) has an invalid port {port_text!r}")
    if int(port_text) == 0:  # "any free port": agents, status and mcp config could not tell which
        raise ConfigError(f"gate listen address {text!r} (from {source}) needs a fixed port: agents must know "
                          "where the gate is")
    return host, int(port_text)


def startup_warnings(config: Config) -> list[str]:
    """What the daemon logs at start about settings it accepts but that are probably not what was meant."""
    warnings = []
    if not is_loopback_host(config.gate_host.lower()):
        warnings.append(f"the gate listens on {config.gate_address}, which is not loopback ([gate] allow_non_loopback "
                        "is set): other machines can reach it, agent tokens cross the network in clear, and "
                        "/_aegis/metrics and /_aegis/health answer anyone who can connect")
    if config.socket_group and config.socket_mode & 0o060 != 0o060:
        warnings.append(f"socket_group {config.socket_group} is set but socket mode {config.socket_mode:04o} does "
                        "not let the group read and write the control socket, so its members cannot use it; "
                        "use socket_mode 0660")
    return warnings


def _checked(problems: list[str], fallback: _T, check: Callable[..., _T], *args: Any) -> _T:
    """`check(*args)`, or, if it refuses the setting, `fallback` with the refusal added to `problems`, so that
    the rest is still checked."""
    try:
        return check(*args)
    except ConfigError as exc:
        problems.append(str(exc))
        return fallback


def _read_toml(path: Path, problems: list[str]) -> dict[str, Any]:
    """The file's settings by key. An unknown or mistyped one is added to `problems` and left out; a file that
    cannot be read or parsed at all is a ConfigError at once."""
    try:
        raw = read_config_file(path, owned=True)
    except ConfigFileError as exc:
        raise ConfigError(str(exc)) from None
    flat: dict[str, Any] = {}
    known = {path_: key for key, path_ in _TOML_KEYS.items()}
    sections = {p[0] for p in _TOML_KEYS.values() if len(p) > 1}
    for name, value in raw.items():
        if name in sections and isinstance(value, dict):
            for sub, subvalue in value.items():
                if (name, sub) not in known:
                    problems.append(f"config file {path}: unknown setting [{name}] {sub}")
                else:
                    flat[known[(name, sub)]] = subvalue
        elif (name,) in known:
            flat[known[(name,)]] = value
        else:
            problems.append(f"config file {path}: unknown setting {name}")
    for key, value in list(flat.items()):
        if key in _NUMBERS:
            wrong = "" if isinstance(value, int | float) and not isinstance(value, bool) else "a number"
        elif key in _BOOLEANS:
            wrong = "" if isinstance(value, bool) else "true or false"
        else:
            wrong = "" if isinstance(value, str) else "a string"
        if wrong:
            problems.append(f"config file {path}: {setting_name(key)} must be {wrong}, got {type(value).__name__}")
            del flat[key]  # reported once, not again as the default's or a later check's problem
    return flat


def changed_settings(running: Config, fresh: Config, applied: frozenset[str]) -> list[str]:
    """The settings that differ between `running` and `fresh`, except the Config fields in `applied`, as the
    config file spells them; a field with no setting of its own (the environment's) is named as it is."""
    names: list[str] = []
    for item in fields(Config):
        if not item.compare or item.name in applied or getattr(running, item.name) == getattr(fresh, item.name):
            continue
        key = _FIELD_SETTINGS.get(item.name, item.name)
        name = setting_name(key) if key in _TOML_KEYS else item.name
        if name not in names:
            names.append(name)
    return names


def setting_name(key: str) -> str:
    """A setting as the config file spells it (`[webhooks] workers`), which is what messages name."""
    return " ".join((f"[{part}]" if i == 0 and len(_TOML_KEYS[key]) > 1 else part)
                    for i, part in enumerate(_TOML_KEYS[key]))


def _limit(bound: float) -> str:
    """A bound as it would be written in the config file: 1073741824, not 1.07374e+09."""
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def _number(key: str, value: Any, source: str) -> float:
    default, low, high = _NUMBERS[key]
    if value is None:
        return default
    shown = _shown(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{setting_name(key)} {shown} (from {source}) must be a number") from None
    except OverflowError:  # an integer past a float's range: out of range, as any too large
        number = float("inf")
    if not low <= number <= high:
        raise ConfigError(f"{setting_name(key)} {shown} (from {source}) must be between {_limit(low)} and "
                          f"{_limit(high)}")
    if key in _WHOLE_NUMBERS and not number.is_integer():
        raise ConfigError(f"{setting_name(key)} {shown} (from {source}) must be a whole number")
    return number


def _shown(value: Any) -> str:
    """A value as an error quotes it, at most 40 characters (an integer of 5,000 digits cannot even be written:
    Python refuses to turn one into text)."""
    try:
        text = repr(value)
    except ValueError:
        return "(a number too long to show)"
    return text if len(text) <= 40 else f"{text[:37]}..."


def _boolean(key: str, value: Any, source: str) -> bool:
    if value is None:
        return _BOOLEANS[key]
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE_WORDS or text in _FALSE_WORDS:
        return text in _TRUE_WORDS
    raise ConfigError(f"{setting_name(key)} {_shown(value)} (from {source}) must be true or false (or 1 or 0)")


def _parse_mode(value: Any, group: Any, source: str) -> int:
    if value in (None, ""):
        return 0o660 if group else 0o600
    try:
        mode = int(str(value), 8)
    except ValueError:
        raise ConfigError(f"socket mode {_shown(value)} (from {source}) must be octal, e.g. 0660") from None
    if not 0 <= mode <= 0o777:  # setuid, setgid and sticky bits mean nothing on a socket
        raise ConfigError(f"socket mode {_shown(value)} (from {source}) must be permission bits only, at most 0777 "
                          "(e.g. 0600 or 0660)")
    if mode & 0o007:
        raise ConfigError(f"socket mode {_shown(value)} (from {source}) must not grant access to other users")
    if mode & 0o600 != 0o600:
        raise ConfigError(f"socket mode {_shown(value)} (from {source}) must let the owner read and write")
    return mode


def _choice(value: Any, allowed: tuple[str, ...], what: str, source: str) -> str:
    text = str(value).lower()
    if text not in allowed:
        raise ConfigError(f"{what} {_shown(value)} (from {source}) is not one of: {', '.join(allowed)}")
    return text


def _path_or_none(value: Any, what: str, source: str) -> Path | None:
    return _home_path(value, what, source) if value else None


def _home_path(value: Any, what: str, source: str) -> Path:
    """`value` as a path, `~` and `~user` expanded; a `~user` with no such user, or a NUL (which TOML can spell
    and no system call takes), is a ConfigError, not a crash."""
    if "\0" in str(value):
        raise ConfigError(f"{what} {str(value)!r} (from {source}) contains a NUL character")
    try:
        return Path(str(value)).expanduser()
    except RuntimeError:
        raise ConfigError(f"{what} {str(value)!r} (from {source}) starts with the home of a user that does not "
                          "exist") from None
