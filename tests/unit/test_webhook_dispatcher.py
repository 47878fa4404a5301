"""The webhook dispatcher's bookkeeping, with a stand-in for the HTTP post: which deliveries it holds, and for whom.

End-to-end behaviour (real receivers, the gate raising events) is in tests/e2e/test_webhooks*.py; these pin the
two cases a cold review found that are hard to time through the daemon, and the per-webhook lanes' bookkeeping."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from aegisd.config import Config
from aegisd.webhooks.dispatcher import AGENT_SHARE, UNAUTHENTICATED_SHARE, Attempt, Delivery, Dispatcher
from aegisd.webhooks.registry import Target

TARGET = Target("wh_1", "https://hooks.example/T0KEN/path", frozenset({"blocked_request", "body_inspection"}),
                b"whsec_x" * 5)


def _dispatcher(tmp_path: Path, **settings: float) -> Dispatcher:
    return Dispatcher(Config(data_dir=tmp_path, socket_path=tmp_path / "s.sock", gate_host="127.0.0.1", gate_port=1,
                             **settings))  # type: ignore[arg-type]


def test_a_delivery_whose_webhook_went_while_it_was_sent_waits_for_no_retry(tmp_path: Path) -> None:
    """The vault locked (every webhook unloaded) while an attempt was on the wire to a failing receiver: its
    retry would keep the URL and signing secret in memory for minutes after the lock."""
    async def main() -> list[Delivery]:
        dispatcher = _dispatcher(tmp_path, webhook_retry_delay=200.0)
        on_the_wire = asyncio.Event()

        async def failing_post(delivery: Delivery) -> Attempt:
            on_the_wire.set()
            await asyncio.sleep(0.1)
            return Attempt(503, "HTTP 503", 100.0)

        dispatcher._post = failing_post  # type: ignore[method-assign]
        dispatcher.set_targets([TARGET])
        dispatcher.start()
        dispatcher.emit("blocked_request", {"agent": "a"}, agent="a")
        await asyncio.wait_for(on_the_wire.wait(), 10)
        dispatcher.set_targets(())  # the lock, as Webhooks.reload makes it
        await asyncio.sleep(0.3)
        waiting = list(dispatcher._retries.values())
        await dispatcher.close()
        return waiting

    assert asyncio.run(main()) == []


def test_one_event_of_one_agent_holds_its_share_and_others_still_fit(tmp_path: Path) -> None:
    dispatcher = _dispatcher(tmp_path, webhook_queue_size=20)
    share = 20 // AGENT_SHARE
    held = [dispatcher._hold(Delivery(TARGET, "blocked_request", {}, agent="evil")) for _ in range(share + 3)]
    assert held == [True] * share + [False] * 3
    assert dispatcher._hold(Delivery(TARGET, "body_inspection", {}, agent="evil"))
    assert dispatcher._hold(Delivery(TARGET, "blocked_request", {}, agent="other"))
    assert dispatcher._hold(Delivery(TARGET, "credential_expiry", {}))  # the daemon's own: no agent share


OTHER = Target("wh_2", "https://other.example/hook", frozenset({"blocked_request"}), b"whsec_y" * 5)


def test_each_webhook_has_its_own_lane_and_an_idle_one_is_forgotten(tmp_path: Path) -> None:
    """A receiver that never answers holds only its own lane (at most `workers` attempts on the wire, the rest
    queued in order); another webhook's delivery goes out at once, and its lane is forgotten once done."""
    async def main() -> None:
        dispatcher = _dispatcher(tmp_path, webhook_workers=2)
        answer = asyncio.Event()  # TARGET's receiver answers only when this is set
        on_the_wire: list[str] = []
        sent: list[tuple[str, int]] = []

        async def post(delivery: Delivery) -> Attempt:
            on_the_wire.append(delivery.target.id)
            if delivery.target is TARGET:
                await answer.wait()
            on_the_wire.remove(delivery.target.id)
            sent.append((delivery.target.id, delivery.details["n"]))
            return Attempt(200, "", 1.0)

        dispatcher._post = post  # type: ignore[method-assign]
        dispatcher.set_targets([TARGET, OTHER])
        dispatcher.start()
        for n in range(5):
            dispatcher.emit("body_inspection", {"n": n})  # TARGET only
        dispatcher.emit("blocked_request", {"n": 0})  # both
        await asyncio.sleep(0.05)
        assert sent == [("wh_2", 0)] and on_the_wire == ["wh_1", "wh_1"]
        assert dispatcher.queue_depth == 4  # TARGET's, behind its two on the wire
        assert list(dispatcher._lanes) == ["wh_1"]  # OTHER's is empty and idle: gone

        answer.set()
        await asyncio.sleep(0.05)
        assert [n for webhook, n in sent if webhook == "wh_1"] == [0, 1, 2, 3, 4, 0]  # in order, two at a time
        assert dispatcher.queue_depth == 0 and dispatcher._lanes == {} and dispatcher._sending == set()
        assert dispatcher.delivered == 7
        await dispatcher.close()

    asyncio.run(main())


