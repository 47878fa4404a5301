"""credential_expiry events: from the periodic check (hourly, at unlock and when credentials
change) and from requests refused as credential_expired, at most once per credential, state
and UTC day, so a busy agent hitting an expired key does not flood the receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import Any

from aegisd.errors import log_safe
from aegisd.ledger.entry import iso_time, now_ms
from aegisd.vault.sealing import OK
from aegisd.vault.vault import Vault
from aegisd.webhooks.dispatcher import Dispatcher

log = logging.getLogger("aegisd.webhooks")
EXPIRING_SOON_MS = 7 * 86400 * 1000
CHECK_INTERVAL_SECONDS = 3600.0
EVENT = "credential_expiry"


def expiry_state(expires_at: int | None, now: int) -> str:
    """active, expiring_soon (within 7 days) or expired: shared with the metrics."""
    if expires_at is None or expires_at > now + EXPIRING_SOON_MS:
        return "active"
    return "expired" if expires_at <= now else "expiring_soon"


class ExpiryWatch:
    """Finds expired and soon-expiring credentials and raises one event per credential, state and day."""

    def __init__(self, vault: Vault, dispatcher: Dispatcher, interval: float = CHECK_INTERVAL_SECONDS) -> None:
        self._vault = vault
        self._dispatcher = dispatcher
        self._interval = interval
        self._sent: set[tuple[str, str, str]] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="aegis-expiry-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def check_soon(self) -> None:
        """Ask for a check now; safe from any thread (vault listeners run in worker threads)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake.set)

    def on_refused(self, details: dict[str, Any], credential: str, service: str, expires_at: int | None) -> None:
        """A request was refused as credential_expired: raise the event unless it went out today."""
        if self._dispatcher.wants(EVENT):
            self._raise(credential, service, expires_at, "expired", details)

    async def _run(self) -> None:
        while True:
            if self._dispatcher.wants(EVENT) and self._vault.state == "unlocked":
                try:
                    await self._check()
                except Exception as exc:  # one bad check must not end the watch
                    log.warning("credential expiry check failed: %s", log_safe(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()

    async def _check(self) -> None:
        checks = await asyncio.to_thread(self._vault.checked_credentials)
        now = now_ms()
        for check in checks:  # only what authenticates: an edited expiry must neither raise nor hide an alert
            cred = check.credential
            state = expiry_state(cred.expires_at, now) if check.status == OK else "active"
            if state != "active":
                self._raise(cred.name, cred.service, cred.expires_at, state, {})

    def _raise(self, credential: str, service: str, expires_at: int | None, state: str,
               extra: dict[str, Any]) -> None:
        day = datetime.fromtimestamp(time.time(), UTC).strftime("%Y-%m-%d")
        key = (credential, state, day)
        if key in self._sent:
            return
        self._sent = {k for k in self._sent if k[2] == day}
        self._sent.add(key)
        details: dict[str, Any] = {**extra, "credential": credential, "service": service, "state": state,
                                   "expires_at": iso_time(expires_at) if expires_at is not None else None}
        self._dispatcher.emit(EVENT, details)
