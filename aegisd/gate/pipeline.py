"""One request through the gate, top to bottom in the order of DESIGN.md's steps.

Each step either passes or raises a Refusal; either way exactly one ledger row is
committed before the agent sees the end of the response.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from multidict import CIMultiDict

from aegisd.agents import TOKEN_PREFIX
from aegisd.config import Config
from aegisd.gate.admission import GateLimits, check_policy
from aegisd.gate.agent_connection import AgentGone, BodyMalformed, GateRequest
from aegisd.gate.front_door import check_host_header, check_shape, gate_url, split_target
from aegisd.gate.headers import (
    add_credential,
    agent_headers,
    agent_query,
    inbound_headers,
    query_with_credential,
)
from aegisd.gate.method_override import OVERRIDABLE, content_types, refuse_body_override, refuse_overrides
from aegisd.gate.outbound_inspection import (
    TOKENLESS_MASKING,
    BodyTooLarge,
    body_broken,
    body_too_large,
    counted_body,
    inspect_request,
    masked,
    read_body,
)
from aegisd.gate.refusal import JSON_CONTENT_TYPE, REQUEST_ID_HEADER, Refusal, send_refusal
from aegisd.gate.response_redaction import ResponseRedactor, ask_redactable, redaction_for
from aegisd.gate.routing import AgentEntry, Route, RoutingState, RoutingTable
from aegisd.gate.services import granted_services
from aegisd.gate.unauthenticated import (
    AGENT_BURST,
    AGENT_RATE_PER_SECOND,
    ALARM_BURST,
    ALARM_RATE_PER_SECOND,
    ALARMS,
    RefusalRows,
)
from aegisd.gate.upstream import (
    Superseded,
    UpstreamBroken,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
)
from aegisd.inspection import Inspector, Redaction
from aegisd.ledger import LedgerEntry, LedgerError, LedgerWriter
from aegisd.ledger.entry import normalize
from aegisd.outcomes import OutcomeSink
from aegisd.policy import PolicySet, PolicyStore, Verdict
from aegisd.vault.domains import (
    DEFAULT_PORTS,
    AllowedHost,
    AmbiguousTarget,
    DomainError,
    canonical_target,
    target_text,
)

log = logging.getLogger("aegisd.gate")
# Upstream answers up to this size (declared by Content-Length) are read whole and sent in one write.
SMALL_BODY_BYTES = 64 * 1024
# A small compressed answer (declared length up to SMALL_BODY_BYTES) is held whole, to go out with its exact
# length once decoded and redacted, only while it decodes to at most this: most API answers are far smaller,
# while 16 KB of gzip can hold 16 MiB and an agent that does not read would keep all of it in memory here.
# Past it, an HTTP/1.1 agent gets the answer streamed, as larger answers are. An HTTP/1.0 agent cannot be
# streamed an answer whose length changes (it has no chunks): every compressed answer the gate decodes for it,
# of any declared length or none, is held whole up to this and refused past it.
WHOLE_DECODED_MAX = 1024 * 1024
# The most read whole for an HTTP/1.0 agent, which can tell a cut body only by its length: a plain answer of
# unknown length. Every byte of it came from the upstream, so this bounds what one request holds.
WHOLE_ANSWER_MAX = 16 * 1024 * 1024
# On a 503 the gate expects to clear by itself (the ledger writer retries every second; a stopping aegisd is
# restarted by its service manager): agents' HTTP clients that honour Retry-After wait that long, not their own
# backoff. A locked vault waits on an operator, so its 503 names no time.
RETRY_SOON = {"Retry-After": "1"}


def ledger_unavailable(*, nothing_forwarded: bool) -> Refusal:
    """The 503 of a request whose ledger row cannot be written: refused before it went upstream, or answered by the
    upstream but not passed on, since no complete answer goes out without its row."""
    message = "the audit ledger cannot be written" + ("; nothing was forwarded" if nothing_forwarded else "")
    return Refusal(503, "ledger_unavailable", message, headers=RETRY_SOON)
KEY_FORMATS_ONLY = Inspector(())  # what can still be recognised in a path while the vault is locked


class Exchange:
    """What the ledger will say about one request, filled in as the pipeline runs."""

    __slots__ = ("agent", "alarm", "attempted", "bytes_in", "bytes_out", "credential", "decision", "flags",
                 "forwarded", "inspected_with", "judged_ms", "masking", "method", "path", "path_inspected", "reason",
                 "recorded", "request_id", "service", "started", "status", "target_host", "time_ms", "upstream_s")

    def __init__(self, method: str) -> None:
        self.request_id = secrets.token_hex(8)
        self.started = time.perf_counter()
        self.time_ms = self.judged_ms = time.time_ns() // 1_000_000  # judged again at a later moment: see _readmit
        self.method = method
        self.agent = self.credential = self.service = self.path = self.target_host = ""
        self.decision, self.reason, self.flags = "allowed", "", ""
        self.alarm = ""  # the alarm budget a refusal's row draws on when its reason does not name one (_refusal_rows)
        self.status = self.bytes_in = self.bytes_out = 0
        self.upstream_s: float | None = None  # time to the upstream's response headers, for metrics
        self.recorded = False
        self.forwarded = False  # the request went (or began to go) to the upstream
        # The gate looked the upstream up and tried to reach it: set with `forwarded`, and kept when the attempt
        # failed before anything was sent (only `forwarded` goes back). Such an attempt spends quota: else rate limits
        # would not bound an agent's lookups and connections (under a `*.` entry, DNS names and TLS server names of
        # its choosing), nor its retries against a dead upstream.
        self.attempted = False
        self.path_inspected = False  # step 8 scanned the path (and masked what it found)
        # The secrets of the table the request was first judged under, to mask its row's path with: a lock, or a
        # secret rotated or removed, before the row is written must not leave a secret the path held in clear.
        self.masking: Inspector | None = None
        self.inspected_with: Inspector | None = None  # the table step 8 last scanned the path under

    def entry(self) -> LedgerEntry:
        return LedgerEntry(
            kind="request", time_ms=self.time_ms, request_id=self.request_id, agent=self.agent,
            credential=self.credential, service=self.service, method=self.method, path=self.path,
            target_host=self.target_host, decision=self.decision, reason=self.reason, status=self.status,
            duration_ms=round((time.perf_counter() - self.started) * 1000, 3), bytes_in=self.bytes_in,
            bytes_out=self.bytes_out, flags=self.flags)


@dataclass(slots=True)  # not frozen: that would cost every request about 1.5 µs more to build
class Admission:
    """What steps 1-6 found for one request, and the routing table and policy set they were judged against."""

    table: RoutingTable
    policies: PolicySet
    agent: AgentEntry
    route: Route
    entry: AllowedHost
    host: str
    port: int
    verdict: Verdict | None
    timed: bool  # the judgement depends on the clock: an expiry, or a time window

    def still_holds_at(self, now_ms: int) -> bool:
        """Whether the clock alone leaves this judgement standing: the credential not expired, the rule that
        allowed the request still inside its time window."""
        if self.route.expires_at is not None and now_ms >= self.route.expires_at:
            return False
        rules = self.verdict.allowing if self.verdict is not None else ()
        return all(rule.window is None or rule.window.contains(now_ms) for rule in rules)


class GatePipeline:
    def __init__(self, config: Config, routing: RoutingState, ledger: LedgerWriter, upstream: UpstreamPool,
                 outcomes: OutcomeSink | None = None, policies: PolicyStore | None = None) -> None:
        self.config = config
        self.policies = policies or PolicyStore(None)
        self.limits = GateLimits(config.agent_max_concurrency)
        self.outcomes = outcomes
        self.routing = routing
        self.ledger = ledger
        self.upstream = upstream
        self.draining = False
        self.in_flight = 0
        self._listen_hosts = frozenset({config.gate_host.lower()})
        self._gate_url = gate_url(config.gate_host, config.gate_port)  # named in the CONNECT refusal
        self._unauthenticated = RefusalRows(ledger.append_nowait)  # one budget: requests that name no agent
        self._agent_refusals = RefusalRows(ledger.append_nowait, AGENT_RATE_PER_SECOND, AGENT_BURST)  # one each
        self._agent_alarms = {reason: RefusalRows(ledger.append_nowait, ALARM_RATE_PER_SECOND, ALARM_BURST)
                              for reason in ALARMS}  # and each of these

    def stopped(self) -> None:
        """The gate has stopped and every request is recorded: write what is still pending (the summary of
        unrecorded refusals) while the ledger is open."""
        for budget in (self._unauthenticated, self._agent_refusals, *self._agent_alarms.values()):
            budget.flush()

    async def handle(self, request: GateRequest) -> None:
        """Answer one request (through `request`) and commit its ledger row."""
        self.in_flight += 1
        x = Exchange(request.method)
        try:
            await self._pipeline(request, x)
        except Refusal as refusal:
            self._refund_unless_attempted(x)
            await self._refuse(request, x, refusal)
        except asyncio.CancelledError:  # the gate stopped and this request outlived the grace period
            if not x.recorded:
                if not x.forwarded:
                    x.decision = "denied"
                self._refund_unless_attempted(x)
                x.reason = x.reason or "shutting_down"
                await asyncio.shield(self._record(x))
            raise
        except ConnectionError:
            raise  # the agent left mid-answer; the relay recorded it
        except Exception as exc:  # a bug of ours: the agent gets a 500 and the ledger a row, never silence
            log.error("the gate failed on a request: %s", type(exc).__name__)  # the type only: no data
            await self._fail(request, x)
        finally:
            self.in_flight -= 1
            self.limits.release(x.request_id)

    def _refund_unless_attempted(self, x: Exchange) -> None:
        """A request that ended before the gate tried the upstream used no quota (docs/policies.md)."""
        if not x.attempted:
            self.limits.refund(x.request_id)

    async def _fail(self, request: GateRequest, x: Exchange) -> None:
        """After a bug: a JSON 500 if nothing was sent yet, else a cut answer; one ledger row either way."""
        failure = Refusal(500, "internal_error", "the gate failed on this request; see aegisd's log", close=True)
        self._refund_unless_attempted(x)
        if not x.recorded:
            x.decision, x.reason, x.status = ("denied" if not x.forwarded else x.decision), "internal_error", 500
            await self._record(x)
        if request.started:
            request.abort()
        else:
            await send_refusal(request, failure, x.request_id)

    async def refuse_malformed(self, request: GateRequest, status: int, message: str) -> None:
        """What llhttp could not parse is refused and recorded like any other request (step 0). One whose head
        was read (a version other than 1.0 and 1.1, a transfer coding other than chunked, an Upgrade with a body,
        a body whose framing broke before its turn) names its target and agent as a front-door refusal does; the
        stand-in for a head that could not be read has neither to name."""
        x = Exchange(request.method)
        self._attribute(request, x)
        await self._refuse(request, x, Refusal(status, "bad_request", message, close=True))

    async def _pipeline(self, request: GateRequest, x: Exchange) -> None:
        # 0. the front door: request shape, Host header, path
        try:
            check_shape(request, self._gate_url)
            check_host_header(request.headers, self._listen_hosts)
            service, rest, query = split_target(request.raw_path)
        except Refusal:
            self._attribute(request, x)
            raise
        x.service, x.path = service, rest
        if service == "_aegis":
            await self._operator(request, rest, x)
            return
        if self.draining:
            raise Refusal(503, "shutting_down", "aegisd is shutting down; retry shortly", close=True,
                          headers=RETRY_SOON)

        # 1-6. vault unlocked, agent, service -> credential, grant, expiry, target host, scope, policy
        admitted = self._admit(request, x, service, rest, query)

        # Nothing is forwarded while the ledger cannot record it; checked again once the body is read.
        self._check_ledger_writable()

        # 7. rate limits (credential, agent, policy rule) and the agent's concurrency cap
        self.limits.admit(x, admitted.agent, admitted.route, admitted.verdict)

        # The declared length is the last check that needs no body: a body too large is refused unread.
        if request.content_length is not None and request.content_length > self.config.max_body_bytes:
            raise body_too_large(self.config.max_body_bytes)

        # Every check that needs no body has passed: a client waiting on `Expect: 100-continue` may send it.
        if request.headers.get("Expect", "").lower() == "100-continue":
            request.send_continue()

        # The body (buffered unless inspection is off); steps 1-7 again if the vault or the policies changed
        # while it arrived, so what follows uses the routing table of the moment it is forwarded.
        body, admitted = await self._body_as_admitted(request, x, admitted, service, rest, query)
        # 6 again, for the body: a POST's `_method` field (a body is read, and so can be seen, unless inspection is off)
        if body and request.method == OVERRIDABLE:
            await refuse_body_override(content_types(request.headers), body)

        # 8. body inspection: path, query, headers and body for secrets and keys; the query and headers
        #    scanned are the agent's as they will be forwarded (step 9's strip). A large or compressed body
        #    is inspected in a worker thread, and so is a credential group's redaction compiled at its first
        #    answer: if the table or the policies changed meanwhile, steps 1-8 again.
        while True:
            route, inspector = admitted.route, admitted.table.inspector
            headers, forwarded_query = agent_headers(request.headers, route), agent_query(query, route)
            await inspect_request(request, route, inspector, x, rest, forwarded_query, headers, body,
                                  self.config.max_body_bytes)
            if route.body_inspection != "off" and not inspector.has_redaction(route.credential_id):
                await asyncio.to_thread(inspector.redaction, route.credential_id)
            if self._still_current(admitted):
                break
            admitted = self._readmit(request, x, service, rest, query)
        x.inspected_with = inspector
        if x.masking is not inspector:  # judged again under another table: the first one's secrets are masked too
            self._mask_target(x)  # (one rotated or removed while the body arrived is not in the new table)
        query = forwarded_query
        redaction = redaction_for(route, inspector)

        # 9. agent auth, hop-by-hop and gate headers stripped above; inject the credential
        add_credential(headers, route, x.target_host)
        if redaction is not None:
            ask_redactable(headers)  # so the response can be redacted as it streams
        query = query_with_credential(query, route)
        target = f"{rest}?{query}" if query else rest

        # 10-11. forward, stream back, record
        await self._forward(request, x, admitted, target, headers, body, redaction)

    def _admit(self, request: GateRequest, x: Exchange, service: str, rest: str, query: str) -> Admission:
        """Steps 1-6 against the current routing table and policy set; raises a Refusal."""
        # 1. vault unlocked?
        table = self._unlocked_table()
        if x.masking is None:
            x.masking = table.inspector

        # 2. agent authenticated
        agent = self._authenticate(request, table)
        x.agent = agent.name

        # 3-4. service -> credential, granted to this agent, not expired
        route = table.routes.get(service)
        if route is None or route.credential_id not in agent.credential_ids:
            raise Refusal(403, "not_granted", f"agent {agent.name!r} has no grant for service {service!r}")
        x.credential = route.name
        if route.expires_at is not None and x.judged_ms >= route.expires_at:
            raise Refusal(403, "credential_expired", f"the credential for {service!r} has expired; an operator "
                          f"must extend it: `aegisctl vault update {route.name} --ttl DURATION` (such as 90d), or "
                          "`--ttl never`")

        # 5. target host against the credential's allowlist
        entry, host, port = self._target(request, route, x, table.inspector)
        x.target_host = _netloc(entry.scheme, host, port)

        # 6. method scope; the agent's policy rules (method, path, time window). They judge the request line, so
        #    a header that would make the upstream act on another method or path is refused first.
        refuse_overrides(request.method, request.headers, query)
        if not route.allows_method(request.method):
            raise Refusal(403, "scope_denied", f"method {request.method} is outside the credential's scopes")
        policies = self.policies.current
        verdict = check_policy(policies, x, agent, service, request.method, rest)
        return Admission(table, policies, agent, route, entry, host, port, verdict,
                         route.expires_at is not None or (verdict is not None and
                                                          any(rule.window is not None for rule in verdict.allowing)))

    async def _body_as_admitted(self, request: GateRequest, x: Exchange, admitted: Admission, service: str,
                                rest: str, query: str) -> tuple[bytes | None, Admission]:
        """The body to forward (None: it streams, inspection is off) and the admission that holds when it is
        forwarded. A lock, revoke, agent removal, rotation or policy change while the body arrived swaps the
        table or the policy set: the request is then judged again, refused or routed as a fresh one would be.
        When nothing changed this costs two identity comparisons."""
        body: bytes | None = None
        while True:
            if body is None and request.has_body and admitted.route.body_inspection != "off":
                body = await read_body(request, x, self.config.max_body_bytes)
            if self._still_current(admitted):
                return body, admitted
            admitted = self._readmit(request, x, service, rest, query)

    def _still_current(self, admitted: Admission) -> bool:
        """Whether what the request was judged against still stands: the routing table, the policy set and,
        when the judgement depended on the clock, the moment (an expiry or a time window passed meanwhile)."""
        if self.routing.table is not admitted.table or self.policies.current is not admitted.policies:
            return False
        return not admitted.timed or admitted.still_holds_at(time.time_ns() // 1_000_000)

    def _readmit(self, request: GateRequest, x: Exchange, service: str, rest: str, query: str) -> Admission:
        """Steps 1-7 again, the quota taken under the old admission given back first."""
        earlier, x.flags, x.reason = x.flags, "", ""  # written again by steps 6-8 if the request goes on
        x.judged_ms = time.time_ns() // 1_000_000  # as a fresh request would be now: expiry, time windows
        try:
            admitted = self._admit(request, x, service, rest, query)
        except Refusal:  # what step 8 found before (a warn-mode finding) stays on the refused request's row
            x.flags = ",".join(dict.fromkeys(filter(None, f"{earlier},{x.flags}".split(","))))
            raise
        self.limits.readmit(x, admitted.agent, admitted.route, admitted.verdict)
        return admitted

    # -- steps ---------------------------------------------------------------------------------

    def _check_ledger_writable(self) -> None:
        """Refuse while the ledger's latest commit failed: a request forwarded now could not be recorded."""
        if self.ledger.failing:
            raise ledger_unavailable(nothing_forwarded=True)

    def _unlocked_table(self) -> RoutingTable:
        table = self.routing.table
        if table is None:
            raise Refusal(503, "vault_locked", "the vault is locked; an operator must run `aegisctl unlock`")
        return table

    def _authenticate(self, request: GateRequest, table: RoutingTable) -> AgentEntry:
        token = _token(request)
        agent = table.agent_for(token.strip()) if token else None
        request.vouch(agent is not None)  # a connection no agent authenticated on may be reset at the cap
        if not token:
            raise Refusal(401, "agent_auth_required", "send your agent token in the X-Aegis-Agent header")
        if agent is None:
            raise Refusal(401, "agent_auth_invalid", "the agent token is not valid")
        return agent

    def _attribute(self, request: GateRequest, x: Exchange) -> None:
        """A request the front door refused (a dot segment, a proxy form, a foreign Host) names its agent and its
        target in its row when it carries a valid token: such probes are the agent's, counted against its own
        budget and found by `ledger show --agent`, not lost among tokenless refusals. Nothing more is judged."""
        x.path = request.raw_path  # masked like any target refused before inspection, when the row is written
        table, token = self.routing.table, _token(request)
        agent = table.agent_for(token.strip()) if table is not None and token else None
        if agent is not None:
            x.agent = agent.name

    def _target(self, request: GateRequest, route: Route, x: Exchange,
                inspector: Inspector) -> tuple[AllowedHost, str, int]:
        """The allowlist entry, host and port the request goes to. A target host refused here is recorded (row,
        webhook event) as the agent asked for it: where it tried to send the credential is what an operator needs."""
        requested = request.headers.get("X-Target-Host")
        if requested is None:
            if route.default_entry is None:
                raise Refusal(400, "target_host_required", f"service {route.service!r} allows several hosts; "
                              "name one in X-Target-Host")
            entry = route.default_entry
            return entry, entry.host, entry.port
        try:
            host, port, scheme = canonical_target(requested)
        except DomainError as exc:
            # As sent (`a.com@evil.com` is a try at evil.com), masked and capped as the path is when the row is
            # written; its row draws on domain_not_allowed's budget, not on the one cheap refusals spend.
            x.target_host, x.alarm = requested, "domain_not_allowed"
            raise Refusal(400, "bad_request", f"X-Target-Host: {exc}") from None
        try:
            match = route.allowlist.match(host, port, scheme)
        except AmbiguousTarget as exc:
            x.target_host = _asked(inspector, requested, host, port, scheme)
            raise _ambiguous(route, host, port, scheme, exc.entries) from None
        if match is None:
            x.target_host = _asked(inspector, requested, host, port, scheme)
            raise _not_allowed(route, host, port, scheme)
        return match, host, match.port

    async def _forward(self, request: GateRequest, x: Exchange, admitted: Admission, target: str,
                       headers: CIMultiDict[str], inspected: bytes | None, redaction: Redaction | None) -> None:
        limit = self.config.max_body_bytes
        body: bytes | AsyncIterator[bytes] | None = inspected  # bytes: already read and inspected
        if inspected is None and request.has_body:
            body = counted_body(request, x, limit)
            if request.content_length is not None:
                headers["Content-Length"] = str(request.content_length)
        self._check_ledger_writable()  # a commit may have failed while the body was read
        if request.agent_left:  # nothing is sent for an agent already gone (the row says denied: nothing went
            x.decision = "denied"  # upstream); its quota stays spent, so its rate limit bounds these rows as it
            await self._disconnected(x)  # does those of forwarded requests
            return
        sent = time.perf_counter()
        x.forwarded = x.attempted = True
        request.watch()  # the agent's leaving ends the wait for the upstream's answer at once
        try:
            entry = admitted.entry
            upstream = await self.upstream.request(
                request.method, entry.scheme, admitted.host, admitted.port, target, headers, body,
                allow_internal=entry.is_special_address, credential=admitted.route.credential_id,
                still_current=lambda: self._still_current(admitted))
            x.upstream_s = time.perf_counter() - sent
        except asyncio.CancelledError:
            if not request.left():
                raise  # the gate is stopping
            if not request.body_complete:  # it left with its body unfinished: as when the body breaks off
                raise body_broken() from None
            # The upstream exchange was dropped and its connection closed (never pooled). The request went, or
            # was on its way, upstream: like any forwarded request it keeps its quota.
            await self._disconnected(x)
            return
        except BodyTooLarge:
            raise body_too_large(limit) from None
        except UpstreamTimeout:
            raise Refusal(504, "upstream_timeout", "the upstream did not answer in time") from None
        except (AgentGone, BodyMalformed):  # the streamed body broke off on the agent's side: its fault, not ours
            raise body_broken() from None
        except (UpstreamBroken, OSError) as exc:
            if x.bytes_in > limit:
                raise body_too_large(limit) from None
            log.debug("upstream request failed: %s", type(exc).__name__)
            raise Refusal(502, "upstream_error", "the upstream closed the connection or sent a bad "
                          "response") from None
        except UpstreamError as exc:  # could not connect: the message says why, and holds no secret
            x.forwarded = False  # resolving, the address guard, connecting or TLS failed: nothing was sent, but the
            # attempt keeps its quota (Exchange.attempted); unless an operator's change stopped it (Superseded): the
            # agent is told to retry, and that retry is what pays
            x.attempted = not isinstance(exc, Superseded)
            raise Refusal(exc.status, exc.code, str(exc)) from None
        finally:
            request.unwatch()
        try:
            await self._relay(request, x, upstream, redaction)
        finally:
            upstream.release()

    async def _relay(self, request: GateRequest, x: Exchange, upstream: UpstreamResponse,
                     redaction: Redaction | None) -> None:
        x.status = upstream.status
        bodiless = request.method == "HEAD" or upstream.status in (204, 304)
        if upstream.transfer_coded and not bodiless:  # for every credential: the agent could not decode it either
            raise Refusal(502, "response_not_redactable", "the upstream's answer has a Transfer-Encoding other "
                          "than chunked, which the gate can neither redact nor forward")
        headers = inbound_headers(upstream.headers)
        redactor = ResponseRedactor(redaction, x) if redaction is not None else None
        # The upstream's own reason phrase only where nothing is redacted: it could echo the secret.
        reason = (upstream.reason or None) if redactor is None else None
        if redactor is not None:  # may refuse (502) a body it could not redact, before anything is sent
            headers = redactor.headers(headers, request.method, upstream.status)
        declared = upstream.content_length
        length = declared if redactor is None or not redactor.streams_body else None
        if not bodiless and declared is not None and declared <= SMALL_BODY_BYTES:
            await self._relay_whole(request, x, upstream, headers, redactor, reason)
            return
        if not bodiless and length is None and not request.http11:
            # An HTTP/1.0 agent can tell a cut body only by its length: read it whole, then send it with one.
            await self._relay_whole(request, x, upstream, headers, redactor, reason, capped=True)
            return
        chunks = upstream.chunks() if redactor is None else redactor.filter(upstream.chunks())
        await self._relay_stream(request, x, upstream.status, headers, reason, length, bodiless, chunks)

    async def _relay_stream(self, request: GateRequest, x: Exchange, status: int, headers: CIMultiDict[str],
                            reason: str | None, length: int | None, bodiless: bool,
                            chunks: AsyncIterator[bytes]) -> None:
        """The body as it comes, then the ledger row, then its end."""
        headers[REQUEST_ID_HEADER] = x.request_id
        # A known-length or empty body is complete for the agent at its last byte (or its head), so that
        # last piece waits for the ledger row: a crash before the commit never leaves an answered request
        # unrecorded. A chunked body's end is `end`'s terminating chunk, which already comes after it.
        empty = length == 0 or bodiless
        held = b""
        failure = ""  # what ended the body early: the upstream failing, or the agent leaving
        request.watch()  # the agent's leaving ends a wait for the upstream's next piece at once
        try:
            if not empty:
                await request.start(status, headers, reason=reason, content_length=length)
            while True:
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                except UpstreamError as exc:  # the upstream failed mid-body
                    failure = "upstream_timeout" if isinstance(exc, TimeoutError) else "upstream_error"
                    break
                x.bytes_out += len(chunk)
                if length is not None and x.bytes_out >= length:
                    chunk, held = chunk[:-1], chunk[-1:]
                await request.write(chunk)
        except ConnectionError:  # the agent went away
            failure = "client_disconnected"
        except asyncio.CancelledError:
            if not request.left():
                raise
            failure = "client_disconnected"
        finally:
            request.unwatch()
        if failure == "client_disconnected":
            await self._disconnected(x)
            return
        if failure:
            x.reason = failure
            await self._record(x)
            request.abort()
            return
        if not await self._record(x):
            request.abort()  # no complete response without its ledger row
            return
        with contextlib.suppress(ConnectionError):  # recorded already; the agent left at the very end
            if empty:
                await request.start(status, headers, reason=reason, content_length=length)
            await request.write(held)
            await request.end()

    async def _relay_whole(self, request: GateRequest, x: Exchange, upstream: UpstreamResponse,
                           headers: CIMultiDict[str], redactor: ResponseRedactor | None, reason: str | None,
                           capped: bool = False) -> None:
        """A body read whole: redacted in one pass, sent with its exact length in one write, and only after
        its ledger row has committed (a truncated compressed body is refused before anything is sent). Small
        answers of declared length (most API answers) take this path; so (`capped`, up to WHOLE_ANSWER_MAX
        bytes) do answers of unknown length to HTTP/1.0 agents. A compressed one that decodes to more than
        WHOLE_DECODED_MAX streams on to an HTTP/1.1 agent instead, and is refused to an HTTP/1.0 one: a few KB
        of gzip must not make the daemon hold 16 MiB for an agent that does not read."""
        rest: Iterator[bytes] | None = None
        request.watch()  # the agent's leaving ends the wait for the body at once
        try:
            body = await _read_capped(upstream, WHOLE_ANSWER_MAX) if capped else await upstream.read()
            if redactor is not None:
                # Only a plain answer to an HTTP/1.0 agent may be held up to WHOLE_ANSWER_MAX: the upstream sent
                # every byte of it. What the gate decodes is held whole only up to WHOLE_DECODED_MAX.
                cap = WHOLE_ANSWER_MAX if not request.http11 and not redactor.decodes else WHOLE_DECODED_MAX
                await redactor.refuse_undeclared_compression(body, WHOLE_DECODED_MAX)  # decodes: never past this
                parts, rest = await _redacted_upto(redactor, body, cap)
                if rest is not None and not request.http11:
                    raise Refusal(502, "upstream_error", f"the upstream's answer decodes to more than {cap} bytes, "
                                  "more than the gate holds to redact an answer whole for an HTTP/1.0 agent, which "
                                  "cannot be sent one of unknown length; use HTTP/1.1")
                if rest is None:
                    body = b"".join(parts)
                    parts.clear()  # held once, not twice, while an agent that does not read keeps it waiting
                else:
                    body = b""
            x.bytes_out = len(body)
        except UpstreamTimeout:
            raise Refusal(504, "upstream_timeout", "the upstream did not send its whole answer in time") from None
        except UpstreamError:
            raise Refusal(502, "upstream_error", "the upstream's answer was cut short or malformed") from None
        except asyncio.CancelledError:
            if not request.left():
                raise
            await self._disconnected(x)
            return
        finally:
            request.unwatch()
        if rest is not None:  # decodes past WHOLE_DECODED_MAX: the rest streams, as a larger answer would
            await self._relay_stream(request, x, upstream.status, headers, reason, None, False, _resumed(parts, rest))
            return
        headers[REQUEST_ID_HEADER] = x.request_id
        if not await self._record(x):
            await send_refusal(request, ledger_unavailable(nothing_forwarded=False), x.request_id)
            return
        with contextlib.suppress(ConnectionError):  # recorded already; the agent left
            await request.respond(upstream.status, body, headers, reason=reason)

    # -- outcomes --------------------------------------------------------------------------------

    async def _refuse(self, request: GateRequest, x: Exchange, refusal: Refusal) -> None:
        x.decision, x.reason, x.status = "denied", refusal.code, refusal.status
        if not await self._record(x):
            refusal = ledger_unavailable(nothing_forwarded=True)
        await send_refusal(request, refusal, x.request_id)

    async def _disconnected(self, x: Exchange) -> None:
        """The agent left before its answer was complete; whatever the upstream still sends is dropped with
        its connection. The row keeps the decision and the status so far (0: no answer yet)."""
        x.reason = "client_disconnected"
        await self._record(x)

    def _refusal_rows(self, x: Exchange) -> RefusalRows:
        """The budget a refusal's row comes out of: the tokenless one, or the agent's for alarms or the rest."""
        if not x.agent:
            return self._unauthenticated
        return self._agent_alarms.get(x.alarm or x.reason, self._agent_refusals)

    async def _record(self, x: Exchange) -> bool:
        x.recorded = True
        # A flood of refusals, tokenless or one agent's: past its budget each is only counted (metrics, the
        # summary row), with no row or log line of its own (outcomes.py says which still alert). An allowed
        # request never asks, nor does a refused one that was forwarded (its quota was spent: its agent's rate
        # limit bounds those).
        itemised = (x.decision != "denied" or x.forwarded or x.reason == "client_disconnected"  # quota spent
                    or self._refusal_rows(x).admit(x.agent, x.reason))
        # Refused before step 8, or forwarded on a credential whose inspection is off: masked, unless it is a
        # tokenless refusal past its budget, whose target nothing records (its metrics name no service), so a
        # flood of them does not buy the masking's scans (milliseconds for a long path) on the event loop.
        if itemised or x.agent:
            if not x.path_inspected:
                self._mask_target(x)
            table = self.routing.table  # a secret added since the request's last judgement: masked too
            if table is not None and x.masking is not None and table.inspector not in (x.masking, x.inspected_with):
                self._mask_target(x, table.inspector)
        entry = normalize(x.entry())  # webhooks and logs get the row as stored: capped, never 60 KB paths
        if self.outcomes is not None:
            try:
                self.outcomes.record(entry, x.upstream_s, itemised)  # metrics, refusal log line, webhooks
            except Exception as exc:  # never at the ledger row's expense
                log.error("recording a request's outcome failed: %s", type(exc).__name__)
        if not itemised:
            return True
        try:
            await self.ledger.append(entry)
        except LedgerError as exc:  # the writer logged the outage when it began; once per request is noise
            log.log(logging.DEBUG if self.ledger.failing else logging.ERROR, "ledger write failed: %s", exc)
            return False
        return True

    def _mask_target(self, x: Exchange, inspector: Inspector | None = None) -> None:
        """A request refused before step 8 (or whose credential's inspection is off) may have put a secret in
        its service or path only to leave it in the ledger: those are masked as an inspected path is, with the
        table it was first judged under unless `inspector` is given. Without a table (locked) only the key
        formats can be recognised, unless the request was judged under one before."""
        inspector = inspector if inspector is not None else x.masking
        if inspector is None:
            table = self.routing.table
            inspector = table.inspector if table is not None else KEY_FORMATS_ONLY
        # One string: a secret with a '/' in it is cut in two by the service segment, and neither half alone
        # is found. The target host (an agent's label under a wildcard entry) is recorded too. Anyone can send a
        # request without a token, up to 10 rows a second: finding the segments to mask in such a path is bounded
        # tighter (a crafted 2 KiB path took ~18 ms of the event loop), past which the whole path is masked.
        bound = {} if x.agent else TOKENLESS_MASKING
        if x.service:
            service, sep, path = masked(inspector, f"/{x.service}{x.path}", **bound).removeprefix("/").partition("/")
            x.service, x.path = service, sep + path
        else:  # refused at the front door: its raw target (an absolute form, a CONNECT authority), never split
            x.path = masked(inspector, x.path, **bound)
        x.target_host = masked(inspector, x.target_host)

    async def _operator(self, request: GateRequest, rest: str, x: Exchange) -> None:
        endpoint = rest.rstrip("/")
        if endpoint == "/metrics" and self.outcomes is not None and self.outcomes.metrics is not None:
            self.outcomes.follow_table()  # a removed agent's series go before the scrape, not at the next request
            body, content_type = await asyncio.to_thread(self.outcomes.metrics.render,
                                                         request.headers.get("Accept", ""))
            await request.respond(200, body, {"Content-Type": content_type, REQUEST_ID_HEADER: x.request_id})
        elif endpoint == "/health" and self.config.health_enabled:
            state = "unlocked" if self.routing.table is not None else "locked"
            ledger = "failing" if self.ledger.failing else "ok"
            await request.respond(200, json.dumps({"status": "ok", "vault": state, "ledger": ledger}).encode(),
                                  {"Content-Type": JSON_CONTENT_TYPE, REQUEST_ID_HEADER: x.request_id})
        elif endpoint == "/services":
            await self._services(request, x)
        elif endpoint in ("/health", "/metrics"):  # switched off: as when on, no row, log line or alert (polled)
            await send_refusal(request, Refusal(404, "not_found", "unknown operator endpoint"), x.request_id)
        else:
            # Recorded like any refusal, through `handle`: with no agent named, its row comes out of the same
            # budget as other unauthenticated refusals', so a flood of these cannot fill the ledger either.
            raise Refusal(404, "not_found", "unknown operator endpoint")

    async def _services(self, request: GateRequest, x: Exchange) -> None:
        """The calling agent's own grants; authenticated and ledgered exactly like a proxied request."""
        if request.method != "GET":
            raise Refusal(405, "method_not_allowed", "/_aegis/services answers GET only", headers={"Allow": "GET"})
        table = self._unlocked_table()
        agent = self._authenticate(request, table)
        x.agent = agent.name
        self.limits.admit(x, agent, None, None)  # its rows count against the agent's own limit, like any call
        x.status = 200
        body = json.dumps(granted_services(table, agent, x.time_ms)).encode()
        if not await self._record(x):
            await send_refusal(request, ledger_unavailable(nothing_forwarded=False), x.request_id)
            return
        await request.respond(200, body, {"Content-Type": JSON_CONTENT_TYPE, REQUEST_ID_HEADER: x.request_id})


