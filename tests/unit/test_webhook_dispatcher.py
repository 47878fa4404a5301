"""The webhook dispatcher's bookkeeping, with a stand-in for the HTTP post: which deliveries it holds, and for whom.

End-to-end behaviour (real receivers, the gate raising events) is in tests/e2e/test_webhooks*.py; these pin the
two cases a cold review found that are hard to time through the daemon."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aegisd.config import Config
from aegisd.webhooks.dispatcher import AGENT_SHARE, Attempt, Delivery, Dispatcher
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
