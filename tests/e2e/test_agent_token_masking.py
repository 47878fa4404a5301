"""An Aegis agent token written into a request: kept out of the ledger and webhook payloads, and never
forwarded. Found by a cold review: an agent misconfigured to put its token in the URL got its 401, and the
path, token and all, went to the ledger and to an external webhook receiver (Slack, say)."""

from __future__ import annotations

import json

from tests.e2e.gate_support import untouched
from tests.e2e.ops_support import add_webhook, ops_world, refused
from tests.webhook_receiver import Receiver

SECRET = "sk-bearer-agent-token-test-0123456789"


def test_an_agent_token_in_a_request_is_masked_and_never_forwarded() -> None:
    world = ops_world()
    receiver = Receiver().start()
    try:
        up = world.upstream()
        world.credential("bear", SECRET, up.entry())
        world.secrets.append(SECRET)
        bot = world.agent("bot", "bear")
        victim = world.agent("victim")
        add_webhook(world, receiver, "agent_auth_failure,body_inspection")
        with untouched(up):
            tokenless = refused(world.call("GET", f"/bear/users/{victim}/x"), 401, "agent_auth_required")
            in_path = refused(world.call("GET", f"/bear/echo/{victim}/y", agent="bot"), 403, "body_inspection")
            in_body = refused(world.call("POST", "/bear/echo/z", body=json.dumps({"t": victim}).encode(),
                                         headers=[("Content-Type", "application/json")], agent="bot"),
                              403, "body_inspection")
            own = refused(world.call("GET", f"/bear/echo/{bot}", agent="bot"), 403, "body_inspection")
        rows = world.ledger()
        assert world.row(tokenless.request_id, rows)["path"] == "/users/[REDACTED]/x"
        assert world.row(in_path.request_id, rows)["path"] == "/echo/[REDACTED]/y"
        assert world.row(own.request_id, rows)["path"] == "/echo/[REDACTED]"
        for reply in (in_path, in_body, own):
            assert "aegis_agent_token" in world.row(reply.request_id, rows)["flags"]
        receiver.wait_for(1, "agent_auth_failure")
        receiver.wait_for(3, "body_inspection")
        paths = {d.payload["details"]["request_id"]: d.payload["details"]["path"] for d in receiver.deliveries}
        assert paths[tokenless.request_id] == "/users/[REDACTED]/x"
        assert paths[in_path.request_id] == "/echo/[REDACTED]/y"
        deliveries = json.dumps([d.payload for d in receiver.deliveries])
        assert victim not in deliveries and bot not in deliveries
        world.assert_no_leaks([deliveries])
    finally:
        receiver.stop()
        world.close()
