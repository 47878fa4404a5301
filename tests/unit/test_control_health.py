"""The control socket's health watches: a stop always reaches a watch as NOT_SERVING before it ends."""

from __future__ import annotations

import asyncio
from typing import Any

from grpc_health.v1 import health_pb2

from aegisd.control.health import NOT_SERVING, SERVING, ControlHealth


class StopDuringFirstWrite:
    """A servicer context whose first write lets the stop begin before the write returns, as a loaded loop can."""

    def __init__(self, health: ControlHealth) -> None:
        self.health = health
        self.sent: list[Any] = []

    async def write(self, reply: health_pb2.HealthCheckResponse) -> None:
        self.sent.append(reply.status)
        if len(self.sent) == 1:
            self.health.stop()
        await asyncio.sleep(0)


def test_a_stop_that_begins_during_a_write_is_still_reported() -> None:
    """Seen in two CI runs of the 28th stop: a watch ended after SERVING with no NOT_SERVING."""

    async def watch() -> list[Any]:
        health = ControlHealth()
        health.set("", SERVING)
        context = StopDuringFirstWrite(health)
        await asyncio.wait_for(health.Watch(health_pb2.HealthCheckRequest(service=""), context), 5)  # type: ignore[arg-type]
        return context.sent

    assert asyncio.run(watch()) == [SERVING, NOT_SERVING]


def test_a_watch_started_after_the_stop_says_not_serving_and_ends() -> None:
    async def watch() -> list[Any]:
        health = ControlHealth()
        health.set("", SERVING)
        health.stop()
        context = StopDuringFirstWrite(health)
        await asyncio.wait_for(health.Watch(health_pb2.HealthCheckRequest(service=""), context), 5)  # type: ignore[arg-type]
        return context.sent

    assert asyncio.run(watch()) == [NOT_SERVING]
