"""Streaming through the gate, proved by ordering rather than timing: the upstream sends part of a
response and then waits for a gate the test opens only after the client has read that part. A gate
that buffered the response would deadlock here, and the client's read would fail its deadline."""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp
import pytest

from tests.e2e.gate_support import SECRETS, Standard, shared_standard
from tests.upstreams import pattern

DEADLINE = 20.0  # only to turn a deadlock into a failure; nothing asserts how long anything took
BIG = 20 * 1024 * 1024


@pytest.fixture
def std() -> Standard:
    """The shared world, plus `plain`: a bearer credential on the same upstream with inspection off."""
    instance = shared_standard()
    world = instance.world
    if "plain" not in world.tokens:
        world.credential("plain", "sk-plain-secret-S1S2S3", instance.up.entry(), "--body-inspection", "off")
        world.agent("plain", "plain")
    return instance


@pytest.mark.parametrize("service", ["bear", "plain"])
def test_sse_first_event_arrives_while_the_upstream_holds_the_rest(std: Standard, service: str) -> None:
    world, up = std.world, std.up
    gate = f"sse-{service}"

    async def run() -> tuple[int, str, bytes, bool, bytes, str]:
        async with aiohttp.ClientSession() as session:
            headers = {"X-Aegis-Agent": world.tokens["bot" if service == "bear" else "plain"]}
            async with session.get(f"{world.aegis.gate_url}/{service}/sse?gate={gate}", headers=headers) as resp:
                first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), DEADLINE)
                held = not up.was_released(gate)  # the upstream has not sent the rest yet
                up.release(gate)
                rest = await asyncio.wait_for(resp.content.read(), DEADLINE)
                return resp.status, resp.headers["Content-Type"], first, held, rest, resp.headers[
                    "X-Aegis-Request-Id"]

    try:
        status, content_type, first, held, rest, request_id = asyncio.run(run())
    finally:
        up.release(gate)
    assert (status, content_type) == (200, "text/event-stream")
    assert first == b"event: message\ndata: first\n\n"
    assert held
    assert rest == b"data: second\n\ndata: [DONE]\n\n"
    assert up.was_released(gate)
    row = world.row(request_id)
    assert (row["decision"], row["status"], row["bytes_out"]) == ("allowed", 200, len(first) + len(rest))
    world.received.append((first + rest).decode())
    world.assert_no_leaks()


@pytest.mark.parametrize(("service", "length"), [("bear", False), ("bear", True), ("plain", False),
                                                 ("plain", True)])
def test_large_response_streams_through(std: Standard, service: str, length: bool) -> None:
    """20 MiB (far over max_body_bytes, which bounds requests only): the first half, but for what redaction holds
    back of its end, reaches the client while the upstream still holds the second half back."""
    world, up = std.world, std.up
    gate = f"big-{service}-{length}"
    half = BIG // 2
    target = f"/{service}/stream?bytes={BIG}&hold_at={half}&gate={gate}" + ("&length=1" if length else "")

    async def run() -> tuple[int, bool, str, str, int]:
        digest = hashlib.sha256()
        async with aiohttp.ClientSession() as session:
            headers = {"X-Aegis-Agent": world.tokens["bot" if service == "bear" else "plain"]}
            async with session.get(world.aegis.gate_url + target, headers=headers) as resp:
                # Redaction holds back the end of a chunk until the next one (the run after its last whitespace,
                # a few hundred bytes at most for these secrets): all but that arrives while the upstream waits.
                first = half - 4096
                digest.update(await asyncio.wait_for(resp.content.readexactly(first), DEADLINE))
                held = not up.was_released(gate)
                up.release(gate)
                received = first
                while chunk := await asyncio.wait_for(resp.content.read(1 << 20), DEADLINE):
                    digest.update(chunk)
                    received += len(chunk)
                return resp.status, held, digest.hexdigest(), resp.headers["X-Aegis-Request-Id"], received

    try:
        status, held, hexdigest, request_id, received = asyncio.run(run())
    finally:
        up.release(gate)
    assert status == 200 and held
    assert received == BIG
    assert hexdigest == hashlib.sha256(pattern(BIG)).hexdigest()
    row = world.row(request_id)
    assert (row["decision"], row["status"], row["bytes_out"]) == ("allowed", 200, BIG)
    assert SECRETS["bear"] not in row.values()
    world.assert_no_leaks()
