"""A lock that lands while large bodies wait for inspection in the worker threads stops all of them.

Found by a cold review: bodies over 256 KiB, or compressed, are inspected off the event loop, and after that
wait the request went out on a pooled upstream connection under the judgement made before it; a lock that
had returned was outrun by seconds, the real credential injected. The gate now judges the request again
after inspection if the routing table or the policies changed meanwhile."""

from __future__ import annotations

import gzip
import threading

from tests.e2e.gate_support import GateWorld, Reply

SECRET = "race-secret-Q7w8E9r0T1y2U3i4"
BODIES = 8  # two inspection threads, each body a few hundred ms of work: most are still queued at the lock


def test_bodies_queued_for_inspection_are_not_forwarded_after_a_lock() -> None:
    world = GateWorld.start()
    try:
        up = world.upstream()
        world.credential("svc", SECRET, up.entry())
        world.agent("bot", "svc")
        assert world.call("GET", "/svc/echo/warm", agent="bot").status == 200  # a pooled keep-alive connection
        bomb = gzip.compress(b"%41" * (10 * 1024 * 1024 // 3 - 10), 9)  # 10 KB sent, 10 MiB to inspect
        replies: dict[int, Reply] = {}
        started = threading.Barrier(BODIES + 1)

        def send(i: int) -> None:
            started.wait()
            replies[i] = world.call("POST", f"/svc/echo/bomb{i}", [("Content-Encoding", "gzip")], bomb, agent="bot")

        threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(BODIES)]
        for thread in threads:
            thread.start()
        started.wait()
        world.aegis.ctl("lock").ok()
        forwarded_before = {r.path for r in up.requests}
        for thread in threads:
            thread.join(120)
        late = {r.path for r in up.requests} - forwarded_before
        assert not late, f"forwarded after the lock returned: {sorted(late)}"
        statuses = sorted(reply.status for reply in replies.values())
        assert len(statuses) == BODIES and set(statuses) <= {200, 503}, statuses
        assert 503 in statuses, "every body was inspected before the lock landed: the test proved nothing"
        for reply in replies.values():
            if reply.status == 503:
                world.assert_refused(reply, 503, "vault_locked")
        world.unlock()
        world.assert_no_leaks()
    finally:
        world.close()
