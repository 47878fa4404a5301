"""aegis.v1.PolicyService: validate, list, test and reload the policy files the gate applies."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import unquote

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from aegisd.api.aegis.v1 import policy_pb2 as pb
from aegisd.api.aegis.v1 import policy_pb2_grpc
from aegisd.control.convert import timestamp
from aegisd.control.errors import rpc
from aegisd.errors import InvalidArgument
from aegisd.policy import Issue, PolicyFile, Snapshot, compile_set, parse_policy
from aegisd.policy.hints import KnownNames, file_warnings, known_names, unknown_agent, unknown_service
from aegisd.policy.model import JUDGED_FROM_MS, JUDGED_UNTIL_MS, METHODS
from aegisd.policy.policy_set import INVALID
from aegisd.runtime import Runtime

Ctx = grpc.aio.ServicerContext[Any, Any]


def _issue(i: Issue) -> pb.PolicyIssue:
    return pb.PolicyIssue(file=i.file, line=i.line, column=i.column, field=i.field, message=i.message)


def file_to_pb(policy_file: PolicyFile, known: KnownNames | None = None) -> pb.PolicyFileStatus:
    """A file's status; an invalid file naming several agents lists them all in `agent` ("bot-a, bot-b").
    With the names the vault knows, the file's warnings (hints.py): unknown agents and services."""
    return pb.PolicyFileStatus(
        name=policy_file.name, agent=policy_file.agent, mode=policy_file.mode, rules=len(policy_file.rules),
        issues=[_issue(i) for i in policy_file.issues],
        warnings=[_issue(w) for w in file_warnings(policy_file, known)])


def _instant(stamp: Timestamp) -> int:
    """`at` in epoch ms, refused unless the policy engine can judge it: a Timestamp out of protobuf's own range
    (or with bad nanos) has no millisecond value, and one in the first or last day of the calendar has, in
    some zones, a local time in year 0 or 10000, which no datetime holds."""
    try:
        at_ms = stamp.ToMilliseconds()
    except ValueError:
        at_ms = None
    if at_ms is None or not JUDGED_FROM_MS <= at_ms <= JUDGED_UNTIL_MS:
        raise InvalidArgument("the time to judge at (`at`) must be between 0001-01-02T00:00:00Z and "
                              "9999-12-30T23:59:59Z, so that its local time in every timezone is a real date")
    return int(at_ms)


class PolicyService(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    @rpc
    async def Validate(self, request: pb.ValidatePoliciesRequest, context: Ctx) -> pb.ValidatePoliciesResponse:
        def check() -> list[PolicyFile]:
            files = [parse_policy(source.name, source.content) for source in request.files]
            compile_set(files)  # adds the cross-file issues (one mode per agent)
            return files

        files = await asyncio.to_thread(check)
        known = await self._known()
        return pb.ValidatePoliciesResponse(files=[file_to_pb(f, known) for f in files],
                                           valid=all(f.valid for f in files))

    @rpc
    async def List(self, request: pb.ListPoliciesRequest, context: Ctx) -> pb.PolicyStatus:
        return self._status(self.rt.policies.snapshot, await self._known())

    @rpc
    async def Reload(self, request: pb.ReloadPoliciesRequest, context: Ctx) -> pb.PolicyStatus:
        snapshot = await self.rt.policies.reload("aegisctl")
        self.rt.log_event("policies reloaded", by="aegisctl")
        return self._status(snapshot, await self._known())

    async def _known(self) -> KnownNames | None:
        """The agent and service names the vault holds now (read in clear, so also while locked)."""
        return await asyncio.to_thread(known_names, self.rt.store, self.rt.vault.vault_id is not None)

    @rpc
    async def Test(self, request: pb.TestPolicyRequest, context: Ctx) -> pb.TestPolicyResponse:
        method = request.method.upper()
        if method not in METHODS:
            raise InvalidArgument(f"method {request.method!r} must be one of {', '.join(METHODS)}")
        if not request.path.startswith("/"):
            raise InvalidArgument(f"path {request.path!r} must start with '/' (the part after /{{service}})")
        at_ms = _instant(request.at) if request.HasField("at") else time.time_ns() // 1_000_000
        path = unquote(request.path.partition("?")[0])
        known = await self._known()
        warnings = []
        if known is not None and request.agent not in known.agents:
            warnings.append(unknown_agent(request.agent))
        if known is not None and request.service not in known.services:
            warnings.append(unknown_service(request.service) + ": the gate refuses every request to it "
                            "(403 not_granted) before any policy is judged")
        verdict = self.rt.policies.current.judge(request.agent, request.service, method, path, at_ms)
        if verdict is None:
            return pb.TestPolicyResponse(decision="ungoverned", reason=f"no policy file names agent "
                                         f"{request.agent!r}: its grants and the credential's scopes decide",
                                         warnings=warnings)
        reply = pb.TestPolicyResponse(mode=verdict.mode, reason=verdict.detail, warnings=warnings)
        if verdict.miss == INVALID:
            reply.decision = "invalid"
        else:
            reply.decision = "allowed" if verdict.allowed else "denied"
        rule = verdict.rule
        if rule is not None:
            reply.rule.CopyFrom(pb.PolicyRuleRef(file=rule.file, index=rule.index, line=rule.line, ref=rule.ref))
            if verdict.allowed:
                reply.reason = f"allowed by {rule.ref} (line {rule.line})"
                reply.rate_limit = str(rule.rate) if rule.rate is not None else ""
        return reply

    def _status(self, snap: Snapshot, known: KnownNames | None) -> pb.PolicyStatus:
        current = self.rt.policies.current
        status = pb.PolicyStatus(directory=str(snap.directory or ""), files=[file_to_pb(f, known) for f in snap.files],
                                 fail_all=list(current.fail_all), error=snap.error, trigger=snap.trigger,
                                 reloads=snap.reloads)
        if snap.loaded_at_ms:
            status.loaded_at.CopyFrom(timestamp(snap.loaded_at_ms))
        for name in sorted(current.agents):
            policy = current.agents[name]
            status.agents.append(pb.PolicyAgentStatus(
                agent=name, state="invalid" if policy.invalid else policy.mode, files=list(policy.files),
                rules=sum(len(r) for r in policy.rules.values()), services=sorted(policy.rules)))
        return status
