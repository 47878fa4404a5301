"""One request through the gate, top to bottom in the order of DESIGN.md's steps.

Each step either passes or raises a Refusal; either way exactly one ledger row is
committed before the agent sees the end of the response.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from aegisd.agents import TOKEN_PREFIX
from aegisd.config import Config
from aegisd.gate.front_door import check_host_header, check_shape, split_target
from aegisd.gate.headers import inbound_headers, outbound_headers, outbound_query
from aegisd.gate.refusal import REQUEST_ID_HEADER, Refusal, error_response
from aegisd.gate.routing import AgentEntry, Route, RoutingState, RoutingTable
from aegisd.gate.upstream import UpstreamPool, describe_connect_error
from aegisd.ledger import LedgerEntry, LedgerError, LedgerWriter
from aegisd.vault.domains import DEFAULT_PORTS, AllowedHost, DomainError, canonical_target

log = logging.getLogger("aegisd.gate")


class BodyTooLarge(Exception):
    """The agent's streamed body crossed the configured limit."""


class Exchange:
    """What the ledger will say about one request, filled in as the pipeline runs."""

    __slots__ = ("agent", "bytes_in", "bytes_out", "credential", "decision", "flags", "method", "path",
                 "reason", "request_id", "service", "started", "status", "target_host", "time_ms")

    def __init__(self, method: str) -> None:
        self.request_id = secrets.token_hex(8)
        self.started = time.perf_counter()
        self.time_ms = time.time_ns() // 1_000_000
        self.method = method
        self.agent = self.credential = self.service = self.path = self.target_host = ""
        self.decision, self.reason, self.flags = "allowed", "", ""
        self.status = self.bytes_in = self.bytes_out = 0

    def entry(self) -> LedgerEntry:
        return LedgerEntry(
            kind="request", time_ms=self.time_ms, request_id=self.request_id, agent=self.agent,
            credential=self.credential, service=self.service, method=self.method, path=self.path,
            target_host=self.target_host, decision=self.decision, reason=self.reason, status=self.status,
            duration_ms=round((time.perf_counter() - self.started) * 1000, 3), bytes_in=self.bytes_in,
            bytes_out=self.bytes_out, flags=self.flags)


