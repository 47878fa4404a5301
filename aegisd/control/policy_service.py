"""aegis.v1.PolicyService: validate, list, test and reload the policy files the gate applies."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from typing import Any

import grpc
import httptools
from google.protobuf.timestamp_pb2 import Timestamp

from aegisd.api.aegis.v1 import policy_pb2 as pb
from aegisd.api.aegis.v1 import policy_pb2_grpc
from aegisd.control.convert import timestamp
from aegisd.control.errors import rpc
from aegisd.errors import InvalidArgument
from aegisd.gate.admission import judge
from aegisd.gate.front_door import split_target
from aegisd.gate.refusal import Refusal
from aegisd.policy import Issue, PolicyFile, Snapshot, compile_set, parse_policy
from aegisd.policy.hints import KnownNames, file_warnings, known_names, unknown_agent, unknown_service
from aegisd.policy.model import JUDGED_FROM_MS, JUDGED_UNTIL_MS
from aegisd.policy.policy_set import INVALID
from aegisd.runtime import Runtime
from aegisd.vault.domains import quoted

Ctx = grpc.aio.ServicerContext[Any, Any]
_METHOD = re.compile(r"[A-Z][A-Z-]*")  # what may go into a request line to ask the gate's parser about it


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


def _gate_parses(method: str) -> bool:
    """Whether the gate's HTTP parser (llhttp, through httptools) takes `method` in a request line: it refuses
    others before any policy, and policies judge every one it takes, not only those rules can name."""
    if not _METHOD.fullmatch(method):
        return False
    try:
        httptools.HttpRequestParser(object()).feed_data(f"{method} / HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):  # Upgrade: CONNECT, refused by the front door
        return False
    return True


def _kept(loaded: Snapshot, sent: list[PolicyFile]) -> list[PolicyFile]:
    """Copies of the loaded files that dropping `sent` into the policy directory would keep (a sent file replaces
    the loaded one of its name), named by their path: validated with them, a sent file that would clash with one
    (two modes for an agent) is reported, as loading it would. Copies, so the loaded files' issues stay as found."""
    replaced = {f.name.rsplit("/", 1)[-1] for f in sent}
    return [dataclasses.replace(f, name=str(loaded.directory / f.name), issues=list(f.issues))
            for f in loaded.files if loaded.directory is not None and f.name not in replaced]


class PolicyService(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    @rpc
    async def Validate(self, request: pb.ValidatePoliciesRequest, context: Ctx) -> pb.ValidatePoliciesResponse:
        loaded = self.rt.policies.snapshot

        def check() -> list[PolicyFile]:
            files = [parse_policy(source.name, source.content) for source in request.files]
            compile_set(files + _kept(loaded, files))  # adds the cross-file issues (one mode per agent)
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
        if not _gate_parses(method):
            raise InvalidArgument(f"method {quoted(request.method)} is not one the gate takes (it answers 400, or 405 "
                                  "to CONNECT, before any policy): use an HTTP method such as GET, POST or PROPFIND")
        if not request.service or any(c in request.service for c in "/?#%"):
            raise InvalidArgument(f"service {quoted(request.service)} must be one path segment, such as github")
        if not request.path.startswith("/"):
            raise InvalidArgument(f"path {quoted(request.path)} must start with '/' (the part after /{{service}})")
        at_ms = _instant(request.at) if request.HasField("at") else time.time_ns() // 1_000_000
        try:  # the gate's front door: what it refuses is never judged, and what it drops (`?query`, `#x`) is not
            _, rest, _ = split_target(f"/{request.service}{request.path}")
        except Refusal as refusal:
            raise InvalidArgument(f"the gate refuses this path before any policy ({refusal.status} {refusal.code}): "
                                  f"{refusal.message}") from None
        known = await self._known()
        warnings = []
        if known is not None and request.agent not in known.agents:
            warnings.append(unknown_agent(request.agent))
        if known is not None and request.service not in known.services:
            warnings.append(unknown_service(request.service) + ": the gate refuses every request to it "
                            "(403 not_granted) before any policy is judged")
        verdict = judge(self.rt.policies.current, request.agent, request.service, method, rest, at_ms)
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
                also = verdict.also
                if also is not None and also is not rule:  # the gate holds the request to both rules
                    reply.also.CopyFrom(pb.PolicyRuleRef(file=also.file, index=also.index, line=also.line,
                                                         ref=also.ref))
                    reply.also_rate_limit = str(also.rate) if also.rate is not None else ""
                    limit = f", rate limit {also.rate}" if also.rate is not None else ""
                    reply.reason += (f"; also held to {also.ref} (line {also.line}{limit}), which allows the path "
                                     "without its ';' parameters")
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
