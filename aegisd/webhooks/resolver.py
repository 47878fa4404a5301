"""Name lookups for webhook deliveries on threads of their own.

aiohttp's default resolver runs getaddrinfo through the event loop (on its default executor; under uvloop, on
libuv's pool of 4 threads), as the gate looks up its upstreams: a few webhook hosts with slow DNS would hold every
thread there and make agents' requests wait. This one runs them on a small pool that only webhooks use, so slow DNS
for a webhook delays only webhooks. aiohttp looks each host up once however many deliveries wait for it, so the
pool's size is how many slow hosts can be waited on at once before another webhook's lookup queues behind them (each
attempt's `timeout` still bounds that wait). Imported with aiohttp, on the first delivery.
"""

from __future__ import annotations

import asyncio
import socket
from concurrent.futures import ThreadPoolExecutor

from aiohttp.abc import AbstractResolver, ResolveResult

THREADS = 4  # made only as lookups overlap
_ADDRCONFIG = socket.AI_ADDRCONFIG & getattr(socket, "AI_MASK", -1)  # as aiohttp sets it


class PooledResolver(AbstractResolver):
    """aiohttp's ThreadedResolver, on a pool of its own; `close` lets the pool's threads go."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="aegis-webhook-dns")

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, _lookup, host, port, family)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _lookup(host: str, port: int, family: socket.AddressFamily) -> list[ResolveResult]:
    """getaddrinfo's addresses as aiohttp wants them; a link-local IPv6 address keeps its scope (`fe80::1%eth0`)."""
    found: list[ResolveResult] = []
    for kind, _, proto, _, address in socket.getaddrinfo(host, port, family, socket.SOCK_STREAM,
                                                          flags=_ADDRCONFIG):
        if kind == socket.AF_INET6 and len(address) == 4 and address[3]:
            name, service = socket.getnameinfo(address, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
            address = (name, int(service))
        found.append(ResolveResult(hostname=host, host=str(address[0]), port=int(address[1]), family=kind,
                                   proto=proto, flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV))
    return found
