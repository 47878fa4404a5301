"""The gRPC server on the control socket, with the standard health service beside ours."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2_grpc

from aegisd.api import listen_target
from aegisd.api.aegis.v1 import (
    agents_pb2_grpc,
    backup_pb2_grpc,
    credentials_pb2_grpc,
    doctor_pb2_grpc,
    ledger_pb2_grpc,
    policy_pb2_grpc,
    vault_pb2_grpc,
    webhooks_pb2_grpc,
)
from aegisd.control.agent_service import AgentService
from aegisd.control.backup_service import BackupService
from aegisd.control.credential_service import CredentialService
from aegisd.control.doctor_service import DoctorService
from aegisd.control.errors import RequestDecoding
from aegisd.control.health import SERVING, ControlHealth
from aegisd.control.ledger_service import LedgerService
from aegisd.control.policy_service import PolicyService
from aegisd.control.socket import ControlSocket, SocketError, group_reach_problem
from aegisd.control.vault_service import VaultService
from aegisd.control.webhook_service import WebhookService
from aegisd.runtime import Runtime

log = logging.getLogger("aegisd.control")

SERVICE_NAMES = ("aegis.v1.VaultService", "aegis.v1.CredentialService", "aegis.v1.AgentService",
                 "aegis.v1.LedgerService", "aegis.v1.WebhookService", "aegis.v1.PolicyService",
                 "aegis.v1.DoctorService", "aegis.v1.BackupService")


class ControlServer:
    """Binds the socket with its permissions in place before the first connection."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.socket = ControlSocket(runtime.config.socket_path, runtime.config.socket_mode,
                                    runtime.config.socket_group)
        self.health = ControlHealth()
        # RequestDecoding: a request that is not protobuf (or not UTF-8 where it must be): INVALID_ARGUMENT
        self._server = grpc.aio.server(interceptors=[RequestDecoding()], options=[("grpc.so_reuseport", 0)])
        vault_pb2_grpc.add_VaultServiceServicer_to_server(VaultService(runtime), self._server)
        credentials_pb2_grpc.add_CredentialServiceServicer_to_server(CredentialService(runtime), self._server)
        agents_pb2_grpc.add_AgentServiceServicer_to_server(AgentService(runtime), self._server)
        ledger_pb2_grpc.add_LedgerServiceServicer_to_server(LedgerService(runtime), self._server)
        webhooks_pb2_grpc.add_WebhookServiceServicer_to_server(WebhookService(runtime), self._server)
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(PolicyService(runtime), self._server)
        doctor_pb2_grpc.add_DoctorServiceServicer_to_server(DoctorService(runtime), self._server)
        backup_pb2_grpc.add_BackupServiceServicer_to_server(BackupService(runtime), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)

    async def start(self) -> None:
        self.socket.prepare()
        try:
            self._server.add_insecure_port(listen_target(self.socket.path))
        except RuntimeError as exc:
            self.socket.release()
            raise SocketError(f"cannot listen on {self.socket.path}: {exc}") from None
        await self._server.start()
        try:
            self.socket.secure()
        except SocketError:  # not served with the wrong permissions: stop grpc and remove the socket it bound
            await self._server.stop(0)
            self.socket.release()
            raise
        config = self.rt.config
        if config.socket_group:  # served anyway: aegisd's user can use it; the log says why the group cannot
            unreachable = group_reach_problem(config.socket_path, config.socket_group, config.data_dir)
            if unreachable:
                log.warning("control: %s. Fix: %s", *unreachable)
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, SERVING)

    async def stop(self, grace: float) -> None:
        """Finish calls for up to `grace` seconds, then end the rest.

        grpc ends the calls still running after the grace, but its stop then waits for each connection to
        close, and a client that stopped reading a stream (a paused `ledger export`, ^Z) leaves the socket's
        buffer full, so not even the GOAWAY gets out and the stop (and aegisd's exit) waits for that client.
        Such connections are shut down here, from our side, once the grace and a moment more have passed."""
        self.health.stop()
        stopping = asyncio.ensure_future(self._server.stop(grace))
        done, _ = await asyncio.wait([stopping], timeout=grace + STALLED_AFTER_GRACE)
        if not done:
            cut = await asyncio.to_thread(shut_down_connections, self.socket.path)
            log.warning("control: %d client %s stopped reading and held up the stop; closed",
                        cut, "connection" if cut == 1 else "connections")
            try:
                await asyncio.wait_for(stopping, STALLED_AFTER_GRACE)
            except TimeoutError:
                log.error("control: the gRPC server did not stop; exiting without it")
        self.socket.release()


STALLED_AFTER_GRACE = 1.0  # seconds after the grace, when grpc has ended every call, that a connection may take


def shut_down_connections(path: Path) -> int:
    """Shut down (both ways) every connection accepted on the Unix socket at `path` that this process holds;
    how many. Found by their local address, so the listening socket and every other descriptor are left alone.
    A write blocked on a full buffer then fails, and grpc closes its side."""
    cut = 0
    for fd in _open_descriptors():
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:  # not a socket, or already closed
            continue
        with sock:
            try:
                if (sock.family != socket.AF_UNIX or sock.getsockname() != str(path)
                        or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
                    continue
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                continue
            cut += 1
    return cut


def _open_descriptors() -> list[int]:
    for listing in ("/proc/self/fd", "/dev/fd"):
        try:
            return sorted(int(name) for name in os.listdir(listing) if name.isdigit())
        except OSError:
            continue
    return []
