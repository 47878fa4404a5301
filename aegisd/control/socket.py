"""The control socket's file-system side: private directory, mode, group, one daemon per socket.

The socket's permissions are the admin boundary, so they are set before anyone can connect
(umask at bind) and checked again after.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import os
import socket
import stat
from pathlib import Path

from aegisd.api.accounts import group_name, system_account, user_name

MAX_UNIX_PATH = 107
MAX_LINKS = 40  # symbolic links followed on the way to the socket's directory, as the kernel allows in one lookup
# What to do about a socket directory aegisd must not use and must not change (another user's, a shared /tmp).
_OWN_DIRECTORY = ("give aegisd a directory of its own: a --socket in a directory that does not exist yet (aegisd "
                  "creates it closed to others), such as $XDG_RUNTIME_DIR/aegis/aegisd.sock, or in one only its "
                  "user owns and can write")


def group_blocker(directory: Path, gid: int) -> tuple[Path, os.stat_result] | None:
    """The first directory, from / down to `directory` itself, that a member of group `gid` who does not own it
    cannot search, with its stat; None if there is none. Judged by the mode bits (an ACL is not read): a directory
    in group `gid` must let its group search it, any other must let others search it. Both the path as written and
    its real path are walked, as a lookup passes through both; a directory that cannot be looked at is skipped."""
    seen: set[tuple[int, int]] = set()
    for path in (directory.absolute(), Path(os.path.realpath(directory))):
        for step in (*reversed(path.parents), path):
            try:
                info = os.stat(step)
            except OSError:
                continue
            if (info.st_dev, info.st_ino) in seen or not stat.S_ISDIR(info.st_mode):
                continue
            seen.add((info.st_dev, info.st_ino))
            if not info.st_mode & (0o010 if info.st_gid == gid else 0o001):
                return step, info
    return None


def group_reach_problem(socket_path: Path, group: str, data_dir: Path,
                        uid: int | None = None) -> tuple[str, str] | None:
    """(what is wrong, what to do) when members of the socket group cannot use the socket: aegisd runs as (`uid`,
    by default its own) a login user, whose socket directory their aegisctl refuses (only root's, theirs or a
    system account's is trusted: another login user could be serving there), or a directory on the way (above the
    socket's own, one aegisd did not create and so did not change) does not let them pass; else None. aegisd logs
    it as a warning at start and `aegisctl doctor`'s `socket` check warns with the same words."""
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return None  # refused at start
    uid = os.geteuid() if uid is None else uid
    if uid != 0 and not system_account(uid):
        return (f"members of socket group {group} cannot use the control socket {socket_path}: aegisd runs as "
                f"{user_name(uid)} (uid {uid}), a login user, and aegisctl trusts another user's socket "
                "directory only if root or a system account (a service's) owns it"), (
                "run aegisd as a system account, as the packaged service does (systemd DynamicUser=, or a user made "
                "with useradd --system), or have each operator run aegisctl as this user")
    found = group_blocker(socket_path.parent, gid)
    if found is None:
        return None
    blocker, info = found
    bit = "g" if info.st_gid == gid else "o"
    where = f"its directory {blocker}" if blocker == socket_path.parent else f"the directory {blocker} above it"
    problem = (f"members of socket group {group} cannot reach the control socket {socket_path}: {where} (mode "
               f"{stat.S_IMODE(info.st_mode):04o}, owner {user_name(info.st_uid)}, group {group_name(info.st_gid)}) "
               f"does not let them pass (that takes {bit}+x), so they cannot use it")
    fix = (f"give aegisd a --socket (or `socket` in the config file) in a directory group {group} can reach, such as "
           f"/run/aegis/aegisd.sock (aegisd creates each missing directory 0750 in group {group}; under systemd, "
           "RuntimeDirectory=aegis with RuntimeDirectoryMode=0750)")
    try:
        is_data_dir = os.path.samefile(blocker, data_dir)
    except OSError:
        is_data_dir = False
    if is_data_dir:
        fix += "; the data directory itself must stay 0700"
    else:
        who = f"group {group_name(info.st_gid)}" if bit == "g" else "other users"
        fix += f", or `chmod {bit}+x {blocker}` if nothing in it must stay out of reach of {who}"
    return problem, fix


class SocketError(Exception):
    """The socket cannot be served; the message says why and what to do."""


class ControlSocket:
    """Owns the socket path: lock, stale-file cleanup, and permissions."""

    def __init__(self, path: Path, mode: int = 0o600, group: str | None = None) -> None:
        self.path = path
        self.mode = mode
        self.group = group
        self._lock_fd: int | None = None
        self._gid: int | None = None
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket this daemon bound

    def prepare(self) -> None:
        """Make the directory, take the lock, and clear a stale socket left by a crash."""
        if len(os.fsencode(self.path)) > MAX_UNIX_PATH:
            raise SocketError(f"socket path {self.path} is longer than {MAX_UNIX_PATH} bytes; choose a "
                              "shorter --socket")
        if self.group:
            try:
                self._gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                raise SocketError(f"socket group {self.group!r} does not exist") from None
        self._make_directory(self.path.parent)
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SocketError(f"cannot open the socket's lock file {lock_path}: {exc.strerror}; remove whatever is "
                              "there or choose another --socket") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SocketError(f"another aegisd is already serving {self.path}; stop it first "
                              "(or give this one another --socket)") from None
        except OSError as exc:
            os.close(fd)
            raise SocketError(f"cannot lock {lock_path}: {exc.strerror}") from None
        self._lock_fd = fd
        self._clear_stale()

    def secure(self) -> None:
        """Apply the configured group and mode to the bound socket, and remember which file it is."""
        try:
            info = os.lstat(self.path)
            self._bound = (info.st_dev, info.st_ino)
            if self._gid is not None:  # looked up in prepare(), before anything was bound
                os.chown(self.path, -1, self._gid)
            os.chmod(self.path, self.mode)
        except OSError as exc:
            raise SocketError(f"cannot set the group and mode of {self.path}: {exc.strerror}") from None

    def release(self) -> None:
        """Remove the socket this daemon bound, if it is still the one at the path, and drop the lock.

        Whatever else is there (another process's live socket, found by a start that then failed; a file
        someone put in place of ours) is left alone."""
        if self._lock_fd is None:
            return  # never took the lock: the path may be another daemon's live socket
        if self._bound is not None:
            with contextlib.suppress(FileNotFoundError):
                info = os.lstat(self.path)
                if stat.S_ISSOCK(info.st_mode) and (info.st_dev, info.st_ino) == self._bound:
                    self.path.unlink()
            self._bound = None
        os.close(self._lock_fd)
        self._lock_fd = None

    def _make_directory(self, directory: Path) -> None:
        """Create the socket's directory, or check an existing one. Only a directory created here gets its
        mode and group set; an existing one is never changed (it may be a user's $XDG_RUNTIME_DIR, or hold
        other programs' sockets), so it must already be right."""
        real = self._safe_path(directory)
        if real is None:
            try:
                self._create_directory(directory)
            except OSError as exc:
                raise SocketError(f"cannot create socket directory {directory}: {exc.strerror}") from None
            # Walked again, whole now: a missing parent someone else made meanwhile (in /tmp, say) is refused, as
            # it would have been had it been there first; what aegisd made passes the checks below.
            real = self._safe_path(directory)
        try:
            info = os.lstat(real or directory)
        except OSError as exc:
            raise SocketError(f"cannot check socket directory {directory}: {exc.strerror}") from None
        if not stat.S_ISDIR(info.st_mode):
            raise SocketError(f"{directory} is not a directory; choose another --socket")
        if info.st_uid != os.geteuid():
            raise SocketError(f"socket directory {directory} belongs to uid {info.st_uid}, not to aegisd's user "
                              f"(uid {os.geteuid()}); {_OWN_DIRECTORY}")
        dir_mode = stat.S_IMODE(info.st_mode)
        if dir_mode & 0o022:  # what aegisd itself creates is 0700 or 0750, never group-writable
            who = " and ".join(w for w, bit in (("group", 0o020), ("world", 0o002)) if dir_mode & bit)
            if dir_mode & stat.S_ISVTX:
                # A shared sticky directory such as /tmp: others are meant to write there, and closing it would
                # break every program that uses it. (One not owned by aegisd's user was refused above.)
                fix = f"it is a shared sticky directory (like /tmp), so do not change its mode; {_OWN_DIRECTORY}"
            else:
                fix = (f"if nothing else needs to write there, run `chmod g-w,o-w {directory}`; otherwise give "
                       "aegisd a --socket in a directory only its user can write")
            raise SocketError(f"socket directory {directory} is {who}-writable (mode {dir_mode:04o}): anyone who "
                              "can write there could replace the socket with their own and receive the passphrases "
                              f"and keys aegisctl sends; {fix}")
        if self._gid is not None:
            self._check_shared_directory(directory, info)

    def _safe_path(self, directory: Path) -> Path | None:
        """The real path of `directory`, or None where part of it is missing (aegisd creates the rest), once no one
        but root and aegisd's user can change where the path leads (OpenSSH's StrictModes rule): from / down,
        every existing directory passed through and every symbolic link on the way must belong to one of them (a
        link is then followed), and one that group or others can write must be sticky (like /tmp). The directory
        itself is judged by the caller."""
        trusted = {0, os.geteuid()}
        todo, here, links = list(reversed(directory.absolute().parts)), Path("/"), 0
        while todo:
            name = todo.pop()
            if name in ("/", ".."):
                here = Path("/") if name == "/" else here.parent
                continue
            if name in (".", ""):
                continue
            self._check_passable(directory, here, trusted)
            step = here / name
            try:
                info = os.lstat(step)
                if stat.S_ISLNK(info.st_mode):
                    links += 1
                    if info.st_uid not in trusted:
                        raise SocketError(
                            f"socket directory {directory}: {step} is a symbolic link owned by uid {info.st_uid}, not "
                            f"by aegisd's user (uid {os.geteuid()}) or root, who can point it at a directory of their "
                            f"own and receive the passphrases and keys aegisctl sends; {_OWN_DIRECTORY}")
                    if links > MAX_LINKS:
                        raise SocketError(f"more than {MAX_LINKS} symbolic links on the way to socket directory "
                                          f"{directory}; choose another --socket")
                    todo.extend(reversed(Path(os.readlink(step)).parts))
                    continue
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise SocketError(f"cannot check {step} on the way to socket directory {directory}: "
                                  f"{exc.strerror}") from None
            if not stat.S_ISDIR(info.st_mode):
                raise SocketError(f"{step} is not a directory; choose another --socket")
            here = step
        return here

    @staticmethod
    def _check_passable(directory: Path, here: Path, trusted: set[int]) -> None:
        """A directory above the socket's: its owner, or anyone who can write it unless it is sticky, could swap
        what is below it."""
        try:
            info = os.lstat(here)
        except OSError as exc:
            raise SocketError(f"cannot check {here} on the way to socket directory {directory}: "
                              f"{exc.strerror}") from None
        mode = stat.S_IMODE(info.st_mode)
        if info.st_uid not in trusted:
            problem = f"belongs to uid {info.st_uid}, not to aegisd's user (uid {os.geteuid()}) or root"
        elif mode & 0o022 and not mode & stat.S_ISVTX:
            problem = f"is writable by group or others (mode {mode:04o}) and not sticky"
        else:
            return
        raise SocketError(f"{here}, above socket directory {directory}, {problem}: whoever can change it could swap "
                          f"the socket's directory for their own and receive the passphrases and keys aegisctl "
                          f"sends; {_OWN_DIRECTORY}")

    def _create_directory(self, directory: Path) -> None:
        """Make `directory` and any missing parent, each 0700, or with a socket group 0750 in that group: the group
        must pass through every directory aegisd makes on the way to the socket, and no one else needs to (the
        same access as the socket's own directory, so a created parent opens nothing that directory does not).
        Set before the next level exists, so nothing is ever reachable with other permissions. Existing
        directories are never changed (the caller checks them)."""
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            return
        except FileNotFoundError:
            if directory.parent == directory:
                raise
            self._create_directory(directory.parent)
            self._create_directory(directory)
            return
        if self._gid is not None:  # before the socket exists: group members only reach it once it is 0660
            os.chown(directory, -1, self._gid)
            os.chmod(directory, 0o750)  # noqa: S103 - group members must reach the socket

    def _check_shared_directory(self, directory: Path, info: os.stat_result) -> None:
        """An existing directory for a group-shared socket must already be in the socket group, searchable by it
        (reading it is allowed, as the packaged unit's 0750 does; writing was refused above) and closed to
        other users."""
        dir_mode = stat.S_IMODE(info.st_mode)
        problems = []
        if info.st_gid != self._gid:
            try:
                current = grp.getgrgid(info.st_gid).gr_name
            except KeyError:
                current = str(info.st_gid)
            problems.append(f"its group is {current}, not {self.group}")
        if not dir_mode & 0o010:
            problems.append("its group cannot search it")
        if dir_mode & 0o007:
            problems.append("other users have access to it")
        if problems:
            raise SocketError(
                f"socket directory {directory} (mode {dir_mode:04o}) is not ready for socket group {self.group}: "
                f"{'; '.join(problems)}. aegisd changes the mode and group only of a socket directory it creates, "
                "so that it never opens up a directory other programs use (such as $XDG_RUNTIME_DIR). Give aegisd a "
                "directory of its own: a --socket in a directory that does not exist yet (aegisd creates it 0750 in "
                f"group {self.group}), or one made ready for it (under systemd, /run/aegis from RuntimeDirectory= "
                f"with RuntimeDirectoryMode=0750 and Group={self.group}; by hand, `chgrp {self.group} {directory} "
                f"&& chmod 0750 {directory}` if nothing else uses it)")

    def _clear_stale(self) -> None:
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(info.st_mode):
            raise SocketError(f"{self.path} exists and is not a socket; remove it or choose another --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Non-blocking: a live server whose accept queue is full would hold a blocking connect() (and the start) for
        # ever; EAGAIN says a process listens there, as a completed connection does.
        probe.setblocking(False)
        try:
            probe.connect(str(self.path))
        except BlockingIOError:
            raise SocketError(f"another process is already listening on {self.path} (its queue of connections is "
                              "full); stop it first") from None
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise SocketError(f"cannot check {self.path}: {exc.strerror}") from None
            self.path.unlink()  # stale: left behind by a daemon that died
        else:
            raise SocketError(f"another process is already listening on {self.path}; stop it first")
        finally:
            probe.close()
