"""Webhook delivery: a lane per webhook, one bound over them all, retries with backoff, never in the gate's way.

The gate only calls `emit`, which fans an event out to the subscribed webhooks without waiting. Each webhook has
its own lane: a FIFO of its queued deliveries and at most `webhook_workers` attempts of its own on the wire, so a
receiver that accepts and never answers delays only its own deliveries; another webhook's alert starts at once.
A lane is made for a webhook's first delivery and forgotten once it is empty and idle.

`queue_size` is shared equally among the webhooks: each may hold queue_size / N deliveries (N webhooks), queued
and waiting for a retry together. Past its part the oldest of its deliveries waiting for a retry is dropped to make
room, or, if none waits, the new one; so a slow or dead receiver costs the gate nothing, aegisd's memory stays
bounded, and a receiver that never answers can fill only its own part. Within each webhook's part, events raised by
requests that named no agent (anyone who can reach the gate can send those) may hold only a quarter, and so may one
event raised by one agent's requests, so they can never crowd out another alert for that webhook. A failed attempt
is retried later from a timer, not by a waiting attempt, so a receiver that fails fast does not hold up its own lane
either."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from aegisd import __version__
from aegisd.config import Config
from aegisd.gate.upstream import tls_context
from aegisd.ledger.entry import iso_time, now_ms
from aegisd.logs import event as log_event
from aegisd.webhooks.events import TEST_EVENT
from aegisd.webhooks.registry import Target, reaches_gate

if TYPE_CHECKING:  # imported on the first delivery: a daemon without webhooks never loads aiohttp (~14 MiB)
    import aiohttp

    from aegisd.webhooks.resolver import PooledResolver

log = logging.getLogger("aegisd.webhooks")
K = TypeVar("K")
MAX_RETRY_DELAY = 300.0
# Worth another attempt: the receiver is overloaded, rate limiting, or briefly broken.
RETRY_STATUSES = frozenset({408, 425, 429})
TEST_DETAILS = {"message": "a test delivery from `aegisctl webhook test`"}
# A webhook's deliveries of events raised by requests that named no agent may hold this share of its part at most.
UNAUTHENTICATED_SHARE = 4  # one in four
# A webhook's deliveries of one event raised by one agent's requests may hold this share of its part at most, so
# that an agent flooding refusals (they come before rate limits) cannot crowd out its own later alert of another kind
# (the body_inspection of an exfiltration), another agent's, or the daemon's own. Both are counted per webhook, within
# its own part: counted over all of them, a receiver that never answers would hold the share and keep that event
# from the others; counted per webhook against the whole bound, a flood to four webhooks would fill it.
AGENT_SHARE = 4  # one in four
DROP_SUMMARY_SECONDS = 5.0  # after a first drop, one line says how many more were dropped meanwhile


@dataclass(slots=True)
class Delivery:
    """One event for one webhook; the body is built once, so every retry sends the same bytes."""

    target: Target
    event: str
    details: dict[str, Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    time_ms: int = field(default_factory=now_ms)
    attempts: int = 0
    body: bytes = b""
    generation: int = -1  # of its target when queued; see Dispatcher.set_targets
    unauthenticated: bool = False  # raised by a request that named no agent: held within their share
    agent: str = ""  # the agent whose request raised it: held within that agent's share for this event
    delivered: bool = False  # a receiver answered 2xx
    # Told (webhook id, delivered) once, when the delivery is done with: delivered, given up, dropped, or gone with
    # its webhook or the vault's key. Lets the expiry watch count an alert as sent only once a receiver has it.
    on_done: Callable[[str, bool], None] | None = None

    def payload(self) -> bytes:
        if not self.body:
            self.body = json.dumps({"event": self.event, "id": self.id, "time": iso_time(self.time_ms),
                                    "details": self.details}, separators=(",", ":")).encode()
        return self.body


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one POST came to: a 2xx status, another status, or no answer at all."""

    status: int
    error: str
    duration_ms: float
    final: bool = False  # not sent, and no later attempt would be (it would reach the gate): never retried

    @property
    def delivered(self) -> bool:
        return 200 <= self.status < 300

    @property
    def retryable(self) -> bool:
        return not self.final and (self.status == 0 or self.status >= 500 or self.status in RETRY_STATUSES)


