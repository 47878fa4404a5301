"""What each policy file's last valid version named, kept in aegisd's data directory across restarts.

An invalid file fails closed for the agent its last valid version named (docs/policies.md, "Invalid files
fail closed"); were that remembered in memory only, a file broken while aegisd was stopped, or before a
restart, would free the agent it restricted. The file is JSON, private (0600) and replaced atomically.
It keeps one mapping per policy directory, by the directory's resolved path, for the most recent
MAX_DIRECTORIES of them: naming the same directory by another path (a symlink, its real path) or switching
to another directory and back keeps what was remembered. An entry is also found by the path as configured:
a symlink re-pointed while aegisd was stopped (a deploy switching releases) keeps the mapping of the files it
names, as a running aegisd would; the most recent entry found either way applies. Otherwise another
directory's namesake file is not bound. Version 1 files (one mapping, for the one directory) are still read.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from aegisd.api.accounts import owner_problem
from aegisd.vault.credentials import NAME as AGENT_NAME

log = logging.getLogger("aegisd.policy")
MEMORY_FILE = "policy-memory.json"
MAX_MEMORY_BYTES = 1 << 20  # thousands of times what any real policy directory needs
FORMAT_VERSION = 2  # 1: {"policies_dir": ..., "files": {...}}, one directory only; still read
MAX_DIRECTORIES = 8  # the most recently used policy directories whose mappings are kept
# The agent recorded for a file whose last valid agent cannot be told (the memory could not be read while the
# file was invalid): the file fails closed for every agent until it is valid again.
UNKNOWN_AGENT = ""

Remembered = dict[str, str]  # policy file name -> the agent its last valid version named, or UNKNOWN_AGENT
# (resolved policy directory, the path as configured then, its mapping), most recent first
Entries = tuple[tuple[str, str, Remembered], ...]


class _Absent:
    """No memory file: an empty memory that needs no file written for it."""


class _Unreadable:
    """A memory file that could not be read: replaced at the next save, whatever the mapping."""


_ABSENT, _UNREADABLE = _Absent(), _Unreadable()


class PolicyMemory:
    """The remembered mappings on disk at `path`, one per policy directory (the MAX_DIRECTORIES most recent).

    Writing happens only when what would be written differs from what the file holds; a failed write is
    logged and the caller keeps its in-memory mapping, so a full or read-only disk never stops a reload.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._on_disk: Entries | _Absent | _Unreadable = _ABSENT

    def load(self, directory: Path | None) -> Remembered | None:
        """The mapping remembered for `directory`: empty without a file or when the file has none for it; None
        when the file cannot be read, so that whom an invalid file restricted cannot be told."""
        try:
            data = _read(self.path)
        except FileNotFoundError:
            self._on_disk = _ABSENT
            return {}
        except OSError as exc:
            self._unreadable(f"cannot read it: {exc.strerror or exc}")
            return None
        except ValueError as exc:
            self._unreadable(str(exc))
            return None
        if len(data) > MAX_MEMORY_BYTES:
            self._unreadable(f"it is larger than {MAX_MEMORY_BYTES} bytes")
            return None
        try:
            entries = _decode(data)
        except ValueError as exc:
            self._unreadable(str(exc))
            return None
        self._on_disk = entries
        if directory is None:
            return {}
        key, text = _directory_key(directory), str(directory)
        # The most recent entry for the directory itself or for the path as configured, which a symlink
        # re-pointed while aegisd was stopped (a deploy switching releases) now resolves elsewhere: what a
        # running aegisd would have carried over.
        return dict(next((files for name, configured, files in entries if name == key or configured == text), {}))

    def save(self, directory: Path | None, remembered: Remembered) -> None:
        """Persist `remembered` for `directory`, as the most recent, if the file holds anything else; log a
        failure, never raise. The other directories' mappings stay (those of an unreadable file are lost)."""
        kept = self._on_disk if isinstance(self._on_disk, tuple) else ()
        key = _directory_key(directory)
        others = tuple(entry for entry in kept if entry[0] != key)
        # No directory, or nothing to remember for it: as good as no entry (load gives an empty mapping for both).
        entries = (((key, str(directory), dict(remembered)),) if key is not None and remembered else ()) + others
        entries = entries[:MAX_DIRECTORIES]
        if entries == self._on_disk or (self._on_disk is _ABSENT and not entries):
            return
        body = json.dumps({"version": FORMAT_VERSION,
                           "directories": [{"policies_dir": name, "configured": configured, "files": files}
                                           for name, configured, files in entries]},
                          indent=1, sort_keys=True).encode() + b"\n"
        try:
            _write_atomically(self.path, body)
        except OSError as exc:
            full = " (the disk is full)" if exc.errno == errno.ENOSPC else ""
            log.warning("cannot write the policy memory %s%s: %s; aegisd goes on with what it holds in memory, "
                        "and a restart before the next successful write starts from the older file",
                        self.path, full, exc.strerror or exc)
            return
        self._on_disk = entries

    def _unreadable(self, why: str) -> None:
        self._on_disk = _UNREADABLE
        log.warning("cannot use the policy memory %s: %s; whom a policy file that is invalid now restricted "
                    "cannot be told, so each one fails closed for every agent until it is valid again; the memory "
                    "is rebuilt from the policy files", self.path, why)


