"""Which local accounts are a service's: aegisctl trusts another user's socket directory only if a system account
owns it, and aegisd, run with a socket group, warns when it runs as a login user, whose socket aegisctl refuses.
Also how both name an account in a message."""

from __future__ import annotations

import grp
import os
import pwd
import stat
import sys
from pathlib import Path

LOGIN_DEFS = Path("/etc/login.defs")
DYNAMIC_UIDS = range(61184, 65520)  # systemd's DynamicUser= uids (systemd.exec(5))


def system_account(uid: int) -> bool:
    """A uid that no one logs in as: below UID_MIN (where useradd starts login users), or one systemd hands out
    to a DynamicUser= service for as long as it runs."""
    return uid < uid_min() or uid in DYNAMIC_UIDS


def uid_min() -> int:
    """The first uid of login users: UID_MIN in /etc/login.defs, else the platform's (1000; 501 on macOS, whose
    system accounts are below it)."""
    default = 501 if sys.platform == "darwin" else 1000
    try:
        with open(LOGIN_DEFS, "rb") as fh:
            text = fh.read(1 << 16).decode("utf-8", "replace")
    except OSError:
        return default
    found = default
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "UID_MIN" and words[1].isdigit():
            found = int(words[1])
    return found


def user_name(uid: int) -> str:
    """The user's name as `chown` takes it, else the uid (a dynamic user may have no entry)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    """The group's name, else the gid."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def owner_problem(info: os.stat_result, *, sticky_ok: bool = False) -> str | None:
    """Why another local user could change what is at `info` (None if no one but this process's user and root can),
    to follow the thing's name: its owner, or write access for group or others (for a directory, unless `sticky_ok`
    and it is sticky). One rule for the config file and the policy files and directories."""
    if info.st_uid not in (os.geteuid(), 0):
        return f"belongs to uid {info.st_uid}, not to aegisd's user (uid {os.geteuid()}) or root"
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022 and not (sticky_ok and mode & stat.S_ISVTX):
        return f"is writable by group or others (mode {mode:04o})"
    return None