async def _read_capped(upstream: UpstreamResponse, cap: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for chunk in upstream.chunks():
        size += len(chunk)
        if size > cap:
            raise Refusal(502, "upstream_error", f"the upstream's answer has no declared length and is larger than "
                          f"{cap} bytes, more than the gate buffers for an HTTP/1.0 agent; use HTTP/1.1")
        parts.append(chunk)
    return b"".join(parts)


async def _redacted_upto(redactor: ResponseRedactor, body: bytes,
                         cap: int) -> tuple[list[bytes], Iterator[bytes] | None]:
    """The redacted (and, if compressed, decoded) body in pieces while they total at most `cap` bytes, and
    None; or, once they pass it (a small compressed answer can decode to gigabytes), the pieces so far and
    the iterator of the rest."""
    parts: list[bytes] = []
    size = 0
    pieces = _redacted_pieces(redactor, body)
    for piece in pieces:
        size += len(piece)
        parts.append(piece)
        if size > cap:
            return parts, pieces
        if redactor.decodes:
            await asyncio.sleep(0)  # decoding never waits on anything: let other connections run between pieces
    return parts, None


async def _resumed(parts: list[bytes], rest: Iterator[bytes]) -> AsyncIterator[bytes]:
    """What `_redacted_upto` decoded, then the rest, a piece at a time with a turn for others after each."""
    first = b"".join(parts)
    parts.clear()
    yield first
    del first
    for piece in rest:
        if piece:
            yield piece
        await asyncio.sleep(0)


def _redacted_pieces(redactor: ResponseRedactor, body: bytes) -> Iterator[bytes]:
    """The body's redacted pieces, then the held-back tail: `finish` may run only once `feed` is exhausted,
    or the tail is lost and a truncated compressed body passes as complete."""
    yield from redactor.feed(body)
    yield redactor.finish()


def _not_allowed(route: Route, host: str, port: int | None, scheme: str | None) -> Refusal:
    """`domain_not_allowed` for a target host, naming it as the agent gave it (scheme and port included), and every
    entry for that host when only its scheme or port differs: the agent can see its allowlist anyway."""
    message = f"{target_text(host, port, scheme)} is not an allowed host for service {route.service!r}"
    near = route.allowlist.entries_for(host)
    if near:
        message += (f"; its allowlist has {route.allowlist.targets_of(near)} for that host (send X-Target-Host as "
                    "/_aegis/services lists it)")
    return Refusal(403, "domain_not_allowed", message)


def _ambiguous(route: Route, host: str, port: int | None, scheme: str | None,
               entries: tuple[AllowedHost, ...]) -> Refusal:
    """`target_host_ambiguous`: the target host, without a port (or scheme), fits several entries; the gate does
    not pick one for the agent."""
    return Refusal(400, "target_host_ambiguous",
                   f"{target_text(host, port, scheme)} fits several entries of service {route.service!r}'s "
                   f"allowlist: {route.allowlist.targets_of(entries)}; send X-Target-Host as "
                   "/_aegis/services lists the entry you mean")


def _asked(inspector: Inspector, requested: str, host: str, port: int | None, scheme: str | None) -> str:
    """A refused target host for its row: as the gate read it (lowercase, IDNA A-labels; an allowed one is recorded
    so too), unless what the agent sent holds a secret. Secrets are found as sent, case and all, and lowercasing
    `SK-Live-...` would hide it from the masking: then the row gets what was sent, masked. The form read is masked
    too (a lowercase secret sent in capitals): the row's own masking does not run for a request refused only when
    judged again after step 8."""
    sent = masked(inspector, requested)
    return masked(inspector, target_text(host, port, scheme)) if sent == requested else sent


def _netloc(scheme: str, host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if DEFAULT_PORTS.get(scheme) == port else f"{shown}:{port}"


def _token(request: GateRequest) -> str | None:
    """The agent token the request carries: X-Aegis-Agent, else an `Authorization: Bearer aegis_...`."""
    token = request.headers.get("X-Aegis-Agent")
    if token is None:
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer " and auth[7:].strip().startswith(TOKEN_PREFIX):
            token = auth[7:].strip()
    return token
