"""Talk to the service manager through systemd-python: READY, STATUS, STOPPING, WATCHDOG.

A no-op unless systemd started us (NOTIFY_SOCKET set). If it did and systemd-python is
missing, say so loudly: systemd would otherwise time the start out without a reason.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

log = logging.getLogger("aegisd")


def _load_notify() -> Callable[[str], bool] | None:
    if not os.environ.get("NOTIFY_SOCKET"):
        return None
    try:
        from systemd import daemon
    except ImportError:
        log.error("NOTIFY_SOCKET is set but systemd-python is missing; install 'aegis[systemd]'")
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
