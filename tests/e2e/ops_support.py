"""Helpers for the operations tests: a gate world with a config file, metric scrapes, webhooks."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.e2e.gate_support import GateWorld, Reply, request
from tests.harness import PASSPHRASE, new_aegis
from tests.upstreams import make_pki
from tests.webhook_receiver import Receiver


def ops_world(config: str = "") -> GateWorld:
    """A started, initialised daemon whose config file holds `config` (TOML), with a test CA."""
    aegis = new_aegis()
    pki = make_pki(aegis.root / "pki")
    aegis.env["SSL_CERT_FILE"] = str(pki.ca_pem)
    if config:
        path = aegis.root / "aegisd.toml"
        path.write_text(config)
        aegis.env["AEGIS_CONFIG"] = str(path)
    try:
        aegis.start()
        aegis.init()
    except BaseException:
        aegis.cleanup()
        raise
    return GateWorld(aegis, pki, secrets=[PASSPHRASE])


class Scrape:
    """One /_aegis/metrics answer, parsed with prometheus_client's own parser."""

    def __init__(self, world: GateWorld) -> None:
        self.reply: Reply = request(world.port, "GET", "/_aegis/metrics")
        assert self.reply.status == 200, self.reply.text()
        self.text = self.reply.body.decode()
        world.received.append(self.text)
        self.samples: list[Sample] = []
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(self.text):
            self.types[family.name] = family.type
            self.samples.extend(family.samples)

    def named(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.name == name]

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0 when the series does not exist (yet)."""
        found = [s for s in self.named(name) if all(s.labels.get(k) == v for k, v in labels.items())
                 and len(s.labels) == len(labels)]
        assert len(found) <= 1, found
        return found[0].value if found else 0.0

    def label_values(self, label: str) -> set[str]:
        return {s.labels[label] for s in self.samples if label in s.labels}


def refused(reply: Reply, status: int, code: str) -> Reply:
    """The agent got `status` with error `code` (the ledger row is checked where it matters, not per call)."""
    assert reply.status == status, reply.text()
    assert reply.error()["code"] == code, reply.text()
    return reply


def add_webhook(world: GateWorld, receiver: Receiver, events: str, path: str = "/hook/T0KEN-in-path") -> str:
    """Register a webhook to `receiver`; hands the receiver its secret and returns the webhook id."""
    result = world.aegis.ctl("webhook", "add", receiver.url(path), "--events", events, "--json").ok()
    added: dict[str, Any] = json.loads(result.out)
    world.aegis.outputs.remove(result.out)  # the one place the signing secret may appear
    receiver.secret = str(added["secret"])
    world.secrets.append(receiver.secret)
    return str(added["id"])
