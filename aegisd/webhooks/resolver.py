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
import contextlib
import socket
import threading

from aiohttp.abc import AbstractResolver, ResolveResult

THREADS = 4  # lookups at once; each on a thread of its own, started for it
_ADDRCONFIG = socket.AI_ADDRCONFIG & getattr(socket, "AI_MASK", -1)  # as aiohttp sets it


class PooledResolver(AbstractResolver):
    """aiohttp's ThreadedResolver on threads of its own, at most THREADS at once.

    Daemon threads, not a ThreadPoolExecutor: the interpreter joins an executor's threads at exit, so a lookup
    stuck on unreachable DNS (glibc retries for tens of seconds) would hold up aegisd's stop after everything else
    was done; a daemon thread's lookup is abandoned with the process."""

    def __init__(self) -> None:
        self._slots: asyncio.Semaphore | None = None  # made on the loop that first resolves

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if self._slots is None:
            self._slots = asyncio.Semaphore(THREADS)
        slots = self._slots
        await slots.acquire()  # let go when the lookup ends, not when a delivery stops waiting for it
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[list[ResolveResult]] = loop.create_future()
        try:
            threading.Thread(target=_lookup_into, args=(loop, answer, slots, host, port, family), daemon=True,
                             name="aegis-webhook-dns").start()
        except BaseException:
            slots.release()
            raise
        return await answer

    async def close(self) -> None:
        """Nothing to let go: a lookup still running ends on its own, and its answer is dropped."""


def _lookup_into(loop: asyncio.AbstractEventLoop, answer: asyncio.Future[list[ResolveResult]],
                 slots: asyncio.Semaphore, host: str, port: int, family: socket.AddressFamily) -> None:
    """The thread: look up, then hand the addresses (or the error) to the loop, and its slot back."""
    try:
        found, error = _lookup(host, port, family), None
    except Exception as exc:  # a gaierror, mostly: the awaiting delivery raises it
        found, error = [], exc
    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (aegisd stopping): nobody waits
        loop.call_soon_threadsafe(_settle, answer, slots, found, error)


def _settle(answer: asyncio.Future[list[ResolveResult]], slots: asyncio.Semaphore, found: list[ResolveResult],
            error: Exception | None) -> None:
    slots.release()
    if answer.done():  # the delivery gave up waiting (its timeout, or a close)
        return
    if error is not None:
        answer.set_exception(error)
    else:
        answer.set_result(found)


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
