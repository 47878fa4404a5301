"""The gate's listener: accepts agent connections (up to a cap), ends the ones that keep the gate waiting,
drains on stop."""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time

from aegisd.gate.agent_connection import LINGER_SECONDS, AgentConnection, AgentConnections
from aegisd.gate.pipeline import GatePipeline

log = logging.getLogger("aegisd.gate")


class GateError(Exception):
    """The gate cannot listen; the message says where and why."""


# Open files the daemon keeps for all but agent connections and their upstream ones: the control
# socket and its clients, the ledger and vault files, webhook deliveries.
DESCRIPTOR_RESERVE = 256


class GateServer:
    def __init__(self, pipeline: GatePipeline, host: str, port: int, connections: AgentConnections) -> None:
        self.pipeline = pipeline
        self.host = host
        self.port = port
        # An agent that keeps the gate waiting this long (for a request's head or body, for reading its
        # answer, or for a close) is cut off.
        self.idle_timeout = pipeline.config.read_timeout
        self.connections = connections
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.connections.most is not None:
            raise_descriptor_limit(2 * self.connections.most + DESCRIPTOR_RESERVE)
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: AgentConnection(self.pipeline, self.connections), self.host, self.port,
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
            for conn in list(self.connections.open):
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
        for conn in list(self.connections.open):
            conn.end()
        tasks = list(self.connections.tasks)  # of closed connections too: a handler can outlive its agent
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Closes still sending a finished answer get what is left of the grace (at least LINGER_SECONDS).
        flush_until = max(deadline, time.monotonic() + LINGER_SECONDS)
        while self.connections.open and time.monotonic() < flush_until:
            await asyncio.sleep(0.02)
        for conn in list(self.connections.open):  # an agent that does not read what it was sent
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        self.pipeline.stopped()  # the flood summary a stop right after a flood would lose: the ledger closes next


def raise_descriptor_limit(wanted: int) -> None:
    """Raise the soft limit on open files towards `wanted` (up to the hard limit): every agent connection
    can need an upstream connection too. Warns when the hard limit leaves less than that."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning("the open-file limit (%d) is below the %d that [gate] max_connections needs; lower "
                    "max_connections or raise the limit (LimitNOFILE= for systemd, ulimit -n)", soft, wanted)