def test_a_removed_webhooks_queued_deliveries_and_lane_go(tmp_path: Path) -> None:
    async def main() -> None:
        dispatcher = _dispatcher(tmp_path, webhook_workers=1)
        answer = asyncio.Event()
        sent: list[str] = []

        async def post(delivery: Delivery) -> Attempt:
            await answer.wait()
            sent.append(delivery.target.id)
            return Attempt(200, "", 1.0)

        dispatcher._post = post  # type: ignore[method-assign]
        dispatcher.set_targets([TARGET])
        dispatcher.start()
        for _ in range(3):
            dispatcher.emit("blocked_request", {"agent": "a"}, agent="a")
        await asyncio.sleep(0)
        assert dispatcher.queue_depth == 2 and dispatcher._by_agent == {("wh_1", "a", "blocked_request"): 3}
        dispatcher.set_targets(())  # removed while one attempt is on the wire
        await asyncio.sleep(0)
        assert dispatcher.queue_depth == 0 and dispatcher._by_agent == {("wh_1", "a", "blocked_request"): 1}
        assert list(dispatcher._lanes) == ["wh_1"]  # until its attempt ends
        answer.set()
        await asyncio.sleep(0.05)
        assert sent == ["wh_1"] and dispatcher._lanes == {} and dispatcher._by_agent == {}
        await dispatcher.close()

    asyncio.run(main())


def test_close_cancels_the_attempts_on_the_wire_and_forgets_the_lanes(tmp_path: Path) -> None:
    async def main() -> None:
        dispatcher = _dispatcher(tmp_path, webhook_workers=1)
        never = asyncio.Event()

        async def hanging_post(delivery: Delivery) -> Attempt:
            await never.wait()
            return Attempt(200, "", 1.0)

        dispatcher._post = hanging_post  # type: ignore[method-assign]
        dispatcher.set_targets([TARGET, OTHER])
        dispatcher.start()
        for n in range(3):
            dispatcher.emit("blocked_request", {"n": n})
        await asyncio.sleep(0)
        assert dispatcher.queue_depth == 4 and len(dispatcher._sending) == 2
        await asyncio.wait_for(dispatcher.close(), 5)
        assert dispatcher.queue_depth == 0 and dispatcher._lanes == {} and dispatcher._sending == set()
        assert dispatcher.delivered == 0

    asyncio.run(main())


