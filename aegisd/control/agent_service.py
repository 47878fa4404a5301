"""aegis.v1.AgentService: agent identities and grants. A token leaves only in Add and Regenerate."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from aegisd.agents import Agent
from aegisd.api.aegis.v1 import agents_pb2 as pb
from aegisd.api.aegis.v1 import agents_pb2_grpc
from aegisd.cancellation import to_thread_to_the_end
from aegisd.control.convert import INTEGRITY_TO_PB, timestamp
from aegisd.control.errors import rpc
from aegisd.runtime import Runtime
from aegisd.vault.credentials import check_lookup

Ctx = grpc.aio.ServicerContext[Any, Any]


def agent_to_pb(agent: Agent) -> pb.Agent:
    """The API view of an agent; it has no field a token or token hash could go into."""
    return pb.Agent(id=agent.id, name=agent.name, created_at=timestamp(agent.created_at),
                    rotated_at=timestamp(agent.rotated_at), rate_limit=agent.rate_limit,
                    credentials=agent.credentials, integrity=INTEGRITY_TO_PB[agent.integrity],
                    ignored_grants=agent.ignored_grants)


def _check_pair(agent: str, credential: str) -> None:
    """A grant's two names, before they are looked up (check_lookup)."""
    check_lookup(agent, "agent name")
    check_lookup(credential, "credential name")


class AgentService(agents_pb2_grpc.AgentServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    @rpc
    async def AddAgent(self, request: pb.AddAgentRequest, context: Ctx) -> pb.AddAgentResponse:
        agent, token = await to_thread_to_the_end(self.rt.agents.add, request.name)
        self.rt.log_event("agent added", agent=agent.name)
        return pb.AddAgentResponse(agent=agent_to_pb(agent), token=token)

    @rpc
    async def ListAgents(self, request: pb.ListAgentsRequest, context: Ctx) -> pb.ListAgentsResponse:
        agents = await asyncio.to_thread(self.rt.agents.list)
        return pb.ListAgentsResponse(agents=[agent_to_pb(a) for a in agents])

    @rpc
    async def GetAgent(self, request: pb.GetAgentRequest, context: Ctx) -> pb.Agent:
        return agent_to_pb(await asyncio.to_thread(self.rt.agents.get, check_lookup(request.name, "agent name")))

    @rpc
    async def RemoveAgent(self, request: pb.RemoveAgentRequest, context: Ctx) -> pb.RemoveAgentResponse:
        check_lookup(request.name, "agent id" if request.by_id else "agent name")
        grants = await to_thread_to_the_end(self.rt.agents.remove, request.name, request.by_id)
        if request.by_id:
            self.rt.log_event("agent row removed", id=request.name, grants_removed=grants)
        else:
            self.rt.log_event("agent removed", agent=request.name, grants_removed=grants)
        return pb.RemoveAgentResponse(grants_removed=grants)

    @rpc
    async def RegenerateToken(self, request: pb.RegenerateTokenRequest, context: Ctx
                              ) -> pb.RegenerateTokenResponse:
        agent, token = await to_thread_to_the_end(self.rt.agents.regenerate, check_lookup(request.name, "agent name"))
        self.rt.log_event("agent token regenerated", agent=request.name)
        return pb.RegenerateTokenResponse(agent=agent_to_pb(agent), token=token)

    @rpc
    async def Grant(self, request: pb.GrantRequest, context: Ctx) -> pb.GrantResponse:
        _check_pair(request.agent, request.credential)
        created = await to_thread_to_the_end(self.rt.agents.grant, request.agent, request.credential)
        if created:
            self.rt.log_event("credential granted", agent=request.agent, credential=request.credential)
        agent = await asyncio.to_thread(self.rt.agents.get, request.agent)
        return pb.GrantResponse(agent=agent_to_pb(agent), created=created)

    @rpc
    async def SetRateLimit(self, request: pb.SetAgentRateLimitRequest, context: Ctx
                           ) -> pb.SetAgentRateLimitResponse:
        agent = await to_thread_to_the_end(self.rt.agents.set_rate_limit, check_lookup(request.name, "agent name"),
                                           request.rate_limit)
        self.rt.log_event("agent rate limit set", agent=agent.name, rate_limit=agent.rate_limit or "none")
        return pb.SetAgentRateLimitResponse(agent=agent_to_pb(agent))

    @rpc
    async def Revoke(self, request: pb.RevokeRequest, context: Ctx) -> pb.RevokeResponse:
        _check_pair(request.agent, request.credential)
        await to_thread_to_the_end(self.rt.agents.revoke, request.agent, request.credential)
        self.rt.log_event("grant revoked", agent=request.agent, credential=request.credential)
        agent = await asyncio.to_thread(self.rt.agents.get, request.agent)
        return pb.RevokeResponse(agent=agent_to_pb(agent))
