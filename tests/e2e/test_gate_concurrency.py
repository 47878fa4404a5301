"""The gate under concurrency: 100 agents with 100 credentials at once, each reaching the upstream with
its own secret only; and a `kill -9` under load that loses no ledger row for any response a client
received in full."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from urllib.parse import parse_qsl

import aiohttp

from aegisctl.client import AegisClient
from aegisd.api.aegis.v1 import agents_pb2, credentials_pb2
from tests.e2e.gate_support import SECRETS, GateWorld
from tests.upstreams import Seen

AGENTS = 100
KINDS = ("bearer", "header", "basic", "query")
AUTH_TYPES = {"bearer": credentials_pb2.AUTH_TYPE_BEARER, "header": credentials_pb2.AUTH_TYPE_HEADER,
              "basic": credentials_pb2.AUTH_TYPE_BASIC, "query": credentials_pb2.AUTH_TYPE_QUERY}


def _injected(seen: Seen, kind: str) -> list[str]:
    """Every credential value the upstream found in this request, decoded from its injection form."""
    if kind == "bearer":
        return [v.removeprefix("Bearer ") for v in seen.header("Authorization")]
    if kind == "basic":
        return [base64.b64decode(v.removeprefix("Basic ")).decode() for v in seen.header("Authorization")]
    if kind == "header":
        return seen.header("X-Secret-Key")
    return [v for k, v in parse_qsl(seen.query) if k == "key"]


def test_100_agents_each_reach_the_upstream_with_their_own_secret() -> None:
    world = GateWorld.start()
    try:
        up = world.upstream()
        owned = {i: ("u:" if KINDS[i % len(KINDS)] == "basic" else "") + f"sk-agent{i:03d}-{secrets.token_hex(12)}"
                 for i in range(AGENTS)}
        # Bulk setup through aegisctl's own client over the control socket: 300 aegisctl processes
        # would cost a minute; the CLI verbs themselves are covered by the other gate tests.
        with AegisClient(world.aegis.socket) as client:
            for i, secret in owned.items():
                kind = KINDS[i % len(KINDS)]
                client.call(client.credentials.AddCredential, credentials_pb2.AddCredentialRequest(
                    name=f"c{i:03d}", service=f"s{i:03d}", domains=[up.entry()], auth_type=AUTH_TYPES[kind],
                    header_name="X-Secret-Key" if kind == "header" else "",
                    query_param="key" if kind == "query" else "", scopes=["*"], secret=secret))
                reply = client.call(client.agents.AddAgent, agents_pb2.AddAgentRequest(name=f"a{i:03d}"))
                world.tokens[f"a{i:03d}"] = reply.token
                client.call(client.agents.Grant, agents_pb2.GrantRequest(agent=f"a{i:03d}", credential=f"c{i:03d}"))
        world.secrets += owned.values()
        world.secrets += [base64.b64encode(s.encode()).decode() for s in owned.values()]

        async def one(session: aiohttp.ClientSession, i: int) -> tuple[int, int, str]:
            headers = {"X-Aegis-Agent": world.tokens[f"a{i:03d}"], "Authorization": f"Bearer agent-guess-{i}"}
            async with session.post(f"{world.aegis.gate_url}/s{i:03d}/echo/who/{i}", headers=headers,
                                    data=f"from {i}".encode()) as resp:
                body = await resp.read()
                world.received.append(body.decode())
                return i, resp.status, resp.headers["X-Aegis-Request-Id"]

        async def run() -> list[tuple[int, int, str]]:
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                return await asyncio.gather(*(one(session, i) for i in range(AGENTS)))

        results = asyncio.run(run())
        assert [status for _, status, _ in results] == [200] * AGENTS
        seen = {int(s.path.rsplit("/", 1)[1]): s for s in up.requests_to("/echo/who/")}
        assert sorted(seen) == list(range(AGENTS))
        for i, request in seen.items():
            kind = KINDS[i % len(KINDS)]
            assert _injected(request, kind) == [owned[i]], (i, kind)
            assert request.body == f"from {i}".encode()
            wire = request.query + "".join(f"{k}:{v}" for k, v in request.headers)
            others = [j for j, secret in owned.items() if j != i and secret in wire]
            assert others == [], f"agent {i}'s request carried the secrets of {others}"
        rows = world.ledger()
        for i, status, request_id in results:
            row = world.row(request_id, rows)
            assert (row["agent"], row["credential"], row["service"], row["status"]) == \
                (f"a{i:03d}", f"c{i:03d}", f"s{i:03d}", status)
        world.assert_no_leaks()
    finally:
        world.close()


def test_kill_9_under_load_loses_no_row_of_an_answered_request() -> None:
    """Eight clients hammer the gate (allowed with and without Content-Length, HEAD, refused); aegisd is
    killed right after a response completes. Every request_id a client received in full must be in
    the ledger after a restart."""
    world = GateWorld.start()
    try:
        up = world.upstream()
        world.credential("bear", SECRETS["bear"], up.entry())  # responses re-chunked by redaction
        world.credential("plain", SECRETS["hdr"], up.entry(), "--body-inspection", "off")  # Content-Length kept
        world.credential("private", SECRETS["private"], up.entry())
        world.agent("bot", "bear", "plain")
        token = world.tokens["bot"]
        targets = [("GET", "/plain/echo/k"), ("GET", "/bear/echo/k"), ("GET", "/private/echo/k"),
                   ("HEAD", "/plain/echo/k"), ("GET", "/plain/echo/k")]
        completed: list[tuple[str, str]] = []  # (request_id, target), once the whole response arrived
        kill_after = 400
        assert world.aegis.proc is not None
        proc = world.aegis.proc

        async def client(session: aiohttp.ClientSession, n: int) -> None:
            sent = 0
            while proc.poll() is None:
                method, target = targets[(n + sent) % len(targets)]
                sent += 1
                try:
                    async with session.request(method, f"{world.aegis.gate_url}{target}{n}-{sent}",
                                               headers={"X-Aegis-Agent": token}) as resp:
                        await resp.read()
                        request_id = resp.headers["X-Aegis-Request-Id"]
                except (TimeoutError, aiohttp.ClientError, ConnectionError):
                    return
                completed.append((request_id, f"{method} {target}"))
                if len(completed) >= kill_after and target.startswith("/plain") and proc.poll() is None:
                    proc.kill()  # right after a whole Content-Length (or bodiless HEAD) response arrived

        async def run() -> None:
            timeout = aiohttp.ClientTimeout(total=30)
            async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
                await asyncio.gather(*(client(session, n) for n in range(8)))

        asyncio.run(run())
        assert proc.wait(10) == -9
        world.aegis.proc = None
        assert len(completed) >= kill_after
        world.aegis.start()
        world.unlock()
        logged = {row["request_id"] for row in world.ledger()}
        missing = [(request_id, target) for request_id, target in completed if request_id not in logged]
        assert missing == [], f"{len(missing)} of {len(completed)} answered requests have no ledger row"
        verdict = world.aegis.ctl("ledger", "verify", "--json")
        assert verdict.code == 0 and json.loads(verdict.out)["ok"] is True, verdict.out
        world.assert_no_leaks()
    finally:
        world.close()