def test_a_hanging_webhook_fills_only_its_own_part_and_shares(tmp_path: Path) -> None:
    """Found by reviews of the lanes: the shares were counted over every webhook, so a receiver that never answered
    held an agent's (or the tokenless) share of an event and that event never reached the other webhooks; and its
    lane could fill the whole bound. Each webhook now has its own part of queue_size, and its shares within it."""
    async def main() -> None:
        dispatcher = _dispatcher(tmp_path, webhook_queue_size=16, webhook_workers=1)
        never = asyncio.Event()
        sent: list[tuple[str, int]] = []

        async def post(delivery: Delivery) -> Attempt:
            if delivery.target is TARGET:
                await never.wait()
            sent.append((delivery.target.id, delivery.details["n"]))
            return Attempt(200, "", 1.0)

        dispatcher._post = post  # type: ignore[method-assign]
        dispatcher.set_targets([TARGET, OTHER])
        dispatcher.start()
        part = 16 // 2
        for n in range(20):  # TARGET only: one on the wire, its part queued, the rest dropped
            dispatcher.emit("body_inspection", {"n": n})
        await asyncio.sleep(0)
        assert dispatcher.queue_depth == part and dispatcher._held == {"wh_1": part}
        assert dispatcher.dropped == 20 - 1 - part
        for n in range(3):  # both: TARGET's are dropped (its part is full), OTHER's are sent
            dispatcher.emit("blocked_request", {"n": 100 + n}, agent="evil")
            await asyncio.sleep(0.01)
        for n in range(3):
            dispatcher.emit("blocked_request", {"n": 200 + n}, unauthenticated=True)
            await asyncio.sleep(0.01)
        assert sent == [("wh_2", 100), ("wh_2", 101), ("wh_2", 102), ("wh_2", 200), ("wh_2", 201), ("wh_2", 202)]
        assert dispatcher._by_agent == {} and dispatcher._unauthenticated == {}  # TARGET holds none of them
        assert dispatcher._held == {"wh_1": part}
        await dispatcher.close()
        assert dispatcher._held == {} and dispatcher._by_agent == {} and dispatcher._unauthenticated == {}

    asyncio.run(main())


