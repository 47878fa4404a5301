"""The gate's listener: accepts agent connections, ends the ones that keep the gate waiting, drains on stop."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from aegisd.gate.agent_connection import LINGER_SECONDS, AgentConnection
from aegisd.gate.pipeline import GatePipeline

log = logging.getLogger("aegisd.gate")


class GateError(Exception):
    """The gate cannot listen; the message says where and why."""


class GateServer:
    def __init__(self, pipeline: GatePipeline, host: str, port: int) -> None:
        self.pipeline = pipeline
        self.host = host
        self.port = port
        # An agent that keeps the gate waiting this long (for a request's head or body, for reading its
        # answer, or for a close) is cut off.
        self.idle_timeout = pipeline.config.read_timeout
        self._connections: set[AgentConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # each connection's serving task, until it ends
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: AgentConnection(self.pipeline, self._connections, self._tasks), self.host, self.port,
                family=socket.AF_INET6 if ":" in self.host else socket.AF_INET, reuse_address=True, backlog=1024)
        except OSError as exc:
            raise GateError(f"cannot listen on {self.host}:{self.port} for the gate: {exc.strerror}; "
                            "choose another --gate-listen") from None
        self._sweeper = loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        """End connections on which the gate has waited for the agent longer than `idle_timeout`: an idle
        one is closed, anything else (a stalled body, an unread answer, a close that stalls) dropped."""
        interval = min(5.0, max(0.05, self.idle_timeout / 4))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for conn in list(self._connections):
                try:
                    if conn.idle_for(now) > self.idle_timeout:
                        conn.end()
                except Exception as exc:  # one connection's trouble must not end the sweep for all
                    log.error("the gate's idle sweep failed on a connection: %s", type(exc).__name__)

    async def stop(self, grace: float) -> None:
        """Stop accepting, answer 503 to new requests on open connections, let in-flight ones finish;
        after `grace`, end what is left (each cut request still gets its ledger row)."""
        self.pipeline.draining = True
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + grace
        while self.pipeline.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self._connections):
            conn.end()
        tasks = list(self._tasks)  # of closed connections too: a handler can outlive its agent
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Closes still sending a finished answer get what is left of the grace (at least LINGER_SECONDS).
        flush_until = max(deadline, time.monotonic() + LINGER_SECONDS)
        while self._connections and time.monotonic() < flush_until:
            await asyncio.sleep(0.02)
        for conn in list(self._connections):  # an agent that does not read what it was sent
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