@dataclass(slots=True)
class Lane:
    """One webhook's share of the sending: its deliveries in the order raised, and how many of its attempts are on
    the wire (at most `webhook_workers`). Lanes keep webhooks from waiting on each other's receivers."""

    queued: deque[Delivery] = field(default_factory=deque)
    sending: int = 0


def signature(secret: bytes, body: bytes) -> str:
    """The X-Aegis-Signature value: HMAC-SHA256 of the exact body bytes, hex, with its algorithm."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class Dispatcher:
    """Owns the lanes, the retry timers and the HTTP client. Use from the daemon's event loop."""

    def __init__(self, config: Config) -> None:
        self._config = config
        # The gate's listen address, which no delivery may connect to (see _post). Fixed for the daemon's life: a
        # SIGHUP applies no [gate] setting (daemon.APPLIED_ON_RELOAD), a new listen address needs a restart.
        self._gate = (config.gate_host, config.gate_port)
        # By webhook id. Unbounded themselves: _hold keeps each webhook's queued deliveries and retries, together,
        # within its part of queue_size; a lane is dropped when empty and idle, so there are no more of them.
        self._lanes: dict[str, Lane] = {}
        self._queued = 0  # in every lane
        self._bound = config.webhook_queue_size
        self._held: dict[str, int] = {}  # by webhook: its deliveries queued or waiting for a retry
        self._part = self._bound  # each webhook's part of the bound: set_targets divides it among them
        self._unauthenticated: dict[str, int] = {}  # by webhook: such deliveries queued, being sent or retried
        self._by_agent: dict[tuple[str, str, str], int] = {}  # the same per (webhook, agent, event); an entry goes at 0
        self._dropping = 0  # drops since the last summary line
        self._dropping_at: set[str] = set()  # and the webhooks they were for
        self._dropping_since = 0.0
        self._by_event: dict[str, tuple[Target, ...]] = {}
        # The current webhooks' ids, each with the generation it was loaded in: a webhook that goes (removed,
        # or the vault locked) and comes back (unlocked) is a new generation, and what was queued before is not sent.
        self._live: dict[str, int] = {}
        self._generations = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sending: set[asyncio.Task[None]] = set()  # one task an attempt, so that close() can cancel them
        self._retries: dict[asyncio.TimerHandle, Delivery] = {}
        self._session: aiohttp.ClientSession | None = None  # made for the first delivery
        self._resolver: PooledResolver | None = None  # with it
        self._running = False
        self.delivered = self.failed = self.dropped = 0

    # -- what the gate and the control API call ------------------------------------------------

    def set_targets(self, targets: Iterable[Target]) -> None:
        """Swap in the subscriptions whole (safe from any thread: reference assignments). Deliveries queued or
        waiting to retry for a webhook that is gone are dropped, with the URL and signing secret they hold."""
        by_event: dict[str, list[Target]] = {}
        for target in targets:
            for name in target.events:
                by_event.setdefault(name, []).append(target)
        previous = self._live
        live = {target.id: previous.get(target.id, -1) for found in by_event.values() for target in found}
        self._live = {tid: generation if generation >= 0 else next(self._generations)
                      for tid, generation in live.items()}
        part, self._part = self._part, max(1, self._bound // max(1, len(self._live)))
        self._by_event = {name: tuple(found) for name, found in by_event.items()}
        if self._loop is not None and (previous.keys() - self._live.keys() or self._part < part):
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing is left to drop
                self._loop.call_soon_threadsafe(self._drop_stale)

    @property
    def has_subscribers(self) -> bool:
        return bool(self._by_event)

    def wants(self, event: str) -> bool:
        return event in self._by_event

    def subscribers(self, event: str) -> tuple[str, ...]:
        """The ids of the webhooks subscribed to `event` now."""
        return tuple(target.id for target in self._by_event.get(event, ()))

    def emit(self, event: str, details: dict[str, Any], *, unauthenticated: bool = False, agent: str = "",
             only: Collection[str] | None = None, on_done: Callable[[str, bool], None] | None = None) -> None:
        """Queue `event` for every webhook subscribed to it; never waits, counts what does not fit.
        `unauthenticated`: raised by a request that named no agent, held within that share of the queue;
        `agent`: raised by that agent's request, held within its share; `only`: for these webhooks (ids) alone;
        `on_done`: told each delivery's webhook and whether it was delivered, once, when it is done with; and told
        (not delivered) of each webhook in `only` no longer subscribed (removed, or the vault locked, meanwhile)."""
        offered: set[str] = set()
        for target in self._by_event.get(event, ()):
            if only is None or target.id in only:
                offered.add(target.id)
                self._offer(Delivery(target, event, details, generation=self._live.get(target.id, -1),
                                     unauthenticated=unauthenticated, agent=agent, on_done=on_done))
        if only is not None and on_done is not None:
            for gone in set(only) - offered:
                on_done(gone, False)

    @property
    def queue_depth(self) -> int:
        return self._queued

    @property
    def retries_pending(self) -> int:
        return len(self._retries)

    async def test(self, target: Target) -> tuple[Delivery, Attempt]:
        """One signed test delivery now, without retries, for `aegisctl webhook test`."""
        delivery = Delivery(target, TEST_EVENT, dict(TEST_DETAILS))
        return delivery, await self._post(delivery)

    # -- life ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._running = True
        self._loop = asyncio.get_running_loop()
        self._drop_stale()  # webhooks changed before the start had no loop to do it
        for webhook in list(self._lanes):  # anything emitted before the start
            self._pump(webhook)

    async def close(self) -> None:
        """Stop now: queued and scheduled deliveries are dropped (the ledger keeps the record)."""
        self._running = False  # first: a cancelled attempt's lane starts no other
        for handle, delivery in self._retries.items():
            handle.cancel()
            _finish(delivery)
        self._retries.clear()
        self._loop = None
        sending = list(self._sending)
        for task in sending:
            task.cancel()
        await asyncio.gather(*sending, return_exceptions=True)
        for lane in self._lanes.values():
            for delivery in lane.queued:
                _finish(delivery)
        self._lanes.clear()
        self._queued = 0
        self._held.clear()
        self._unauthenticated.clear()
        self._by_agent.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._resolver is not None:  # the connector closes only a resolver it made itself
            await self._resolver.close()
            self._resolver = None

    # -- internals -------------------------------------------------------------------------------

    def _offer(self, delivery: Delivery) -> None:
        if self._hold(delivery):
            self._lanes.setdefault(delivery.target.id, Lane()).queued.append(delivery)
            self._queued += 1
            self._pump(delivery.target.id)
        else:
            _finish(delivery)

    def _pump(self, webhook: str) -> None:
        """Start the lane's next deliveries while it has fewer than `webhook_workers` on the wire; forget the lane
        once it is empty and idle, so a webhook that goes leaves nothing behind."""
        lane = self._lanes.get(webhook)
        if lane is None:
            return
        while self._running and lane.queued and lane.sending < self._config.webhook_workers:
            delivery = lane.queued.popleft()
            self._queued -= 1
            _add(self._held, webhook, -1)  # on the wire: out of the bound
            lane.sending += 1
            task = asyncio.create_task(self._send(lane, delivery), name=f"aegis-webhook-{webhook}")
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        if not lane.queued and not lane.sending:
            del self._lanes[webhook]

    def _hold(self, delivery: Delivery, in_share: bool = False) -> bool:
        """Whether `delivery` may be queued or wait for a retry: within its webhook's unauthenticated or agent share
        if it is held within one (`in_share`: it holds its place there already), and within its webhook's part of
        the bound, for which the oldest of its deliveries waiting for a retry may make room. One that may not is
        dropped and counted."""
        hook = delivery.target.id
        share = max(1, self._part // UNAUTHENTICATED_SHARE)
        if delivery.unauthenticated and not in_share and self._unauthenticated.get(hook, 0) >= share:
            self._dropped(hook, "the share of events raised without an agent token is full")
            return False
        share = max(1, self._part // AGENT_SHARE)
        if delivery.agent and not in_share and self._by_agent.get((hook, delivery.agent, delivery.event), 0) >= share:
            self._dropped(hook, "the share one event of one agent's requests may hold is full")
            return False
        if self._held.get(hook, 0) >= self._part and not self._make_room(delivery):
            self._dropped(hook, "queue_size reached")
            return False
        _add(self._held, hook, 1)
        if not in_share:
            self._count(delivery, 1)
        return True

    def _make_room(self, delivery: Delivery) -> bool:
        """Drop one of the webhook's deliveries for `delivery` (_victim); events raised without an agent token never
        push one out."""
        if delivery.unauthenticated:
            return False
        victim = self._victim(delivery.target.id, delivery.agent, delivery.event)
        if victim is None:
            return False
        self._evict(victim, "queue_size reached; an older delivery made room")
        return True

    def _victim(self, hook: str, agent: str, event: str) -> Delivery | None:
        """The delivery of webhook `hook` to give way to a new one (`event` of `agent`'s, or the daemon's own), the
        oldest of: those raised without an agent token; else the (agent, event) holding the most beyond its share,
        if not the new one's (a share taken against a larger part, before webhooks were added); else the agent
        holding the most of the part, if more than a share and not `agent` (one agent's flood of several kinds of
        event); else those waiting for a retry (a fresh alert is worth more than another attempt at an old one)."""
        lane = self._lanes.get(hook)
        retrying: list[Delivery] = [waiting for waiting in self._retries.values() if waiting.target.id == hook]
        queued: list[Delivery] = list(lane.queued) if lane is not None else []
        held = sorted([*retrying, *queued], key=lambda d: d.time_ms)
        tokenless = next((d for d in held if d.unauthenticated), None)
        if tokenless is not None:
            return tokenless
        share = max(1, self._part // AGENT_SHARE)
        per_key = Counter((d.agent, d.event) for d in held if d.agent)
        over = [(count, key) for key, count in per_key.items() if count > share and key != (agent, event)]
        if over:
            _, (most, kind) = max(over)
            return next(d for d in held if d.agent == most and d.event == kind)
        per_agent = Counter(d.agent for d in held if d.agent)
        if per_agent:
            most, count = per_agent.most_common(1)[0]
            if most != agent and count > share:
                return next(d for d in held if d.agent == most)
        return min(retrying, key=lambda d: d.time_ms, default=None)

    def _evict(self, delivery: Delivery, why: str) -> None:
        """Drop a delivery held for a retry or queued, counted and logged."""
        handle = next((h for h, waiting in self._retries.items() if waiting is delivery), None)
        if handle is not None:
            handle.cancel()
            self._release(handle)
        else:
            hook = delivery.target.id
            self._lanes[hook].queued.remove(delivery)
            self._queued -= 1
            _add(self._held, hook, -1)
            self._count(delivery, -1)
            self._pump(hook)  # forgets the lane if nothing of it is left
        _finish(delivery)
        self._dropped(delivery.target.id, why)

    def _count(self, delivery: Delivery, change: int) -> None:
        """Count a delivery into (1) or out of (-1) its webhook's share it is held within, if any."""
        if delivery.unauthenticated:
            _add(self._unauthenticated, delivery.target.id, change)
        elif delivery.agent:
            _add(self._by_agent, (delivery.target.id, delivery.agent, delivery.event), change)

    def _release(self, handle: asyncio.TimerHandle) -> Delivery | None:
        """Forget a delivery waiting for a retry (its timer fired or was cancelled)."""
        delivery = self._retries.pop(handle, None)
        if delivery is not None:
            _add(self._held, delivery.target.id, -1)
            self._count(delivery, -1)
        return delivery

    def _dropped(self, webhook: str, why: str) -> None:
        """Count a drop; the first of a run is logged at once, and one line after it says how many followed, and
        for which webhooks (their ids: the URL is a secret)."""
        self.dropped += 1
        self._dropping += 1
        self._dropping_at.add(webhook)
        if self._dropping > 1:
            return
        self._dropping_since = time.monotonic()
        log_event(log, logging.WARNING, "webhook queue full; deliveries dropped", webhook=webhook, why=why,
                  dropped=self.dropped, queue_size=self._bound)
        with contextlib.suppress(RuntimeError):  # no running loop (closing): the counter is the record
            asyncio.get_running_loop().call_later(DROP_SUMMARY_SECONDS, self._summarise_drops)

    def _summarise_drops(self) -> None:
        count, seconds, webhooks = self._dropping, time.monotonic() - self._dropping_since, self._dropping_at
        self._dropping, self._dropping_at = 0, set()
        if count > 1:
            log_event(log, logging.WARNING, "webhook deliveries dropped", count=count, seconds=f"{seconds:.1f}",
                      webhooks=",".join(sorted(webhooks)), dropped=self.dropped, queue_size=self._bound)

    def _current(self, delivery: Delivery) -> bool:
        return self._live.get(delivery.target.id) == delivery.generation

    def _drop_stale(self) -> None:
        """Forget deliveries whose webhook is gone, and fit each webhook's into its part when more webhooks made it
        smaller (in the loop, which owns the lanes and the timers)."""
        for handle, delivery in list(self._retries.items()):
            if not self._current(delivery):
                handle.cancel()
                self._release(handle)
                _finish(delivery)
        for webhook, lane in list(self._lanes.items()):
            stale = [delivery for delivery in lane.queued if not self._current(delivery)]
            for delivery in stale:
                _add(self._held, webhook, -1)
                self._count(delivery, -1)
                _finish(delivery)
            if stale:
                lane.queued = deque(delivery for delivery in lane.queued if self._current(delivery))
                self._queued -= len(stale)
                self._pump(webhook)  # forgets the lane if nothing of it is left
        for webhook in list(self._held):
            while self._held.get(webhook, 0) > self._part:
                over = self._lanes.get(webhook)
                victim = self._victim(webhook, "", "") or (over.queued[0] if over is not None and over.queued else None)
                if victim is None:
                    break
                self._evict(victim, "queue_size's part for each webhook shrank as webhooks were added")

    async def _send(self, lane: Lane, delivery: Delivery) -> None:
        """One attempt of one delivery; then the lane's next one takes its place."""
        retrying = False
        try:
            retrying = await self._attempt(delivery)
        except Exception:
            log.exception("webhook delivery error")
        finally:
            if not retrying:  # done with: its place in its share is free
                self._count(delivery, -1)
                _finish(delivery)
            lane.sending -= 1
            self._pump(delivery.target.id)

    async def _attempt(self, delivery: Delivery) -> bool:
        """One attempt; whether the delivery now waits for a retry."""
        if not self._current(delivery):
            return False  # removed since, or the vault was locked (even if unlocked again): not sent
        delivery.attempts += 1
        result = await self._post(delivery)
        if result.delivered:
            self.delivered += 1
            delivery.delivered = True
            return False
        if not self._current(delivery):  # gone while it was sent (locked, removed): no retry holds its secret
            return False
        fields = {"webhook": delivery.target.id, "event": delivery.event, "delivery": delivery.id,
                  "attempt": delivery.attempts, "status": result.status, "error": result.error}
        if result.retryable and delivery.attempts < self._config.webhook_max_attempts:
            delay = self._backoff(delivery.attempts)
            log_event(log, logging.DEBUG, "webhook delivery failed; retrying", retry_in=f"{delay:.2f}s", **fields)
            if not self._hold(delivery, in_share=True):
                return False  # dropped and counted: queue_size is held by newer deliveries
            loop = asyncio.get_running_loop()
            handle: asyncio.TimerHandle | None = None

            def retry() -> None:
                if handle is not None and self._release(handle) is not None:
                    self._offer(delivery)

            handle = loop.call_later(delay, retry)
            self._retries[handle] = delivery
            return True
        self.failed += 1
        log_event(log, logging.WARNING, "webhook delivery failed", **fields)
        return False

    def _backoff(self, attempts: int) -> float:
        """Exponential with equal jitter: half the step fixed, half random, so receivers are not stampeded."""
        step = min(MAX_RETRY_DELAY, self._config.webhook_retry_delay * 2.0 ** (attempts - 1))
        return step / 2 + random.uniform(0, step / 2)

    def _http_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            import aiohttp

            from aegisd.webhooks.resolver import PooledResolver

            timeout = aiohttp.ClientTimeout(total=self._config.webhook_timeout)
            # No connection limit: the lanes already cap each webhook at webhook_workers attempts, hence connections.
            # A cap here would be shared, and `timeout` counts the wait for a free connection: a global one lets a
            # hanging receiver starve every webhook, and one per host (host, port, TLS) would do the same to webhooks
            # that share a receiver's address (two Slack channels) when one of their paths hangs.
            # Lookups on threads of their own: slow DNS for a webhook host must not hold up the gate's (resolver).
            self._resolver = PooledResolver(self._gate)  # drops the gate's addresses from every lookup
            connector = aiohttp.TCPConnector(ssl=tls_context(), limit=0, limit_per_host=0, resolver=self._resolver)
            self._session = aiohttp.ClientSession(timeout=timeout, connector=connector, trust_env=False,
                                                  headers={"User-Agent": f"aegisd/{__version__} webhooks"})
        return self._session

    async def _post(self, delivery: Delivery) -> Attempt:
        if not self._running:
            return Attempt(0, "aegisd is shutting down", 0.0)
        import aiohttp

        from aegisd.webhooks.resolver import GATE_REFUSAL, PointsAtGate

        if _literal_to_gate(delivery.target.url, self._gate):
            return Attempt(0, GATE_REFUSAL, 0.0, final=True)
        session = self._http_session()
        body = delivery.payload()
        headers = {"Content-Type": "application/json", "X-Aegis-Event": delivery.event,
                   "X-Aegis-Delivery": delivery.id, "X-Aegis-Signature": signature(delivery.target.secret, body)}
        started = time.perf_counter()
        try:
            async with session.post(delivery.target.url, data=body, headers=headers, allow_redirects=False) as resp:
                status = resp.status
        except TimeoutError:
            return Attempt(0, "timed out", _ms(started))
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, PointsAtGate):  # the lookup found only the gate's addresses: nothing sent
                return Attempt(0, GATE_REFUSAL, _ms(started), final=True)
            return Attempt(0, f"cannot connect: {exc.os_error.strerror or type(exc.os_error).__name__}", _ms(started))
        except (aiohttp.ClientError, OSError) as exc:
            return Attempt(0, type(exc).__name__, _ms(started))
        except ValueError:  # the IDNA codec's UnicodeError from getaddrinfo: check_url refuses such a host now
            return Attempt(0, "invalid host", _ms(started))
        return Attempt(status, "" if 200 <= status < 300 else f"HTTP {status}", _ms(started))


def _literal_to_gate(url: str, gate: tuple[str, int]) -> bool:
    """Whether the URL's host, as written (an address in any spelling, or `localhost`), reaches the gate at the URL's
    port. aiohttp connects to an address without asking the resolver, whose check (resolver.py) covers names; this
    covers a webhook added while the gate listened elsewhere, the gate restarted on its address since."""
    from yarl import URL

    try:
        parsed = URL(url)
        host, port = parsed.raw_host, parsed.port
    except ValueError:  # not seen: add checked the URL with yarl; aiohttp refuses it the same way
        return False
    return host is not None and port is not None and reaches_gate(host, port, *gate)


def _add(counts: dict[K, int], key: K, change: int) -> None:
    """Add `change` to a count, forgetting it at 0 so that no key outlives what it counts."""
    held = counts.get(key, 0) + change
    if held > 0:
        counts[key] = held
    else:
        counts.pop(key, None)


def _finish(delivery: Delivery) -> None:
    """Tell the delivery's `on_done` how it ended, once; a failing callback must not break the lane."""
    done, delivery.on_done = delivery.on_done, None
    if done is not None:
        try:
            done(delivery.target.id, delivery.delivered)
        except Exception:
            log.exception("webhook delivery callback error")


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
