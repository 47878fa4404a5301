"""The SSRF guard in the gate's resolver, with a real aiohttp connector and a real local server.

The end-to-end test (tests/e2e/test_gate_routing.py) needs a host name that this machine resolves to
loopback, which not every machine has; here a tiny resolver stands in for DNS answering with chosen
addresses, so the guard is proved everywhere: a name resolving only to internal addresses is refused
before any connection, a mixed answer keeps only the public addresses, and an entry that names an
internal place on purpose connects to the address that was checked.
"""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest
from aiohttp.abc import ResolveResult
from aiohttp.resolver import ThreadedResolver

from aegisd.gate.upstream import AddressNotAllowed, GuardedResolver, describe_connect_error
from tests.upstreams import Upstream


class FixedResolver(ThreadedResolver):
    """DNS as the test wants it: every name resolves to these addresses."""

    def __init__(self, *addresses: str) -> None:
        super().__init__()
        self.addresses = addresses

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        return [ResolveResult(hostname=host, host=address, port=port, family=socket.AF_INET, proto=0,
                              flags=socket.AI_NUMERICHOST) for address in self.addresses]


def guarded(allow_internal: bool, *addresses: str) -> GuardedResolver:
    resolver = GuardedResolver(allow_internal)
    resolver._inner = FixedResolver(*addresses)  # the only seam: DNS itself
    return resolver


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "100.64.0.1",
                                     "0.0.0.0"])
def test_internal_only_answers_are_refused(address: str) -> None:
    async def run() -> None:
        with pytest.raises(AddressNotAllowed):
            await guarded(False, address).resolve("api.example.com", 443)

    asyncio.run(run())


def test_mixed_answers_keep_only_public_addresses() -> None:
    async def run() -> list[str]:
        results = await guarded(False, "127.0.0.1", "93.184.216.34", "10.0.0.1").resolve("api.example.com", 443)
        return [r["host"] for r in results]

    assert asyncio.run(run()) == ["93.184.216.34"]


def test_a_name_resolving_to_loopback_never_gets_a_connection() -> None:
    with Upstream() as up:
        async def run() -> tuple[int, str, str]:
            connector = aiohttp.TCPConnector(resolver=guarded(False, "127.0.0.1"))
            async with aiohttp.ClientSession(connector=connector) as session:
                try:
                    await session.get(f"http://rebind.example:{up.port}/echo/ssrf")
                except aiohttp.ClientConnectorError as exc:
                    return describe_connect_error(exc)
            raise AssertionError("the guarded connector reached a loopback address")

        status, code, _ = asyncio.run(run())
        assert (status, code) == (403, "address_not_allowed")
        assert up.contacts() == (0, 0)


def test_an_internal_entry_connects_to_the_checked_address() -> None:
    with Upstream() as up:
        async def run() -> int:
            connector = aiohttp.TCPConnector(resolver=guarded(True, "127.0.0.1"))
            async with aiohttp.ClientSession(connector=connector) as session, \
                    session.get(f"http://internal.example:{up.port}/echo/inside") as resp:
                await resp.read()
                return resp.status

        assert asyncio.run(run()) == 200
        (seen,) = up.requests
        assert seen.header("Host") == [f"internal.example:{up.port}"]
