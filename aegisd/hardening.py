"""Keep key material out of core dumps and away from same-user debuggers."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource
import sys

log = logging.getLogger("aegisd")
PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def harden_process() -> None:
    """No core files, and (on Linux) not dumpable: /proc/PID/mem and ptrace refused to peers."""
    os.umask(0o077)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            log.warning("could not mark the process non-dumpable: %s", os.strerror(ctypes.get_errno()))


def is_dumpable() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return bool(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
