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
