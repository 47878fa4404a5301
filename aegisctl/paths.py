"""Where the daemon's control socket is: --socket > AEGIS_SOCKET > config file > default.

Mirrors the daemon's own defaults without importing it (aegisctl imports only the API stubs).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path

SYSTEM_SOCKET = Path("/run/aegis/aegisd.sock")


class PathError(Exception):
    """The config file named by AEGIS_CONFIG cannot be used."""


def resolve_socket(flag: str | None, config: str | None, env: Mapping[str, str] | None = None) -> Path:
    path, fallback = socket_choice(flag, config, env)
    # A packaged system service listens in /run/aegis; use it when no per-user daemon runs.
    if fallback is not None and not path.exists() and fallback.exists():
        return fallback
    return path


def socket_choice(flag: str | None, config: str | None,
                  env: Mapping[str, str] | None = None) -> tuple[Path, Path | None]:
    """The socket named by --socket, AEGIS_SOCKET or the config file, used as it is (second item None); else the
    per-user default and the packaged system socket to use instead when nothing is at the default."""
    env = os.environ if env is None else env
    if flag:
        return Path(flag).expanduser(), None
    if env.get("AEGIS_SOCKET"):
        return Path(env["AEGIS_SOCKET"]).expanduser(), None
    settings = read_config(config or env.get("AEGIS_CONFIG"))
    if settings.get("socket"):
        return Path(str(settings["socket"])).expanduser(), None
    if env.get("XDG_RUNTIME_DIR"):
        candidate = Path(env["XDG_RUNTIME_DIR"]) / "aegis" / "aegisd.sock"
    else:
        data = env.get("AEGIS_DATA_DIR") or settings.get("data_dir")
        data_dir = Path(str(data)).expanduser() if data else (
            Path(env.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "aegis")
        candidate = data_dir / "run" / "aegisd.sock"
    return candidate, SYSTEM_SOCKET


def read_config(path: str | None) -> dict[str, object]:
    """aegisd's TOML config file as a dict ({} when none is named); shared with the MCP bridge."""
    if not path:
        return {}
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise PathError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PathError(f"config file {path} cannot be read: {exc}") from None
