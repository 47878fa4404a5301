"""credential_expiry events: from the periodic check (hourly, at unlock, when credentials change
and when a webhook is added) and from requests refused as credential_expired, at most once per
webhook, credential, state and UTC day, so a busy agent hitting an expired key does not flood the
receiver. Once means delivered: an alert counts as sent to a webhook only when its receiver
answered 2xx, so one lost (receiver down, queue full, attempts used up) is raised again by the
next check; and while one is on its way (queued, being sent, waiting for a retry) no other for
the same webhook, credential and state is raised, so a failing receiver never piles them up.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
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
Alert = tuple[str, str, str]  # credential, state, UTC day
SENT, PENDING, FAILED = "sent", "pending", "failed"  # what became of an alert to one webhook


def expiry_state(expires_at: int | None, now: int) -> str:
    """active, expiring_soon (within 7 days) or expired: shared with the metrics."""
    if expires_at is None or expires_at > now + EXPIRING_SOON_MS:
        return "active"
    return "expired" if expires_at <= now else "expiring_soon"


class ExpiryWatch:
    """Finds expired and soon-expiring credentials and raises one event per webhook, credential, state and day."""

    def __init__(self, vault: Vault, dispatcher: Dispatcher, interval: float = CHECK_INTERVAL_SECONDS) -> None:
        self._vault = vault
        self._dispatcher = dispatcher
        self._interval = interval
        # By (alert, webhook id), today's only: SENT (delivered), PENDING (on its way) or FAILED (raised again only by
        # a check, never by a refused request: a receiver that keeps failing must not get one alert per refusal).
        # Touched only from the event loop (checks, the gate's refusals, the dispatcher's callbacks).
        self._alerts: dict[tuple[Alert, str], str] = {}
        self._day = ""
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
            self._raise(credential, service, expires_at, "expired", details, retry_failed=False)

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
                self._raise(cred.name, cred.service, cred.expires_at, state, {}, retry_failed=True)

    def _raise(self, credential: str, service: str, expires_at: int | None, state: str,
               extra: dict[str, Any], *, retry_failed: bool) -> None:
        """Emit the alert to each subscribed webhook that has neither received it today nor has it on its way
        (a webhook added since); and, for a check (`retry_failed`), to those whose delivery of it failed."""
        day = datetime.fromtimestamp(time.time(), UTC).strftime("%Y-%m-%d")
        if day != self._day:  # yesterday's keys can never match again: forget them
            self._day, self._alerts = day, {}
        alert = (credential, state, day)
        raisable = (None, FAILED) if retry_failed else (None,)
        hooks = [hook for hook in self._dispatcher.subscribers(EVENT) if self._alerts.get((alert, hook)) in raisable]
        if not hooks:
            return
        self._alerts.update(((alert, hook), PENDING) for hook in hooks)  # before emit: a drop calls back at once
        details: dict[str, Any] = {**extra, "credential": credential, "service": service, "state": state,
                                   "expires_at": iso_time(expires_at) if expires_at is not None else None}
        self._dispatcher.emit(EVENT, details, only=frozenset(hooks), on_done=functools.partial(self._done, alert))

    def _done(self, alert: Alert, hook: str, delivered: bool) -> None:
        """A delivery of `alert` to webhook `hook` is done with: sent for today if the receiver took it, else raised
        again by the next check (hourly, at unlock, when credentials change or a webhook is added)."""
        if alert[2] == self._day:
            self._alerts[(alert, hook)] = SENT if delivered else FAILED
