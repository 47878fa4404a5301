"""A webhook never delivers to aegisd's own gate, whatever address or name leads there, checked as each delivery
connects (from a cold review).

A webhook whose URL reaches the gate feeds itself: the delivery is refused there (a TLS hello to the plain-http
gate is a 400 bad_request), which raises another blocked_request alert, ~110 refusals a second without end from
one request. `webhook add` refused only the gate's address and `localhost`; a name resolving to it (an /etc/hosts
alias, DNS rebinding) was accepted, and nothing was checked again when a delivery connected, so neither a name nor
a gate restarted on a webhook's address was caught. Deliveries are signed with a secret and the URLs carry a token
in their path: every output is checked for both (assert_no_leaks).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from tests.e2e.gate_support import GateWorld, request
from tests.e2e.ops_support import Scrape, ops_world
from tests.e2e.support import assert_failed
from tests.harness import free_port

URL_TOKEN = "T0KEN-gate-loop-3c2b1a09"
# A retry 30 minutes on: a delivery given up within the test was given up at its first attempt, not retried.
EVENTS = "agent_auth_failure,blocked_request"
CONFIG = "[webhooks]\nmax_attempts = 5\nretry_delay = 1800\n"


def _loopback_aliases() -> list[str]:
    """Names other than `localhost` this machine's /etc/hosts gives 127.0.0.1, and nothing else: a name leading
    to the gate with no DNS asked and no system file edited (`vm` and `runsc` on the review's machine). None on
    most machines, where `localhost` alone still checks each delivery's own check."""
    names: list[str] = []
    try:
        lines = Path("/etc/hosts").read_text().splitlines()
    except OSError:
        return names
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "127.0.0.1":
            names.extend(name for name in fields[1:] if name.lower() != "localhost" and "." not in name)
    return [name for name in dict.fromkeys(names) if _addresses(name) == {"127.0.0.1"}]


def _addresses(name: str) -> set[str]:
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(name, 443, type=socket.SOCK_STREAM)}
    except OSError:
        return set()


def _add(world: GateWorld, url: str) -> str:
    """Register a webhook for refusals (the URL on stdin, as a secret URL should be); returns its id."""
    added = world.aegis.ctl_in_process("webhook", "add", "--url-stdin", "--events", EVENTS, "--json",
                                       input=url + "\n").ok()
    world.aegis.outputs.remove(added.out)  # the one place the signing secret may appear
    fields = json.loads(added.out)
    world.secrets.append(str(fields["secret"]))
    return str(fields["id"])


def _blocked(scrape: Scrape) -> float:
    return sum(sample.value for sample in scrape.named("aegis_requests_blocked_total"))


def test_no_delivery_reaches_the_gate_by_its_address_localhost_or_a_name_resolving_there() -> None:
    """Webhooks added while the gate listened elsewhere (an address, `localhost` and, where /etc/hosts has one, a
    loopback alias, at a port then free), then aegisd restarted with the gate on that port: each `webhook test` and
    each alert fails at once with the fixed "points at aegisd's gate", without a connection, so the gate records
    nothing but the one request that raised the alert, and the delivery is given up, never retried. The alias at
    the gate's port is refused at `webhook add` too, which now resolves names."""
    world = ops_world(CONFIG)
    world.secrets.append(URL_TOKEN)
    aliases = _loopback_aliases()
    later = free_port()  # the gate's port after the restart
    try:
        hosts = ["127.0.0.1", "localhost", *aliases]
        hooks = [_add(world, f"https://{host}:{later}/hook/{URL_TOKEN}") for host in hosts]

        world.aegis.stop()
        world.aegis.gate_port = later
        world.aegis.start()
        world.unlock()

        for hook in hooks:
            tested = world.aegis.ctl_in_process("webhook", "test", hook, "--json")
            assert tested.code == 1 and json.loads(tested.out)["error"] == "points at aegisd's gate", tested
        for alias in aliases:
            assert_failed(world.aegis.ctl_in_process("webhook", "add", "--url-stdin", "--events", "blocked_request",
                                                     input=f"https://{alias}:{later}/hook/{URL_TOKEN}\n"),
                          "resolves to aegisd's own gate", "listen address")

        assert request(later, "GET", "/no/such/service").status == 401  # no token: one agent_auth_failure alert
        deadline = time.monotonic() + 20  # a wait for the outcome, not a timing assertion
        while (scrape := Scrape(world)).value("aegis_webhook_failed_total") < len(hooks):
            assert time.monotonic() < deadline, (hosts, scrape.text)
            time.sleep(0.05)
        assert _blocked(scrape) == 1, scrape.text  # the request itself; no delivery reached the gate
        assert scrape.value("aegis_webhook_retries_pending") == 0
        assert scrape.value("aegis_webhook_delivered_total") == 0
        log = world.aegis.log()
        assert log.count("points at aegisd's gate") >= len(hooks) * 2 and "Traceback" not in log
        assert len(json.loads(world.aegis.ctl_in_process("webhook", "list", "--json").ok().out)) == len(hooks)
        world.assert_no_leaks()
    finally:
        world.close()