def _directory_key(directory: Path | str | None) -> str | None:
    """The policy directory as the memory knows it: its resolved path, so that a symlink to it, its real path
    and a relative name of it all find the same mapping."""
    if directory is None:
        return None
    try:
        return str(Path(directory).resolve())
    except (OSError, RuntimeError):  # a symlink loop: then only the very same path finds the mapping
        return str(Path(directory).absolute())


class NotRegular(ValueError):
    """What read_regular found in place of a regular file; `kind` says what ("a FIFO")."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"it is {kind}, not a regular file")
        self.kind = kind


class NotOwned(ValueError):
    """read_regular(owned=True) found a file another local user could change; the message says how."""


def read_regular(path: Path, limit: int, *, follow_symlinks: bool, owned: bool = False) -> bytes:
    """The first `limit` bytes of the regular file at `path`, never waiting on a FIFO or device in its place (an
    open for reading waits for a writer, which would hold up aegisd's start or a reload for ever): NotRegular for
    anything but a regular file (a symbolic link too, unless followed), OSError as open and read raise it.
    `owned`: also NotRegular for a file of another user than aegisd's or root, or one group or others may write
    (whoever can change it could change what aegisd does), judged on the file opened."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK) and not follow_symlinks and path.is_symlink():  # EMLINK: FreeBSD
            raise NotRegular("a symbolic link") from None
        raise
    try:
        info = os.fstat(fd)  # before fdopen, which refuses a directory with its own words
    except OSError:
        os.close(fd)
        raise
    mode = info.st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegular("a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else
                         "a device or socket")
    problem = owner_problem(info) if owned else None
    if problem is not None:
        os.close(fd)
        raise NotOwned(f"it {problem}, so another local user could change it: make it aegisd's user's or root's, "
                       "chmod go-w it, then `aegisctl policy reload`")
    with os.fdopen(fd, "rb") as fh:
        return fh.read(limit)


def _read(path: Path) -> bytes:
    """The memory file's first MAX_MEMORY_BYTES + 1 bytes, not through a symlink (whatever it points to is not the
    file aegisd writes): ValueError saying what is there instead, OSError (FileNotFoundError: nothing there)."""
    try:
        return read_regular(path, MAX_MEMORY_BYTES + 1, follow_symlinks=False)
    except NotRegular as exc:
        raise ValueError(f"it is {exc.kind}, not the regular file aegisd writes there") from None


def _decode(data: bytes) -> Entries:
    """The directories and mappings `data` holds, most recent first; ValueError (with what is wrong) for anything
    but what save writes now or wrote as version 1."""
    try:
        value: Any = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"it is not JSON ({exc})") from None
    except RecursionError:
        raise ValueError("it is nested too deeply to be what aegisd writes") from None
    version = value.get("version") if isinstance(value, dict) else None
    if version == 1:  # one mapping, for the one directory named (as configured then: resolved now)
        directory, files = value.get("policies_dir"), value.get("files")
        if not (directory is None or isinstance(directory, str)):
            raise ValueError("its policies_dir or files field has the wrong type")
        files = _files(files)
        key = _directory_key(directory)
        return ((key, str(directory), files),) if key is not None and files else ()
    if version != FORMAT_VERSION:
        raise ValueError(f"it is not a version {FORMAT_VERSION} (or 1) policy memory")
    directories = value.get("directories")
    if not isinstance(directories, list):
        raise ValueError("its directories field has the wrong type")
    entries: list[tuple[str, str, Remembered]] = []
    for item in directories:
        directory = item.get("policies_dir") if isinstance(item, dict) else None
        if not isinstance(directory, str) or not directory:
            raise ValueError("it holds a directory entry without a policies_dir")
        configured = item.get("configured", directory)  # written since a review found the symlink case
        if not isinstance(configured, str) or not configured:
            raise ValueError("it holds a directory entry whose configured path is not text")
        if directory in (name for name, _, _ in entries):
            raise ValueError(f"it holds two entries for the policy directory {directory!r}")
        entries.append((directory, configured, _files(item.get("files"))))
    return tuple(entries)


def _files(files: Any) -> Remembered:
    """One directory's mapping, checked; ValueError if it is not what save writes."""
    if not isinstance(files, dict):
        raise ValueError("its policies_dir or files field has the wrong type")
    for name, agent in files.items():
        if not name or "/" in name or not isinstance(agent, str):
            raise ValueError(f"it holds a bad entry for file {name!r}")
        if agent != UNKNOWN_AGENT and not AGENT_NAME.match(agent):
            raise ValueError(f"it holds a bad agent name for file {name!r}")
    return dict(files)


def _write_atomically(path: Path, body: bytes) -> None:
    """Write aside in the same directory, fsync, rename over `path` and fsync the directory: a crash leaves
    either the old file or the new one, never half of one."""
    staged = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(staged, path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    directory_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
