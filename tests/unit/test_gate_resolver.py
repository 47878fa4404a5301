"""The SSRF guard in the gate's upstream pool, with a real local server and DNS as the test wants it.

The end-to-end test (tests/e2e/test_gate_routing.py) needs a host name that this machine resolves to
loopback, which not every machine has; here a fixed resolver stands in for DNS answering with chosen
addresses (the pool's only seam), so the guard is proved everywhere: a name resolving only to internal
addresses is refused before any connection, a mixed answer keeps only the public addresses, and an
entry that names an internal place on purpose connects to the address that was checked.
"""

from __future__ import annotations

import asyncio

import pytest
from multidict import CIMultiDict

from aegisd.gate.upstream import AddressNotAllowed, UpstreamPool
from tests.upstreams import Upstream


def pool_resolving_to(*addresses: str) -> tuple[UpstreamPool, list[str]]:
    """A pool whose DNS answers `addresses` for every name; the list collects what it was asked."""
    asked: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        return list(addresses)

    return UpstreamPool(resolver=resolve), asked


async def get(pool: UpstreamPool, host: str, port: int, path: str, allow_internal: bool) -> tuple[int, bytes]:
    response = await pool.request("GET", "http", host, port, path, CIMultiDict({"Host": f"{host}:{port}"}), None,
                                  allow_internal=allow_internal, credential="c")
    try:
        return response.status, await response.read()
    finally:
        response.release()
        await pool.close()


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "100.64.0.1",
                                     "0.0.0.0", "64:ff9b::a9fe:a9fe", "2002:7f00:1::1", "::127.0.0.1", "fec0::1"])
def test_internal_only_answers_are_refused(address: str) -> None:
    pool, asked = pool_resolving_to(address)
    with pytest.raises(AddressNotAllowed) as refused:
        asyncio.run(get(pool, "api.example.com", 443, "/", allow_internal=False))
    assert (refused.value.status, refused.value.code) == (403, "address_not_allowed")
    assert "api.example.com resolves only to internal addresses" in str(refused.value)
    assert asked == ["api.example.com"]


def test_a_name_resolving_to_loopback_never_gets_a_connection() -> None:
    with Upstream() as up:
        pool, _ = pool_resolving_to("127.0.0.1")
        with pytest.raises(AddressNotAllowed):
            asyncio.run(get(pool, "rebind.example", up.port, "/echo/ssrf", allow_internal=False))
        assert up.contacts() == (0, 0)


def test_mixed_answers_dial_only_the_public_addresses() -> None:
    """127.0.0.1 (where a server listens) is dropped; the one public address left is all that is dialled."""
    with Upstream() as up:
        pool, _ = pool_resolving_to("127.0.0.1", "93.184.216.34")  # public; unreachable here (or not listening)
        pool.connect_timeout = 0.5
        with pytest.raises(Exception) as failed:
            asyncio.run(get(pool, "mixed.example", up.port, "/echo/mixed", allow_internal=False))
        assert getattr(failed.value, "code", None) in ("upstream_error", "upstream_timeout")
        assert up.contacts() == (0, 0)


def test_an_internal_entry_connects_to_the_checked_address() -> None:
    with Upstream() as up:
        pool, _ = pool_resolving_to("127.0.0.1")
        status, _ = asyncio.run(get(pool, "internal.example", up.port, "/echo/inside", allow_internal=True))
        assert status == 200
        (seen,) = up.requests
        assert seen.header("Host") == [f"internal.example:{up.port}"]
