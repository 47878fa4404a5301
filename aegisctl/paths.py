"""Where the daemon's control socket is: --socket > AEGIS_SOCKET > config file > default.

Mirrors the daemon's own defaults without importing it (aegisctl imports only the API stubs).
"""

from __future__ import annotations

import errno
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path

SYSTEM_SOCKET = Path("/run/aegis/aegisd.sock")


class PathError(Exception):
    """The config file named by AEGIS_CONFIG cannot be used."""


def resolve_socket(flag: str | None, config: str | None, env: Mapping[str, str] | None = None) -> Path:
    path, fallback = socket_choice(flag, config, env)
    # A packaged system service listens in /run/aegis; use it when no per-user daemon runs, also when its directory
    # is closed to this user (then the client says so, rather than that nothing runs). Decided with os.stat and
    # errno: Path.exists() raises PermissionError for such a path up to Python 3.13 and says False from 3.14 on.
    if fallback is not None and lookup(path) == "absent" and lookup(fallback) in ("present", "hidden"):
        return fallback
    return path


def lookup(path: Path) -> str:
    """"present", "hidden" (in a directory this user may not search, so something may be there), "absent" (as
    Path.exists() has it up to Python 3.13: nothing there, or a path that cannot lead anywhere), else "unknown"."""
    try:
        os.stat(path)
    except ValueError:  # a NUL in the path
        return "absent"
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            return "hidden"
        return "absent" if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP) else "unknown"
    return "present"


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
