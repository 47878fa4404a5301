"""What each policy file's last valid version named, kept in aegisd's data directory across restarts.

An invalid file fails closed for the agent its last valid version named (docs/policies.md, "Invalid files
fail closed"); were that remembered in memory only, a file broken while aegisd was stopped, or before a
restart, would free the agent it restricted. The file is JSON, private (0600) and replaced atomically,
and it records the policy directory it belongs to: the memory of another directory's namesake file is
never applied.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from aegisd.vault.credentials import NAME as AGENT_NAME

log = logging.getLogger("aegisd.policy")
MEMORY_FILE = "policy-memory.json"
MAX_MEMORY_BYTES = 1 << 20  # thousands of times what any real policy directory needs
FORMAT_VERSION = 1
# The agent recorded for a file whose last valid agent cannot be told (the memory could not be read while the
# file was invalid): the file fails closed for every agent until it is valid again.
UNKNOWN_AGENT = ""

Remembered = dict[str, str]  # policy file name -> the agent its last valid version named, or UNKNOWN_AGENT


class _Absent:
    """No memory file: an empty memory that needs no file written for it."""


class _Unreadable:
    """A memory file that could not be read: replaced at the next save, whatever the mapping."""


_ABSENT, _UNREADABLE = _Absent(), _Unreadable()


class PolicyMemory:
    """The remembered mapping on disk at `path`, for one policy directory at a time.

    Writing happens only when the mapping (or the directory it belongs to) differs from what the file
    holds; a failed write is logged and the caller keeps its in-memory mapping, so a full or read-only
    disk never stops a reload.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._on_disk: tuple[str | None, Remembered] | _Absent | _Unreadable = _ABSENT

    def load(self, directory: Path | None) -> Remembered | None:
        """The mapping remembered for `directory`: empty without a file or when the file is another directory's;
        None when the file cannot be read, so that whom an invalid file restricted cannot be told."""
        try:
            with self.path.open("rb") as fh:
                data = fh.read(MAX_MEMORY_BYTES + 1)
        except FileNotFoundError:
            self._on_disk = _ABSENT
            return {}
        except OSError as exc:
            self._unreadable(f"cannot read it: {exc.strerror or exc}")
            return None
        if len(data) > MAX_MEMORY_BYTES:
            self._unreadable(f"it is larger than {MAX_MEMORY_BYTES} bytes")
            return None
        try:
            stored_directory, remembered = _decode(data)
        except ValueError as exc:
            self._unreadable(str(exc))
            return None
        self._on_disk = (stored_directory, remembered)
        if stored_directory != _directory_key(directory):
            return {}
        return dict(remembered)

    def save(self, directory: Path | None, remembered: Remembered) -> None:
        """Persist `remembered` for `directory` if the file holds anything else; log a failure, never raise."""
        state = (_directory_key(directory), dict(remembered))
        if state == self._on_disk or (self._on_disk is _ABSENT and not remembered):
            return
        body = json.dumps({"version": FORMAT_VERSION, "policies_dir": state[0], "files": state[1]}, indent=1,
                          sort_keys=True).encode() + b"\n"
        try:
            _write_atomically(self.path, body)
        except OSError as exc:
            full = " (the disk is full)" if exc.errno == errno.ENOSPC else ""
            log.warning("cannot write the policy memory %s%s: %s; aegisd goes on with what it holds in memory, "
                        "and a restart before the next successful write starts from the older file",
                        self.path, full, exc.strerror or exc)
            return
        self._on_disk = state

    def _unreadable(self, why: str) -> None:
        self._on_disk = _UNREADABLE
        log.warning("cannot use the policy memory %s: %s; whom a policy file that is invalid now restricted "
                    "cannot be told, so each one fails closed for every agent until it is valid again; the memory "
                    "is rebuilt from the policy files", self.path, why)


def _directory_key(directory: Path | None) -> str | None:
    return None if directory is None else str(directory)


def _decode(data: bytes) -> tuple[str | None, Remembered]:
    """The directory and mapping `data` holds; ValueError (with what is wrong) for anything but what save wrote."""
    try:
        value: Any = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"it is not JSON ({exc})") from None
    if not isinstance(value, dict) or value.get("version") != FORMAT_VERSION:
        raise ValueError(f"it is not a version {FORMAT_VERSION} policy memory")
    directory, files = value.get("policies_dir"), value.get("files")
    if not (directory is None or isinstance(directory, str)) or not isinstance(files, dict):
        raise ValueError("its policies_dir or files field has the wrong type")
    for name, agent in files.items():
        if not name or "/" in name or not isinstance(agent, str):
            raise ValueError(f"it holds a bad entry for file {name!r}")
        if agent != UNKNOWN_AGENT and not AGENT_NAME.match(agent):
            raise ValueError(f"it holds a bad agent name for file {name!r}")
    return directory, files


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
