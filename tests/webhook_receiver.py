"""A real local webhook receiver for tests: aiohttp in its own thread, verifying every signature.

It keeps the exact bytes of every delivery and checks `X-Aegis-Signature` over them with the
secret the test hands it, the way a production receiver must. It can fail the first N attempts
(HTTP 503) or hold each answer until the test releases it, to play a broken or slow receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

HOLD_LIMIT_SECONDS = 30.0


@dataclass(frozen=True)
class Delivery:
    """One POST as received; `verified` says whether its signature matched the secret over the raw body."""

    headers: dict[str, str]
    body: bytes
    verified: bool
    status: int  # what the receiver answered

    @property
    def payload(self) -> dict[str, Any]:
        value = json.loads(self.body)
        assert isinstance(value, dict)
        return value

    @property
    def event(self) -> str:
        return self.headers.get("X-Aegis-Event", "")

    @property
    def delivery_id(self) -> str:
        return self.headers.get("X-Aegis-Delivery", "")


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Receiver:
    """POST /hook/... → 200 (or 503 for the first `fail_first` attempts, or held while `hold` is set)."""

    def __init__(self, fail_first: int = 0, hold: bool = False) -> None:
        self.fail_first = fail_first
        self.hold = hold
        self.secret = ""
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="webhook-receiver", daemon=True)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._seen: list[Delivery] = []
        self._attempts = 0
        self._release: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None

    def start(self) -> Receiver:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self.release()
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def url(self, path: str = "/hook/T0KEN-in-path") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def release(self) -> None:
        """Let held requests answer, and stop holding new ones."""
        self.hold = False
        if self._release is not None:
            self._loop.call_soon_threadsafe(self._release.set)

    @property
    def deliveries(self) -> list[Delivery]:
        with self._lock:
            return list(self._seen)

    @property
    def attempts(self) -> int:
        with self._lock:
            return self._attempts

    def of(self, event: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.event == event]

    def wait_for(self, count: int, event: str | None = None, timeout: float = 20.0) -> list[Delivery]:
        """Block until `count` deliveries (of `event`, if given) have arrived; fail after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [d for d in self._seen if event is None or d.event == event]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"expected {count} deliveries of {event or 'any event'}, got "
                                         f"{[d.event for d in self._seen]}")
                self._changed.wait(remaining)

    async def _start(self) -> None:
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.hold and self._release is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), HOLD_LIMIT_SECONDS)
        with self._changed:
            self._attempts += 1
            status = 503 if self._attempts <= self.fail_first else 200
            verified = bool(self.secret) and hmac.compare_digest(  # bytes: a str holding non-ASCII would raise
                request.headers.get("X-Aegis-Signature", "").encode("utf-8", "surrogatepass"),
                sign(self.secret, body).encode())
            self._seen.append(Delivery(dict(request.headers), body, verified, status))
            self._changed.notify_all()
        return web.Response(status=status, text="ok" if status == 200 else "try again")
