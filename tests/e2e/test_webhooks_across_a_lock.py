"""Webhook deliveries waiting when the vault locks: dropped with the URL and signing secret they hold, and
never sent after a later unlock, through the real daemon and a real receiver."""

from __future__ import annotations

import time

import grpc

from aegisd.api.aegis.v1 import vault_pb2, vault_pb2_grpc
from tests.e2e.ops_support import Scrape, add_webhook, ops_world, refused
from tests.webhook_receiver import Receiver


def test_a_retry_waiting_at_a_lock_is_dropped_and_not_sent_after_the_unlock() -> None:
    world = ops_world("[webhooks]\nretry_delay = 8\n")  # the first retry waits 4-8 s
    receiver = Receiver(fail_first=1).start()
    try:
        add_webhook(world, receiver, "agent_auth_failure")
        refused(world.call("GET", "/any/before"), 401, "agent_auth_required")
        assert [a.status for a in receiver.wait_for(1)] == [503]
        retry_due = time.monotonic() + 8  # at the latest
        deadline = time.monotonic() + 10
        while Scrape(world).value("aegis_webhook_retries_pending") != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert Scrape(world).value("aegis_webhook_retries_pending") == 1

        # The lock must land before the retry's timer can fire (4 s after the failure at the earliest): locked
        # through the control API from here, not with aegisctl, whose start-up alone a loaded machine can
        # stretch towards that.
        with grpc.insecure_channel(f"unix:{world.aegis.socket}") as channel:
            vault_pb2_grpc.VaultServiceStub(channel).Lock(vault_pb2.LockRequest(), timeout=30)
        deadline = time.monotonic() + 2  # dropped at the lock, well before its timer could fire
        while Scrape(world).value("aegis_webhook_retries_pending") != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert Scrape(world).value("aegis_webhook_retries_pending") == 0
        world.unlock()
        time.sleep(max(0.0, retry_due + 0.5 - time.monotonic()))  # past the retry's time, with the webhook live
        assert receiver.attempts == 1

        refused(world.call("GET", "/any/after"), 401, "agent_auth_required")  # new events are delivered
        delivered = receiver.wait_for(2)
        assert [a.status for a in delivered] == [503, 200]
        assert len({a.delivery_id for a in delivered}) == 2
        world.assert_no_leaks([a.body.decode() for a in delivered])
    finally:
        receiver.stop()
        world.close()
