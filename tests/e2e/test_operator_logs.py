"""The daemon's log over a full run: structured JSON, one info line per refused request, none per
allowed one (unless debug), and never a secret, token, signing secret or query string."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

from tests.e2e.gate_support import Reply
from tests.e2e.ops_support import Scrape, add_webhook, ops_world
from tests.harness import PASSPHRASE
from tests.webhook_receiver import Receiver

SECRETS = {"bear": "sk-logs-bearer-5e4d3c2b1a", "hdr": "hdr-logs-secret-0f9e8d7c", "query": "q-logs-secret-6b5a4c3d"}
URL_SECRET = "hook-path-T0KEN-1d2c3b"
FORGED = "aegis_forged-token-that-is-not-ours-1234"
REFUSAL_FIELDS = {"request_id", "agent", "service", "reason", "status"}
BASE_FIELDS = {"time", "level", "logger", "msg"}


def _lines(text: str) -> list[dict[str, Any]]:
    parsed = []
    for line in text.splitlines():
        value = json.loads(line)  # every line is structured: a stray print or traceback fails here
        assert isinstance(value, dict) and set(value) >= BASE_FIELDS, line
        parsed.append(value)
    return parsed


def test_logs_name_refusals_once_and_never_a_secret() -> None:
    world = ops_world('[log]\nformat = "json"\nlevel = "info"\n')
    receiver = Receiver().start()
    try:
        up = world.upstream()
        world.credential("bear", SECRETS["bear"], up.entry())
        world.credential("hdr", SECRETS["hdr"], up.entry(), "--auth-type", "header", "--header-name", "X-Api-Key")
        world.credential("query", SECRETS["query"], up.entry(), "--auth-type", "query", "--query-param", "api_key")
        world.agent("bot", "bear", "hdr", "query")
        world.agent("other")
        add_webhook(world, receiver, "blocked_request,agent_auth_failure", path=f"/hook/{URL_SECRET}")
        world.secrets.append(URL_SECRET)

        allowed: list[Reply] = []
        refused: list[Reply] = []
        for n in range(25):
            allowed.append(world.call("GET", f"/bear/echo/{n}?q=query-secret-{n}", agent="bot"))
            allowed.append(world.call("POST", f"/hdr/echo/{n}", body=b'{"n": 1}', agent="bot"))
            allowed.append(world.call("GET", f"/query/echo/{n}?page={n}", agent="bot"))
            refused.append(world.call("GET", f"/bear/echo/{n}?q=query-secret-{n}"))
            refused.append(world.call("GET", f"/bear/echo/{n}", [("X-Aegis-Agent", FORGED)]))
            refused.append(world.call("GET", f"/hdr/echo/{n}?q=query-secret-{n}", agent="other"))
        refused.append(world.call("GET", "/bear/echo/x", agent="bot", host="evil.example"))
        refused.append(world.raw_request("GET", "/bear/../etc/passwd", agent="bot"))
        world.aegis.ctl("lock").ok()
        refused.append(world.call("GET", "/bear/echo/locked", agent="bot"))
        world.aegis.ctl("unlock", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
        world.regenerate("bot")
        allowed.append(world.call("GET", "/bear/echo/after", agent="bot"))
        assert all(reply.status == 200 for reply in allowed)
        assert all(reply.status >= 400 for reply in refused)
        hook_id = json.loads(world.aegis.ctl("webhook", "list", "--json").ok().out)[0]["id"]
        world.aegis.ctl("webhook", "test", hook_id).ok()
        receiver.wait_for(len(refused) - 2)  # every refusal but the two front-door ones is an event here
        Scrape(world)

        # Debug, applied live with SIGHUP, adds a line per allowed request.
        config = world.aegis.root / "aegisd.toml"
        config.write_text(config.read_text().replace('level = "info"', 'level = "debug"'))
        assert world.aegis.proc is not None
        world.aegis.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while "configuration reloaded" not in world.aegis.log():
            assert time.monotonic() < deadline, world.aegis.log()
            time.sleep(0.05)
        debug_allowed = world.call("GET", "/bear/echo/debug", agent="bot")
        assert debug_allowed.status == 200
        world.assert_no_leaks([d.body.decode() for d in receiver.deliveries])
        assert world.aegis.stop() == 0

        text = world.aegis.log()
        lines = _lines(text)
        refusal_lines = [line for line in lines if line["msg"] == "request refused"]
        assert sorted(line["request_id"] for line in refusal_lines) == sorted(r.request_id for r in refused)
        for line in refusal_lines:
            assert set(line) == BASE_FIELDS | REFUSAL_FIELDS, line
            assert line["level"] == "info"
        by_id = {line["request_id"]: line for line in refusal_lines}
        first_forged = by_id[refused[1].request_id]
        assert (first_forged["agent"], first_forged["service"], first_forged["reason"], first_forged["status"]) == (
            "-", "bear", "agent_auth_invalid", 401)
        assert by_id[refused[2].request_id]["agent"] == "other"
        for reply in allowed:  # at info level, nothing per allowed request
            assert reply.request_id not in text
        debug_lines = [line for line in lines if line.get("request_id") == debug_allowed.request_id]
        assert [(line["msg"], line["level"]) for line in debug_lines] == [("request allowed", "debug")]

        for needle in ("query-secret", FORGED, "passwd", *world.secrets, *world.tokens.values()):
            assert needle not in text, needle
    finally:
        receiver.stop()
        world.close()
