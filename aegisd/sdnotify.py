"""Talk to the service manager through systemd-python: READY, STATUS, STOPPING, WATCHDOG.

A no-op unless systemd started us (NOTIFY_SOCKET set). If it did and systemd-python is missing,
aegisd could never say READY=1: a Type=notify unit would time the start out and restart it in a
loop. `require_notify()` is called first thing at start, so aegisd exits at once with the fix.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable

log = logging.getLogger("aegisd")

# Names the interpreter aegisd runs on: the extra must go into that environment (a venv, usually).
MISSING = ("NOTIFY_SOCKET is set (systemd started aegisd as a Type=notify service) but systemd-python, which "
           "aegisd needs to report that it is ready, cannot be imported, so the start would time out; install "
           f"the 'systemd' extra into aegisd's environment: {sys.executable} -m pip install 'aegis[systemd]' "
           "(or '.[systemd]' in a checkout); see packaging/README.md")


class NotifyUnavailable(Exception):
    """systemd waits for READY=1 and aegisd has no way to send it."""


def require_notify() -> None:
    """Refuse to start under a service manager that waits for READY=1 that could never be sent."""
    if os.environ.get("NOTIFY_SOCKET"):
        try:
            from systemd import daemon  # noqa: F401
        except ImportError:
            raise NotifyUnavailable(MISSING) from None


def _load_notify() -> Callable[[str], bool] | None:
    if not os.environ.get("NOTIFY_SOCKET"):
        return None
    try:
        from systemd import daemon
    except ImportError:  # the command line checked this at start (require_notify); kept for other callers
        log.error("%s", MISSING)
        return None

    def send(state: str) -> bool:
        return bool(daemon.notify(state))

    return send


class ServiceManager:
    """The readiness and liveness protocol; every method is safe to call outside systemd."""

    def __init__(self) -> None:
        self._notify = _load_notify()
        self._watchdog: asyncio.Task[None] | None = None

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def reloading(self) -> None:
        self._send("RELOADING=1")

    def reloaded(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")

    def stopping(self) -> None:
        self._send("STOPPING=1\nSTATUS=stopping")
        if self._watchdog is not None:
            self._watchdog.cancel()

    def start_watchdog(self) -> None:
        """Ping at half the interval from the event loop, so a wedged loop gets restarted."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if self._notify is None or not usec or (pid and int(pid) != os.getpid()):
            return
        self._watchdog = asyncio.get_running_loop().create_task(self._ping(int(usec) / 2e6))

    async def _ping(self, every: float) -> None:
        while True:
            self._send("WATCHDOG=1")
            await asyncio.sleep(every)

    def _send(self, state: str) -> None:
        if self._notify is not None:
            self._notify(state)
