"""Where the daemon's control socket is: --socket > AEGIS_SOCKET > config file > default.

Mirrors the daemon's own defaults without importing it (aegisctl imports only the API stubs).
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from collections.abc import Mapping
from pathlib import Path

SYSTEM_SOCKET = Path("/run/aegis/aegisd.sock")


MAX_LINKS = 40  # symbolic links followed on the way to the socket, as the kernel allows in one lookup


class PathError(Exception):
    """The config file named by AEGIS_CONFIG cannot be used."""


class UnsafePath(Exception):
    """Someone other than root or this user could redirect the socket's path; `chmod` is a directory of this
    user's own that closing would make safe, when that is the fix."""

    def __init__(self, message: str, chmod: Path | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.chmod = chmod


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
        return _checked_path(flag, "socket", "--socket"), None
    if env.get("AEGIS_SOCKET"):
        return _checked_path(env["AEGIS_SOCKET"], "socket", "AEGIS_SOCKET"), None
    settings = read_config(config or env.get("AEGIS_CONFIG"))
    if settings.get("socket"):
        return _checked_path(settings["socket"], "socket", f"config file {config or env.get('AEGIS_CONFIG')}"), None
    if env.get("XDG_RUNTIME_DIR"):
        candidate = Path(env["XDG_RUNTIME_DIR"]) / "aegis" / "aegisd.sock"
    else:
        data = env.get("AEGIS_DATA_DIR") or settings.get("data_dir")
        where = "AEGIS_DATA_DIR" if env.get("AEGIS_DATA_DIR") else f"config file {config or env.get('AEGIS_CONFIG')}"
        data_dir = _checked_path(data, "data_dir", where) if data else (
            Path(env.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "aegis")
        candidate = data_dir / "run" / "aegisd.sock"
    return candidate, SYSTEM_SOCKET


def _checked_path(value: object, key: str, where: str) -> Path:
    """A path from the config file (or AEGIS_DATA_DIR); a NUL, which TOML can spell and no system call takes, or a
    `~user` of no such user is a PathError, as aegisd says it, not a traceback."""
    if "\0" in str(value):
        raise PathError(f"{key} {str(value)!r} (from {where}) contains a NUL character")
    try:
        return Path(str(value)).expanduser()
    except RuntimeError:
        raise PathError(f"{key} {str(value)!r} (from {where}) starts with the home of a user that does not "
                        "exist") from None


def safe_directory(directory: Path) -> Path:
    """The real path of the socket's directory, once no one but root and this user can change where the path
    leads (OpenSSH's StrictModes rule); else UnsafePath naming the step, its owner and the fix.

    From / down, every directory passed through and every symbolic link on the way must belong to root or this
    user (a link is then followed), and one that group or others can write must be sticky (like /tmp). The
    directory itself must belong to root or this user too, or be a service's, as the packaged /run/aegis is: made
    by systemd in root's /run for the service's own user (service_directory)."""
    trusted = {0, os.geteuid()}
    todo, here, links = list(reversed(directory.absolute().parts)), Path("/"), 0
    while todo:
        name = todo.pop()
        if name in (".", ""):
            continue
        if name in ("/", ".."):
            here = Path("/") if name == "/" else here.parent
            continue
        _passable(here, trusted)
        step = here / name
        info = _lstat(step)
        if stat.S_ISLNK(info.st_mode):
            links += 1
            if info.st_uid not in trusted:
                raise UnsafePath(f"{step} is a symbolic link owned by {owner(info.st_uid)}, not by you or root, who "
                                 "can point it at a server of their own at any time")
            if links > MAX_LINKS:
                raise UnsafePath(f"more than {MAX_LINKS} symbolic links on the way to {directory}")
            try:
                todo.extend(reversed(Path(os.readlink(step)).parts))
            except OSError as exc:
                raise UnsafePath(f"cannot read the symbolic link {step}: {exc.strerror}") from None
            continue
        if not stat.S_ISDIR(info.st_mode):
            raise UnsafePath(f"{step} is not a directory")
        here = step
    info = _lstat(here)
    if info.st_uid not in trusted:
        service_directory(here, info)
    return here


def service_directory(here: Path, info: os.stat_result) -> None:
    """A socket directory of another user's is trusted only as the packaged /run/aegis is: its owner a system
    account that a service runs as (a uid below UID_MIN of /etc/login.defs, or one of systemd's DynamicUser= uids),
    nobody but that owner able to write it, inside a directory nobody else can write (one of root's or this user's,
    as safe_directory's walk has made sure). Never a login user's (their home, say), however closed the path to it:
    that user could be serving there and take what aegisctl sends. UnsafePath says which rule it breaks."""
    # Imported here: the MCP bridge imports this module and, an agent, loads nothing of aegisd's at start.
    from aegisd.api.accounts import DYNAMIC_UIDS, system_account, uid_min

    whose = f"its directory {here} belongs to {owner(info.st_uid)}, not to you or root"
    parent = _lstat(here.parent)
    if parent.st_mode & 0o022:
        raise UnsafePath(f"{whose}, and {here.parent} (mode {stat.S_IMODE(parent.st_mode):04o}) lets others make "
                         "directories in it, so anyone could have made it")
    if not system_account(info.st_uid):
        raise UnsafePath(f"{whose}, nor to a system account that a service runs as (a uid below {uid_min()}, or "
                         f"systemd's dynamic {DYNAMIC_UIDS.start}-{DYNAMIC_UIDS.stop - 1}), so its owner could be "
                         "running a server of their own there; to reach that user's aegisd, run aegisctl as that user")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022:
        who = " and ".join(w for w, bit in (("group", 0o020), ("world", 0o002)) if mode & bit)
        raise UnsafePath(f"{whose}, and is {who}-writable (mode {mode:04o}), so others than its owner could have "
                         "put a server of their own there")


def _passable(directory: Path, trusted: set[int]) -> None:
    """A directory on the way to the socket: its owner, or anyone who can write it unless it is sticky, could
    swap what is below it."""
    info = _lstat(directory)
    if info.st_uid not in trusted:
        raise UnsafePath(f"{directory} on the way to it belongs to {owner(info.st_uid)}, not to you or root, who "
                         "can replace what is inside it")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022 and not mode & stat.S_ISVTX:
        who = " and ".join(w for w, bit in (("group", 0o020), ("world", 0o002)) if mode & bit)
        raise UnsafePath(f"{directory} on the way to it is {who}-writable (mode {mode:04o}) and not sticky, so "
                         "anyone who can write it can replace what is inside it",
                         directory if info.st_uid == os.geteuid() else None)


def _lstat(path: Path) -> os.stat_result:
    try:
        return os.lstat(path)
    except OSError as exc:
        raise UnsafePath(f"cannot check {path}: {exc.strerror}") from None


def owner(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def read_config(path: str | None) -> dict[str, object]:
    """aegisd's TOML config file as a dict ({} when none is named); shared with the MCP bridge. Read as aegisd
    reads it, by the same reader (aegisd.api.config_file): at most 1 MiB, so that an endless file (/dev/zero) is
    one clear error, not all the memory there is."""
    if not path:
        return {}
    # Imported here: the MCP bridge imports this module and, an agent, loads nothing of aegisd's at start.
    from aegisd.api.config_file import ConfigFileError, read_config_file

    try:
        return read_config_file(path)
    except ConfigFileError as exc:
        raise PathError(str(exc)) from None