def test_each_webhook_holds_its_shares_within_its_own_part(tmp_path: Path) -> None:
    """Four webhooks, one agent flooding one event: each webhook holds a quarter of its own part for it, so the
    agent's later alert of another kind still fits at every webhook (per webhook against the whole bound, the flood
    would have filled it)."""
    targets = [Target(f"wh_{n}", f"https://hooks.example/{n}", frozenset({"blocked_request", "body_inspection"}),
                      b"whsec_z" * 5) for n in range(4)]
    dispatcher = _dispatcher(tmp_path, webhook_queue_size=40)
    dispatcher.set_targets(targets)
    for _ in range(20):
        dispatcher.emit("blocked_request", {}, agent="evil")
    part = 40 // 4
    assert dispatcher._held == {f"wh_{n}": part // AGENT_SHARE for n in range(4)}
    dispatcher.emit("body_inspection", {}, agent="evil")
    for _ in range(20):
        dispatcher.emit("blocked_request", {}, unauthenticated=True)
    assert dispatcher._held == {f"wh_{n}": part // AGENT_SHARE + 1 + part // UNAUTHENTICATED_SHARE for n in range(4)}


EVENTS = frozenset({"blocked_request", "body_inspection", "rate_limited", "response_redacted", "credential_expiry"})


def _hooks(count: int) -> list[Target]:
    return [Target(f"wh_{n}", f"https://hooks.example/{n}", EVENTS, b"whsec_w" * 5) for n in range(count)]


def _held_at(dispatcher: Dispatcher, hook: str) -> list[tuple[str, str, bool]]:
    lane = dispatcher._lanes.get(hook)
    waiting = [d for d in dispatcher._retries.values() if d.target.id == hook]
    return sorted((d.event, d.agent, d.unauthenticated) for d in [*(lane.queued if lane else ()), *waiting])


def _hanging(dispatcher: Dispatcher) -> None:
    never = asyncio.Event()

    async def post(delivery: Delivery) -> Attempt:
        await never.wait()
        return Attempt(200, "", 1.0)

    dispatcher._post = post  # type: ignore[method-assign]


def test_webhooks_added_later_fit_what_each_holds_into_its_smaller_part(tmp_path: Path) -> None:
    """Found by a review: shares taken against one webhook's whole bound stayed when three more webhooks cut its
    part to a quarter, so the floods filled it and every real alert there was dropped, and held deliveries passed
    queue_size in all."""
    async def main() -> None:
        dispatcher = _dispatcher(tmp_path, webhook_queue_size=40, webhook_workers=1)
        _hanging(dispatcher)
        hooks = _hooks(4)
        dispatcher.set_targets(hooks[:1])
        dispatcher.start()
        for _ in range(40):
            dispatcher.emit("blocked_request", {}, unauthenticated=True)
            dispatcher.emit("blocked_request", {}, agent="evil")
        await asyncio.sleep(0)
        dispatcher.set_targets(hooks)  # the part goes from 40 to 10
        await asyncio.sleep(0)
        assert dispatcher._held == {"wh_0": 10}
        dispatcher.emit("body_inspection", {}, agent="evil")
        dispatcher.emit("blocked_request", {}, agent="good")
        dispatcher.emit("credential_expiry", {})
        held = _held_at(dispatcher, "wh_0")
        for alert in (("body_inspection", "evil", False), ("blocked_request", "good", False),
                      ("credential_expiry", "", False)):
            assert alert in held, held
        assert sum(dispatcher._held.values()) <= 40
        await dispatcher.close()

    asyncio.run(main())


def test_one_agents_flood_of_several_kinds_gives_way_to_another_agent(tmp_path: Path) -> None:
    async def main() -> None:
        dispatcher = _dispatcher(tmp_path, webhook_queue_size=40, webhook_workers=1)
        _hanging(dispatcher)
        dispatcher.set_targets(_hooks(1))
        dispatcher.start()
        for _ in range(20):
            for event in ("blocked_request", "rate_limited", "body_inspection", "response_redacted"):
                dispatcher.emit(event, {}, agent="evil")
        await asyncio.sleep(0)
        assert dispatcher._held == {"wh_0": 39}  # a quarter of each kind, one of them on the wire
        dispatcher.emit("blocked_request", {}, agent="good")
        dispatcher.emit("credential_expiry", {})
        held = _held_at(dispatcher, "wh_0")
        assert ("blocked_request", "good", False) in held and ("credential_expiry", "", False) in held
        assert dispatcher._held == {"wh_0": 40}
        await dispatcher.close()

    asyncio.run(main())


def test_a_real_alert_pushes_out_a_tokenless_one_even_in_a_part_of_one(tmp_path: Path) -> None:
    dispatcher = _dispatcher(tmp_path, webhook_queue_size=1)
    dispatcher.set_targets(_hooks(1))
    dispatcher.emit("blocked_request", {}, unauthenticated=True)
    dispatcher.emit("blocked_request", {}, unauthenticated=True)  # no room: never pushes one out
    assert _held_at(dispatcher, "wh_0") == [("blocked_request", "", True)]
    dispatcher.emit("credential_expiry", {})
    assert _held_at(dispatcher, "wh_0") == [("credential_expiry", "", False)]
    assert dispatcher._held == {"wh_0": 1} and dispatcher._unauthenticated == {}


def test_webhooks_added_before_the_start_are_fitted_at_the_start(tmp_path: Path) -> None:
    """Found by the review's fuzzer: with no loop yet, nothing cut the parts that webhooks added before the start
    made smaller."""
    async def main() -> None:
        dispatcher = _dispatcher(tmp_path, webhook_queue_size=8)
        _hanging(dispatcher)
        hooks = _hooks(2)
        dispatcher.set_targets(hooks[:1])
        for _ in range(8):
            dispatcher.emit("credential_expiry", {})
        dispatcher.set_targets(hooks)
        assert dispatcher._held == {"wh_0": 8}
        dispatcher.start()
        assert dispatcher._held["wh_0"] <= 8 // 2
        await dispatcher.close()

    asyncio.run(main())


def test_a_host_no_lookup_can_encode_is_a_failed_attempt(tmp_path: Path) -> None:
    """A row from before check_url refused such hosts: getaddrinfo's IDNA codec raised UnicodeError out of every
    delivery (a traceback each, never counted failed) and out of `webhook test` (gRPC INTERNAL)."""
    async def main() -> None:
        dispatcher = _dispatcher(tmp_path, webhook_max_attempts=1)
        for host in ("hooks..example.com", "a" * 64 + ".example.com"):
            target = Target("wh_bad", f"https://{host}/x", frozenset({"blocked_request"}), b"whsec_x" * 5)
            dispatcher.set_targets([target])
            dispatcher.start()
            _, attempt = await dispatcher.test(target)
            assert (attempt.status, attempt.error) == (0, "invalid host")
            dispatcher.emit("blocked_request", {})
            for _ in range(100):
                if dispatcher.failed:
                    break
                await asyncio.sleep(0.02)
            assert dispatcher.failed == 1
            dispatcher.failed = 0
            await dispatcher.close()

    asyncio.run(main())


def test_slow_lookups_of_webhook_hosts_leave_the_loops_threads_free(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """aiohttp's default resolver ran getaddrinfo on the loop's default executor (under uvloop, on libuv's pool of
    4), where the gate looks up upstreams: a few webhook hosts with slow DNS made agents' requests wait. Shown on
    the stock loop, whose lookups a test can slow down; and a lookup through the webhooks' own threads works."""
    real = socket.getaddrinfo
    entered, release = threading.Event(), threading.Event()

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "slow.example":
            entered.set()
            release.wait(10)
            raise socket.gaierror(socket.EAI_NONAME, "no such name")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)

    async def answer(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(1))
        app = web.Application()
        app.router.add_post("/hook", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        dispatcher = _dispatcher(tmp_path, webhook_timeout=20.0)
        dispatcher.start()
        try:
            slow = asyncio.create_task(dispatcher.test(Target("wh_s", "https://slow.example/x", frozenset(), b"k" * 8)))
            for _ in range(500):  # not to_thread: that would take the executor's one thread
                if entered.is_set():
                    break
                await asyncio.sleep(0.01)
            assert entered.is_set()
            # The gate's lookups (loop.getaddrinfo) and worker threads (to_thread) find the executor free.
            await asyncio.wait_for(loop.run_in_executor(None, int), 2)
            local = Target("wh_l", f"http://localhost:{runner.addresses[0][1]}/hook", frozenset(), b"k" * 8)
            assert (await dispatcher.test(local))[1].status == 200
            release.set()
            assert (await slow)[1].error.startswith("cannot connect")
        finally:
            release.set()
            await dispatcher.close()
            await runner.cleanup()

    asyncio.run(main())


def test_a_lookup_stuck_on_dns_does_not_hold_up_aegisd_s_exit() -> None:
    """From a review of the webhooks' own resolver: on a ThreadPoolExecutor, whose threads the interpreter joins at
    exit, a lookup stuck on unreachable DNS held up the process's exit after everything else had stopped (past
    systemd's stop timeout). Here a lookup that would take 120 s is given up on; the process must exit at once."""
    program = textwrap.dedent("""
        import asyncio, socket, time
        socket.getaddrinfo = lambda *args, **kwargs: time.sleep(120)
        from aegisd.webhooks.resolver import PooledResolver

        async def main():
            resolver = PooledResolver()
            try:
                await asyncio.wait_for(resolver.resolve("stuck.example", 443), 0.2)
            except asyncio.TimeoutError:
                pass
            await resolver.close()

        asyncio.run(main())
    """)
    subprocess.run([sys.executable, "-c", program], check=True, timeout=60)  # not 120 s


def test_each_delivery_tells_once_how_it_ended(tmp_path: Path) -> None:
    """`on_done` (how the expiry watch counts an alert as sent only once a receiver has it) is told exactly once per
    delivery, whichever way it ends: delivered, dropped at the bound, given up, or gone at close."""
    async def main() -> list[tuple[str, bool]]:
        dispatcher = _dispatcher(tmp_path, webhook_queue_size=2, webhook_workers=1, webhook_max_attempts=1)
        answers: asyncio.Queue[int] = asyncio.Queue()
        done: list[tuple[str, bool]] = []

        async def post(delivery: Delivery) -> Attempt:
            status = await answers.get()
            return Attempt(status, "", 1.0)

        dispatcher._post = post  # type: ignore[method-assign]
        dispatcher.set_targets([TARGET, OTHER])  # a part of 1 each
        dispatcher.start()

        def emit(n: int, only: set[str] | None = None) -> None:
            dispatcher.emit("blocked_request", {"n": n}, only=only,
                            on_done=lambda hook, delivered: done.append((f"{n}@{hook}", delivered)))

        emit(0, {"wh_1"})  # on the wire
        await asyncio.sleep(0)
        emit(1, {"wh_1"})  # queued: the part is full
        emit(2, {"wh_1"})  # dropped at once
        assert done == [("2@wh_1", False)]
        await answers.put(200)
        await answers.put(503)  # the queued one fails, and has no attempt left
        while len(done) < 3:
            await asyncio.sleep(0.01)
        emit(3)  # to both: hangs on the wire, then aegisd stops
        await asyncio.sleep(0)
        await dispatcher.close()
        return done

    done = asyncio.run(main())
    assert done[:3] == [("2@wh_1", False), ("0@wh_1", True), ("1@wh_1", False)]
    assert sorted(done[3:]) == [("3@wh_1", False), ("3@wh_2", False)]  # cancelled at close, in either order


class _Subscribers:
    """A dispatcher stand-in for the expiry watch: who is subscribed, and what was emitted to whom."""

    def __init__(self, *hooks: str) -> None:
        self.hooks = hooks
        self.emitted: list[tuple[list[str], str, Any]] = []

    def wants(self, event: str) -> bool:
        return bool(self.hooks)

    def subscribers(self, event: str) -> tuple[str, ...]:
        return self.hooks

    def emit(self, event: str, details: dict[str, Any], *, only: Any = None, on_done: Any = None) -> None:
        self.emitted.append((sorted(only), details["state"], on_done))

    def sent(self) -> list[tuple[list[str], str]]:
        found = [(hooks, state) for hooks, state, _ in self.emitted]
        self.emitted.clear()
        return found


def test_an_expiry_alert_counts_as_sent_to_a_webhook_only_once_delivered() -> None:
    """Found by a cold review: the once-a-day rule was kept per credential and state, over every webhook, and set
    before the delivery was even tried. A webhook added later that day never got the alert another had, and one
    lost to a receiver down at boot was not raised again for up to 24 hours. Now it is kept per webhook, once
    delivered; while one is on its way no other is raised for that webhook, so a failing receiver gets no pile."""
    from aegisd.webhooks.expiry import ExpiryWatch

    subscribers = _Subscribers("wh_1")
    watch = ExpiryWatch(None, subscribers)  # type: ignore[arg-type]

    def raise_soon() -> None:
        watch._raise("brief", "brief", None, "expiring_soon", {}, retry_failed=True)

    raise_soon()
    [(_, _, done)] = subscribers.emitted
    assert subscribers.sent() == [(["wh_1"], "expiring_soon")]
    raise_soon()
    assert subscribers.sent() == []  # on its way: not raised again
    done("wh_1", False)  # given up (or dropped): the next check raises it again
    raise_soon()
    [(_, _, done)] = subscribers.emitted
    assert subscribers.sent() == [(["wh_1"], "expiring_soon")]
    subscribers.hooks = ("wh_1", "wh_2")  # a webhook added while wh_1's is still on its way
    raise_soon()
    [(_, _, later)] = subscribers.emitted
    assert subscribers.sent() == [(["wh_2"], "expiring_soon")]
    done("wh_1", True)
    later("wh_2", True)
    raise_soon()
    watch.on_refused({}, "brief", "brief", None)
    assert subscribers.sent() == [(["wh_1", "wh_2"], "expired")]  # another state is another alert
    raise_soon()
    assert subscribers.sent() == []  # delivered to both today


def test_a_failed_expiry_alert_is_raised_again_by_a_check_never_by_a_refusal() -> None:
    """Found by a review of the fix above: a failed delivery freed the alert at once, so against a receiver that
    never answers 2xx (a revoked Slack URL's 404) every request refused as credential_expired raised it again: one
    POST and one warning per refusal where there had been one a day. Only a check raises a failed one again."""
    from aegisd.webhooks.expiry import ExpiryWatch

    subscribers = _Subscribers("wh_1")
    watch = ExpiryWatch(None, subscribers)  # type: ignore[arg-type]
    watch.on_refused({}, "gone", "gone", None)
    [(_, _, done)] = subscribers.emitted
    assert subscribers.sent() == [(["wh_1"], "expired")]
    done("wh_1", False)  # the receiver refused it
    for _ in range(3):
        watch.on_refused({}, "gone", "gone", None)
    assert subscribers.sent() == []  # no alert per refused request
    watch._raise("gone", "gone", None, "expired", {}, retry_failed=True)  # the next check
    [(_, _, done)] = subscribers.emitted
    assert subscribers.sent() == [(["wh_1"], "expired")]
    done("wh_1", True)
    watch._raise("gone", "gone", None, "expired", {}, retry_failed=True)
    assert subscribers.sent() == []


def test_an_alert_for_a_webhook_gone_before_it_was_queued_is_reported_not_delivered(tmp_path: Path) -> None:
    """Found by the same review: a lock between the expiry watch's reading the subscribers and its emit left the
    alert marked on its way, with no delivery to say otherwise, so it was never raised again that day."""
    dispatcher = _dispatcher(tmp_path)
    ended: list[tuple[str, bool]] = []
    dispatcher.emit("credential_expiry", {}, only=frozenset({"wh_gone"}),
                    on_done=lambda hook, delivered: ended.append((hook, delivered)))
    assert ended == [("wh_gone", False)]


def test_reloads_on_two_threads_swap_in_what_was_read_last() -> None:
    """A reload that read the rows before a remove could swap them in after the remove's own reload, bringing the
    removed webhook back. Reloads now read and swap one at a time."""
    from aegisd.webhooks import Webhooks

    class Vault:
        state = "unlocked"

        def add_listener(self, listener: Any) -> None:
            pass

    reading, go_on, second_read = threading.Event(), threading.Event(), threading.Event()
    calls: list[int] = []

    def targets() -> list[Target]:
        calls.append(len(calls))
        if len(calls) == 1:  # the first reload read the webhook, then is slow to swap it in
            reading.set()
            go_on.wait(10)
            return [TARGET]
        second_read.set()
        return []  # the second read it after its removal

    config = Config(data_dir=Path("/nonexistent"), socket_path=Path("/nonexistent/s"), gate_host="127.0.0.1",
                    gate_port=1)
    hooks = Webhooks(config, None, Vault())  # type: ignore[arg-type]
    hooks.registry.targets = targets  # type: ignore[method-assign]
    first = threading.Thread(target=hooks.reload)
    first.start()
    assert reading.wait(10)
    second = threading.Thread(target=hooks.reload)
    second.start()
    second_read.wait(0.5)  # without the lock it reads (and swaps) at once; with it, it waits for the first
    go_on.set()
    first.join(10)
    second.join(10)
    assert hooks.dispatcher.subscribers("blocked_request") == ()
