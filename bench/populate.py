"""Add many credentials, agents and grants fast, straight over the control socket's gRPC API.

aegisctl would start a Python process per call (~0.3 s each); the same RPCs from one channel take
milliseconds. Each agent gets its own credential, so the gate's tables grow in every dimension.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import grpc

from aegisd.api.aegis.v1 import agents_pb2, agents_pb2_grpc, credentials_pb2, credentials_pb2_grpc


def populate(socket_path: Path, count: int, prefix: str = "pop") -> dict[str, float]:
    """Create `count` credentials, `count` agents and one grant each; returns timings in seconds."""
    timings: dict[str, float] = {}
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        creds = credentials_pb2_grpc.CredentialServiceStub(channel)
        agents = agents_pb2_grpc.AgentServiceStub(channel)
        started = time.perf_counter()
        for i in range(count):
            creds.AddCredential(credentials_pb2.AddCredentialRequest(
                name=f"{prefix}-cred-{i:05d}", service=f"{prefix}{i:05d}", domains=[f"api{i}.example.com"],
                auth_type=credentials_pb2.AUTH_TYPE_BEARER, scopes=["*"],
                body_inspection=credentials_pb2.BODY_INSPECTION_BLOCK, secret=secrets.token_urlsafe(32)),
                timeout=60)
        timings["credentials_s"] = time.perf_counter() - started
        started = time.perf_counter()
        for i in range(count):
            agents.AddAgent(agents_pb2.AddAgentRequest(name=f"{prefix}-agent-{i:05d}"), timeout=60)
        timings["agents_s"] = time.perf_counter() - started
        started = time.perf_counter()
        for i in range(count):
            agents.Grant(agents_pb2.GrantRequest(agent=f"{prefix}-agent-{i:05d}", credential=f"{prefix}-cred-{i:05d}"),
                         timeout=60)
        timings["grants_s"] = time.perf_counter() - started
    return timings
