"""Found by a cold review: inspecting a request could hold the gate's event loop for seconds, so one agent (or
no agent at all) could stall every other one. Each test sends the review's request and, while the gate works
on it, asks /_aegis/health, which must answer within a generous bound (the review measured 27.5 s and 4.1 s).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.e2e.gate_support import GateWorld, Reply, request

HEALTH_S = 5.0  # a health check answers in milliseconds; the review's requests held it for 4-28 s
SECRET = "cost-secret-Q7w8E9r0T1y2U3i4"


@pytest.fixture(scope="module")
def world() -> Iterator[GateWorld]:
    world = GateWorld.start()
    try:
        up = world.upstream()
        world.credential("svc", SECRET, up.entry())
        world.agent("bot", "svc")
        yield world
    finally:
        world.close()


def _while_probing_health(world: GateWorld, send: Callable[[], Reply]) -> tuple[Reply, float]:
    """`send()`'s reply, and how long /_aegis/health took when asked while the gate worked on it."""
    replies: list[Reply] = []
    errors: list[BaseException] = []

    def attack() -> None:
        try:
            replies.append(send())
        except BaseException as exc:  # reported by the test's own thread
            errors.append(exc)

    attacker = threading.Thread(target=attack)
    attacker.start()
    time.sleep(0.3)  # the request has arrived and is being inspected
    start = time.monotonic()
    try:
        health = request(world.port, "GET", "/_aegis/health", timeout=HEALTH_S)
    except TimeoutError:
        health = None
    took = time.monotonic() - start
    attacker.join(120)
    assert not errors, errors
    assert health is not None and health.status == 200, f"/_aegis/health did not answer within {HEALTH_S} s"
    return replies[0], took


def test_a_tokenless_request_cannot_stall_the_gate_with_a_pem_lookalike_path(world: GateWorld) -> None:
    """The review's request: no token, a path of a PEM header and `a: ` repeated, which the path masking for
    the ledger scanned with a pattern that backtracked ~N^4 (27.5 s of a frozen gate for ~1 KB), locked or not."""
    target = "/svc/-----BEGIN%20PRIVATE%20KEY-----%0A" + "a:%20" * 220 + "!"
    reply, took = _while_probing_health(world, lambda: world.raw_request("GET", target))
    assert took < HEALTH_S
    world.assert_refused(reply, 401, "agent_auth_required", path=target[4:])
    world.aegis.ctl("lock").ok()
    try:
        reply, took = _while_probing_health(world, lambda: world.raw_request("GET", target))
        assert took < HEALTH_S
        world.assert_refused(reply, 503, "vault_locked")
    finally:
        world.unlock()
    world.assert_no_leaks()
