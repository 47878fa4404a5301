"""Response redaction of the secret as the gate put it on the wire, URL-encoded once more, through the real daemon.

Found by a review: query auth sends `quote(secret, safe="")` and basic auth `Basic <base64>`, and redaction knew
only the forms of the secret's value. A login redirect carrying the original URL (Django's `redirect_to_login`:
`?next=` + the path and query, percent-encoded again) gave a query-auth secret back as `%252F...`, and an echo of
the `Authorization` header URL-encoded gave a basic-auth base64 holding `+` or `/` back as `%2B`/`%2F`: the agent
decoded either and had the key."""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, quote_plus, unquote, urlsplit

import pytest
from aiohttp import web

from tests.e2e.gate_support import GateWorld, Reply
from tests.e2e.inspection_support import LeakyUpstream

REDACTED = "[REDACTED]"
QUERY_SECRET = "qry/Secret+value=42xyz-AbCd"  # outside A-Za-z0-9-._~: the gate percent-encodes it
BASIC_SECRET = "svcuser:p>ss?w0rd~Probe/+x1"  # its base64 holds `+`
BASIC_WIRE = base64.b64encode(BASIC_SECRET.encode()).decode()
LOGIN = "/accounts/login/?next="


class LoginRedirects(LeakyUpstream):
    """/account/settings: 302 to the login page with the original URL in `next=` (Django's `redirect_to_login`,
    `quote(path, safe="/")`), in Location and in the body; ?stream=1: the body chunked, cut inside the echo.
    /echo-auth: the Authorization header URL-encoded in the body (`quote`, lower-case hex) and in a header
    (`quote_plus`), as a form-encoded echo service writes it."""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/account/settings":
            self._record(request, await request.read())
            location = LOGIN + quote(request.raw_path, safe="/")
            body = f"Redirecting to {location}\n".encode()
            if request.query.get("stream") != "1":
                return web.Response(status=302, headers={"Location": location}, body=body)
            response = web.StreamResponse(status=302, headers={"Location": location})  # chunked
            await response.prepare(request)
            cut = body.index(b"%252F") + 3
            await response.write(body[:cut])
            await asyncio.sleep(0.05)
            await response.write(body[cut:])
            await response.write_eof()
            return response
        if request.path == "/echo-auth":
            self._record(request, await request.read())
            auth = request.headers.get("Authorization", "")
            lower = re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), quote(auth, safe=""))
            return web.Response(text=f"auth={quote(auth, safe='')}&lower={lower}&kept=1",
                                headers={"X-Echo": quote_plus(auth)},
                                content_type="application/x-www-form-urlencoded")
        return await super()._handle(request)


@dataclass
class Wire:
    world: GateWorld
    up: LoginRedirects


@pytest.fixture(scope="module")
def wire() -> Iterator[Wire]:
    world = GateWorld.start()
    try:
        up = LoginRedirects()
        world.upstreams.append(up)
        up.start()
        world.credential("qry", QUERY_SECRET, up.entry(), "--auth-type", "query", "--query-param", "api_key")
        world.credential("bas", BASIC_SECRET, up.entry(), "--auth-type", "basic")
        sent = quote(QUERY_SECRET, safe="")
        # The echoes the upstream sends are needles too: none may reach the agent, the log or the ledger.
        world.secrets += [quote(sent, safe=""), quote(BASIC_WIRE, safe=""), quote_plus(BASIC_WIRE),
                          quote(BASIC_WIRE, safe="").lower(), BASIC_SECRET.split(":", 1)[1]]
        world.agent("bot", "qry", "bas")
        yield Wire(world, up)
    finally:
        world.close()


def _decoded_layers(text: str) -> list[str]:
    """`text` and each layer of it percent-decoded (`+` as space too), as the agent can read it."""
    layers = [text]
    for _ in range(4):
        layers += [unquote(layers[-1]), unquote(layers[-1].replace("+", " "))]
    return layers


def _assert_undecodable(text: str) -> None:
    """Neither secret, nor the basic-auth base64, in `text` however many times it is percent-decoded, nor in any
    base64 token of it decoded."""
    for layer in _decoded_layers(text):
        assert QUERY_SECRET not in layer and BASIC_SECRET not in layer and BASIC_WIRE not in layer, layer
        assert BASIC_SECRET.split(":", 1)[1] not in layer, layer
        for token in re.findall(r"[A-Za-z0-9+/]{16,}={0,2}", layer):
            try:
                decoded = base64.b64decode(token + "=" * (-len(token) % 4))
            except (binascii.Error, ValueError):
                continue
            assert BASIC_SECRET.encode() not in decoded, layer


def _row_flags(world: GateWorld, reply: Reply, credential: str) -> tuple[object, object]:
    row = world.row(reply.request_id, world.ledger("--credential", credential))
    return row["decision"], row["flags"]


@pytest.mark.parametrize("stream", ["0", "1"])
def test_a_login_redirect_carrying_the_query_secret_in_next_is_redacted(wire: Wire, stream: str) -> None:
    world = wire.world
    target = "/qry/account/settings" + ("?stream=1" if stream == "1" else "")
    reply = world.call("GET", target, agent="bot")
    assert reply.status == 302, reply.text()
    # The upstream did get the credential, and what it sent back is otherwise intact.
    assert parse_qs(wire.up.requests_to("/account/settings")[-1].query)["api_key"] == [QUERY_SECRET]
    query = "stream%3D1%26" if stream == "1" else ""
    expected = f"{LOGIN}/account/settings%3F{query}api_key%3D{REDACTED}"
    assert reply.header("Location") == expected
    assert reply.body == f"Redirecting to {expected}\n".encode()
    # The agent follows next= as a browser would: what it reads back is the marker, not the key.
    nxt = parse_qs(urlsplit(reply.header("Location") or "").query)["next"][0]
    assert parse_qs(urlsplit(nxt).query)["api_key"] == [REDACTED]
    _assert_undecodable(reply.header("Location") or "")
    _assert_undecodable(reply.text())
    assert _row_flags(world, reply, "qry") == ("allowed", "response_redacted")
    world.assert_no_leaks()


def test_the_basic_auth_header_echoed_url_encoded_is_redacted(wire: Wire) -> None:
    world = wire.world
    reply = world.call("GET", "/bas/echo-auth", agent="bot")
    assert reply.status == 200, reply.text()
    assert reply.body == f"auth=Basic%20{REDACTED}&lower=Basic%20{REDACTED}&kept=1".encode()
    assert reply.header("X-Echo") == f"Basic+{REDACTED}"
    assert reply.header("Content-Length") == str(len(reply.body))
    _assert_undecodable(reply.text())
    _assert_undecodable(reply.header("X-Echo") or "")
    assert _row_flags(world, reply, "bas") == ("allowed", "response_redacted")
    world.assert_no_leaks()
