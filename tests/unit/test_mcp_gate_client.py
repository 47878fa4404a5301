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


class _SlowConnection:
    """An aiohttp stream writer as PacedBody sees it: write() waits, as aiohttp's does, once more than 64 KiB is
    buffered, until less than 16 KiB is; the buffer drains by `step` bytes every 50 ms (a gate reading steadily,
    or, with step 0, one that stopped)."""

    def __init__(self, step: int) -> None:
        self.transport = self
        self.buffered = self.sent = 0
        self._step = step

    def get_write_buffer_size(self) -> int:
        return self.buffered

    async def drain_forever(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            moved = min(self._step, self.buffered)
            self.buffered -= moved
            self.sent += moved

    async def write(self, data: bytes) -> None:
        self.buffered += len(data)
        if self.buffered > 64 * 1024:
            while self.buffered >= 16 * 1024:
                await asyncio.sleep(0.01)


@pytest.mark.parametrize(("step", "finishes"), [(8 * 1024, True), (0, False)])
def test_an_upload_is_timed_by_its_progress_not_by_its_pieces(step: int, finishes: bool) -> None:
    """Found by a review: the send deadline moved only when a 64 KiB piece was handed over, but one piece's wait
    covers the buffer draining from 64 KiB to 16 KiB, so a gate reading steadily (160 KiB/s here) slower than
    that per read timeout (0.3 s) failed as gate_timeout. Bytes leaving the buffer now count as progress; a gate
    that reads nothing still ends the upload at the deadline."""
    from aegisctl.mcp.gate_client import PacedBody, SendDeadline

    async def scenario() -> bool:
        connection = _SlowConnection(step)
        draining = asyncio.ensure_future(connection.drain_forever())
        try:
            async with asyncio.timeout(None) as deadline:
                await PacedBody(b"y" * 256 * 1024, SendDeadline(deadline, 0.3)).write(connection)  # type: ignore[arg-type]
        except TimeoutError:
            return False
        finally:
            draining.cancel()
        return True

    assert asyncio.run(asyncio.wait_for(scenario(), 30)) is finishes
