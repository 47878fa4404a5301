"""The standard gRPC health service on the control socket, whose watches end when aegisd stops.

grpc's own asyncio servicer keeps a `Watch` open after it reports NOT_SERVING, so one open watch held every
stop for the control server's whole grace. Here a watch sends NOT_SERVING and then ends, as `ledger follow` does.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

Status: TypeAlias = health_pb2.HealthCheckResponse.ServingStatus
Ctx = grpc.aio.ServicerContext[Any, Any]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class ControlHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # grpc_health ships no stubs
    """Check and Watch for the services aegisd serves; every one reads NOT_SERVING once the stop begins."""

    def __init__(self) -> None:
        self._status: dict[str, Status] = {}
        self._changed = asyncio.Event()
        self._stopping = False

    def set(self, service: str, status: Status) -> None:
        """Record `service`'s status and wake the watches; ignored once the stop has begun."""
        if not self._stopping:
            self._status[service] = status
            self._wake()

    def stop(self) -> None:
        """Report every service NOT_SERVING for good, and end the watches once they have said so."""
        self._stopping = True
        self._status = dict.fromkeys(self._status, NOT_SERVING)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Ctx) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no service named {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Ctx) -> None:
        sent: Status | None = None
        while True:
            changed = self._changed
            status = self._status.get(request.service, SERVICE_UNKNOWN)
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
                continue  # the stop may have begun during the write: look again before ending
            if self._stopping:
                return
            await changed.wait()
