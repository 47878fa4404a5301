"""Name lookups for webhook deliveries on threads of their own.

aiohttp's default resolver runs getaddrinfo through the event loop (on its default executor; under uvloop, on
libuv's pool of 4 threads), as the gate looks up its upstreams: a few webhook hosts with slow DNS would hold every
thread there and make agents' requests wait. This one runs them on a small pool that only webhooks use, so slow DNS
for a webhook delays only webhooks. aiohttp looks each host up once however many deliveries wait for it, so the
pool's size is how many slow hosts can be waited on at once before another webhook's lookup queues behind them (each
attempt's `timeout` still bounds that wait). Imported with aiohttp, on the first delivery.

It also keeps deliveries off aegisd's own gate, where each would be refused and raise another alert without end.
`webhook add` refuses a URL whose host is or resolves to the gate's listen address, but a name can resolve elsewhere
at each delivery (DNS, /etc/hosts, rebinding) and the gate can be restarted on another address, so the addresses a
connection would use are checked here, as they are looked up for it: the gate's are dropped, and a host left with
none fails its attempt with PointsAtGate.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading

from aiohttp.abc import AbstractResolver, ResolveResult

from aegisd.webhooks.registry import reaches_gate

THREADS = 4  # lookups at once; each on a thread of its own, started for it
_ADDRCONFIG = socket.AI_ADDRCONFIG & getattr(socket, "AI_MASK", -1)  # as aiohttp sets it
GATE_REFUSAL = "points at aegisd's gate"  # the attempt's error: fixed, naming neither the host nor its addresses


class PointsAtGate(OSError):
    """Every address a webhook's host resolved to is the gate's own (at the URL's port). An OSError, as a failed
    lookup is, so that aiohttp hands it to the delivery (as a ClientConnectorError's os_error), which gives up."""

    def __init__(self) -> None:
        super().__init__(GATE_REFUSAL)


class PooledResolver(AbstractResolver):
    """aiohttp's ThreadedResolver on threads of its own, at most THREADS at once.

    Daemon threads, not a ThreadPoolExecutor: the interpreter joins an executor's threads at exit, so a lookup
    stuck on unreachable DNS (glibc retries for tens of seconds) would hold up aegisd's stop after everything else
    was done; a daemon thread's lookup is abandoned with the process."""

    def __init__(self, gate: tuple[str, int] | None = None) -> None:
        """`gate`: the gate's listen address (host, port), whose addresses no lookup hands out."""
        self._slots: asyncio.Semaphore | None = None  # made on the loop that first resolves
        self._gate = gate

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if self._slots is None:
            self._slots = asyncio.Semaphore(THREADS)
        slots = self._slots
        await slots.acquire()  # let go when the lookup ends, not when a delivery stops waiting for it
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[list[ResolveResult]] = loop.create_future()
        try:
            threading.Thread(target=_lookup_into, args=(loop, answer, slots, host, port, family, self._gate),
                             daemon=True, name="aegis-webhook-dns").start()
        except BaseException:
            slots.release()
            raise
        return await answer

    async def close(self) -> None:
        """Nothing to let go: a lookup still running ends on its own, and its answer is dropped."""


def _lookup_into(loop: asyncio.AbstractEventLoop, answer: asyncio.Future[list[ResolveResult]],
                 slots: asyncio.Semaphore, host: str, port: int, family: socket.AddressFamily,
                 gate: tuple[str, int] | None) -> None:
    """The thread: look up, then hand the addresses (or the error) to the loop, and its slot back."""
    try:
        found, error = _lookup(host, port, family, gate), None
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


def _lookup(host: str, port: int, family: socket.AddressFamily,
            gate: tuple[str, int] | None = None) -> list[ResolveResult]:
    """getaddrinfo's addresses as aiohttp wants them; a link-local IPv6 address keeps its scope (`fe80::1%eth0`).
    Those that reach `gate` are left out, checked as they are, at the port they would be connected to, so that
    no name, however it resolves at this delivery, leads to the gate; PointsAtGate if none is left."""
    found: list[ResolveResult] = []
    for kind, _, proto, _, address in socket.getaddrinfo(host, port, family, socket.SOCK_STREAM,
                                                          flags=_ADDRCONFIG):
        if kind == socket.AF_INET6 and len(address) == 4 and address[3]:
            name, service = socket.getnameinfo(address, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
            address = (name, int(service))
        found.append(ResolveResult(hostname=host, host=str(address[0]), port=int(address[1]), family=kind,
                                   proto=proto, flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV))
    if gate is None:
        return found
    kept = [result for result in found if not reaches_gate(result["host"], result["port"], *gate)]
    if found and not kept:
        raise PointsAtGate()
    return kept
