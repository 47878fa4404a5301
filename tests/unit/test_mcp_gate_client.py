"""The MCP bridge's gate client: every failure is a BridgeError with a code, never a bare exception."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from aegisctl.mcp.gate_client import BridgeError, GateClient


async def _echo_server() -> tuple[web.AppRunner, int]:
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


@pytest.mark.parametrize("value", ["a\x1bb", "a\x7fb", "a\x0bb"])
def test_a_header_aiohttp_refuses_is_an_invalid_argument(value: str) -> None:
    """The tools check their arguments first; this is the net under them (aiohttp raises ValueError)."""

    async def scenario() -> None:
        runner, port = await _echo_server()
        try:
            async with GateClient(f"http://127.0.0.1:{port}", "aegis_token") as gate:
                with pytest.raises(BridgeError) as caught:
                    await gate.request("GET", "/api/x", {"X-Bad": value}, None, 1024)
            assert caught.value.code == "invalid_argument"
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


def test_an_answer_head_the_gate_relays_reaches_the_model_whole() -> None:
    """The gate relays heads of up to 64 KiB: a header longer than aiohttp's default 8190 bytes, or more than its
    128 headers, once made the bridge report a delivered answer as gate_unreachable."""
    async def answer(request: web.Request) -> web.Response:
        many = {f"X-N{i}": str(i) for i in range(1000)}
        return web.Response(text="done", headers={"X-Long": "v" * 40_000, **many})

    async def scenario() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            async with GateClient(f"http://127.0.0.1:{runner.addresses[0][1]}", "aegis_token") as gate:
                reply = await gate.request("POST", "/api/x", {}, b"{}", 1024)
            assert (reply.status, reply.body) == (200, b"done")
            assert len(reply.headers["X-Long"]) == 40_000 and reply.headers["X-N999"] == "999"
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


@pytest.mark.parametrize("answer", [b"", b"HTTP/1.1 200 OK\r\nX-Broken\r\n\r\n"])
def test_a_connection_lost_after_the_request_went_is_no_unreachable_gate(answer: bytes) -> None:
    """The request reached the gate (which may have forwarded it) but no answer could be read: the model must not
    be told the gate is down, which invites a retry and a write carried out twice."""
    async def scenario() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        try:
            async with GateClient(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", "aegis_token") as gate:
                with pytest.raises(BridgeError) as caught:
                    await gate.request("POST", "/api/x", {}, None, 1024)
            assert caught.value.code == "outcome_unknown"
            assert "may already have been carried out" in caught.value.message
            assert "aegis_token" not in caught.value.message
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())