class GatePipeline:
    def __init__(self, config: Config, routing: RoutingState, ledger: LedgerWriter, upstream: UpstreamPool) -> None:
        self.config = config
        self.routing = routing
        self.ledger = ledger
        self.upstream = upstream
        self.draining = False
        self.in_flight = 0
        self._listen_hosts = frozenset({config.gate_host.lower()})

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.in_flight += 1
        x = Exchange(request.method)
        try:
            return await self._pipeline(request, x)
        except Refusal as refusal:
            return await self._refuse(x, refusal)
        finally:
            self.in_flight -= 1

    async def _pipeline(self, request: web.BaseRequest, x: Exchange) -> web.StreamResponse:
        # 0. the front door: request shape, Host header, path
        check_shape(request)
        check_host_header(request, self._listen_hosts)
        service, rest, query = split_target(request.raw_path)
        x.service, x.path = service, rest
        if service == "_aegis":
            return self._operator(rest, x)
        if self.draining:
            raise Refusal(503, "shutting_down", "aegisd is shutting down; retry shortly", close=True)

        # 1. vault unlocked?
        table = self.routing.table
        if table is None:
            raise Refusal(503, "vault_locked", "the vault is locked; an operator must run `aegisctl unlock`")

        # 2. agent authenticated
        agent = self._authenticate(request, table)
        x.agent = agent.name

        # 3-4. service -> credential, granted to this agent, not expired
        route = table.routes.get(service)
        if route is None or route.credential_id not in agent.credential_ids:
            raise Refusal(403, "not_granted", f"agent {agent.name!r} has no grant for service {service!r}")
        x.credential = route.name
        if route.expires_at is not None and x.time_ms >= route.expires_at:
            raise Refusal(403, "credential_expired", f"the credential for {service!r} has expired; an operator "
                          "must rotate or extend it")

        # 5. target host against the credential's allowlist
        entry, host, port = self._target(request, route)
        x.target_host = _netloc(entry.scheme, host, port)

        # 6. method scope; policy rules (method, path, time window) plug in here
        if not route.allows_method(request.method):
            raise Refusal(403, "scope_denied", f"method {request.method} is outside the credential's scopes")

        # 7. rate limits (credential, agent, policy rule) plug in here
        # 8. body inspection of the outbound body plugs in here

        # 9. strip agent auth, hop-by-hop and gate headers; inject the credential
        headers = outbound_headers(request.headers, route, x.target_host)
        query = outbound_query(query, route)
        url = URL(f"{entry.scheme}://{x.target_host}{rest}" + (f"?{query}" if query else ""), encoded=True)

        # 10-11. forward, stream back, record
        return await self._forward(request, x, entry, url, headers)

    # -- steps ---------------------------------------------------------------------------------

    def _authenticate(self, request: web.BaseRequest, table: RoutingTable) -> AgentEntry:
        token = request.headers.get("X-Aegis-Agent")
        if token is None:
            auth = request.headers.get("Authorization", "")
            if auth[:7].lower() == "bearer " and auth[7:].strip().startswith(TOKEN_PREFIX):
                token = auth[7:].strip()
        if not token:
            raise Refusal(401, "agent_auth_required", "send your agent token in the X-Aegis-Agent header")
        agent = table.agent_for(token.strip())
        if agent is None:
            raise Refusal(401, "agent_auth_invalid", "the agent token is not valid")
        return agent

    def _target(self, request: web.BaseRequest, route: Route) -> tuple[AllowedHost, str, int]:
        requested = request.headers.get("X-Target-Host")
        if requested is None:
            if route.default_entry is None:
                raise Refusal(400, "target_host_required", f"service {route.service!r} allows several hosts; "
                              "name one in X-Target-Host")
            entry = route.default_entry
            return entry, entry.host, entry.port
        try:
            host, port = canonical_target(requested)
        except DomainError as exc:
            raise Refusal(400, "bad_request", f"X-Target-Host: {exc}") from None
        match = route.allowlist.match(host, port)
        if match is None:
            raise Refusal(403, "domain_not_allowed", f"{host} is not an allowed host for service "
                          f"{route.service!r}")
        return match, host, match.port

    async def _forward(self, request: web.BaseRequest, x: Exchange, entry: AllowedHost, url: URL,
                       headers: CIMultiDict[str]) -> web.StreamResponse:
        limit = self.config.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise Refusal(413, "body_too_large", f"the request body is larger than {limit} bytes", close=True)
        body = self._body(request, x, limit) if request.body_exists else None
        if length is not None and body is not None:
            headers["Content-Length"] = str(length)
        session = self.upstream.session(allow_internal=entry.is_special_address)
        try:
            upstream = await session.request(request.method, url, headers=headers, data=body,
                                             allow_redirects=False, compress=None)
        except BodyTooLarge:
            raise Refusal(413, "body_too_large", f"the request body is larger than {limit} bytes",
                          close=True) from None
        except TimeoutError:
            raise Refusal(504, "upstream_timeout", "the upstream did not answer in time") from None
        except aiohttp.ClientConnectorError as exc:
            raise Refusal(*describe_connect_error(exc)) from None
        except (aiohttp.ClientError, OSError) as exc:
            if x.bytes_in > limit:
                raise Refusal(413, "body_too_large", f"the request body is larger than {limit} bytes",
                              close=True) from None
            log.info("upstream request failed: %s", type(exc).__name__)
            raise Refusal(502, "upstream_error", "the upstream closed the connection or sent a bad "
                          "response") from None
        try:
            return await self._relay(request, x, upstream)
        finally:
            upstream.release()

    async def _body(self, request: web.BaseRequest, x: Exchange, limit: int) -> AsyncIterator[bytes]:
        async for chunk in request.content.iter_any():
            x.bytes_in += len(chunk)
            if x.bytes_in > limit:
                raise BodyTooLarge()
            yield chunk

    async def _relay(self, request: web.BaseRequest, x: Exchange,
                     upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        x.status = upstream.status
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers=inbound_headers(upstream.headers))
        response.headers[REQUEST_ID_HEADER] = x.request_id
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                x.bytes_out += len(chunk)
                await response.write(chunk)
        except (TimeoutError, aiohttp.ClientError) as exc:
            x.reason = "upstream_timeout" if isinstance(exc, TimeoutError) else "upstream_error"
            await self._record(x)
            _abort(request)
            return response
        except ConnectionError:
            x.reason = "client_disconnected"
            await self._record(x)
            return response
        if not await self._record(x):
            _abort(request)  # no complete response without its ledger row
            return response
        await response.write_eof()
        return response

    # -- outcomes --------------------------------------------------------------------------------

    async def _refuse(self, x: Exchange, refusal: Refusal) -> web.Response:
        x.decision, x.reason, x.status = "denied", refusal.code, refusal.status
        if not await self._record(x):
            refusal = Refusal(503, "ledger_unavailable", "the audit ledger cannot be written; nothing was "
                              "forwarded")
        return error_response(refusal, x.request_id)

    async def _record(self, x: Exchange) -> bool:
        try:
            await self.ledger.append(x.entry())
        except LedgerError as exc:
            log.error("ledger write failed: %s", exc)
            return False
        return True

    def _operator(self, rest: str, x: Exchange) -> web.Response:
        if rest.rstrip("/") == "/health":
            state = "unlocked" if self.routing.table is not None else "locked"
            return web.Response(text=json.dumps({"status": "ok", "vault": state}),
                                content_type="application/json", headers={REQUEST_ID_HEADER: x.request_id})
        return error_response(Refusal(404, "not_found", "unknown operator endpoint"), x.request_id)


def _netloc(scheme: str, host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if DEFAULT_PORTS.get(scheme) == port else f"{shown}:{port}"


def _abort(request: web.BaseRequest) -> None:
    """Cut the connection so the agent sees a truncated response, never a falsely complete one."""
    if request.transport is not None:
        request.transport.abort()
