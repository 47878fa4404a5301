"""Prometheus metrics for `/_aegis/metrics`: request counters and latencies, and state read at scrape time.

Label values come only from operator-defined names (agent, service) and fixed sets (method,
status, reason codes), never from what an agent typed or an upstream sent: a service is named only
for a request whose agent holds a grant for it (anything else is counted as "unknown", so neither a
flood of made-up names can grow the series nor a tokenless prober learn which services exist), a
status outside the standard ones is "other", and no label ever holds a path, token or secret. Our
own registry keeps library metrics out.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest

from aegisd.errors import AegisError
from aegisd.ledger import LedgerWriter, now_ms
from aegisd.vault.sealing import OK, UNCHECKED
from aegisd.vault.vault import Vault
from aegisd.webhooks.dispatcher import Dispatcher
from aegisd.webhooks.expiry import expiry_state

if TYPE_CHECKING:
    from aegisd.gate.agent_connection import AgentConnections

log = logging.getLogger("aegisd.metrics")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})
UNKNOWN_SERVICE = "unknown"
OPERATOR_SERVICE = "_aegis"  # /_aegis/... endpoints that are ledgered (an agent's own /_aegis/services)
NO_AGENT = ""  # the request was not authenticated
# The status label: a standard status as itself, anything else an upstream sends (599, 799) as "other",
# so an upstream cannot grow the series by the hundred per service, method and agent. 0: a request cut at
# a stop before any answer.
STATUS_LABELS = {0: "0"} | {int(status): str(int(status)) for status in HTTPStatus if 100 <= status <= 599}
OTHER_STATUS = "other"
# A local proxy answers refusals in well under a millisecond and streams LLM replies for many seconds.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Expiry states come from the metadata sealed with each secret; "failing": the row does not authenticate
# (changed outside aegisd, or an older aegisd's not yet adopted); "unchecked": the vault is locked.
CREDENTIAL_STATES = ("active", "expiring_soon", "expired", "failing", "unchecked")


class GateMetrics:
    """The gate's counters and histograms, plus a collector for state computed at scrape time."""

    def __init__(self, vault: Vault, ledger: LedgerWriter, webhooks: Dispatcher,
                 connections: AgentConnections | None = None) -> None:
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created only adds noise
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter("aegis_requests", "Requests through the gate, by outcome status.",
                                ("service", "method", "status", "agent"), registry=self.registry)
        self.blocked = Counter("aegis_requests_blocked", "Requests the gate refused, by reason code.",
                               ("service", "reason", "agent"), registry=self.registry)
        self.duration = Histogram("aegis_request_duration_seconds", "Time from request to its ledger row.",
                                  ("service",), buckets=DURATION_BUCKETS, registry=self.registry)
        self.upstream = Histogram("aegis_upstream_duration_seconds", "Time until the upstream's response "
                                  "headers arrived.", ("service",), buckets=DURATION_BUCKETS, registry=self.registry)
        self.registry.register(_ScrapeTimeState(vault, ledger, webhooks, connections))
        # The series children by label values: as bounded as the labels themselves, once `retain` drops the
        # names the vault no longer has.
        self._series: dict[tuple[str, str, str, str], tuple[Any, Any, Any]] = {}
        self._blocked: set[tuple[str, str, str]] = set()

    def observe(self, service: str, method: str, status: int, agent: str, reason: str, denied: bool,
                seconds: float, upstream_seconds: float | None) -> None:
        """Count one gate outcome; `service` must already be a known service name or "unknown"."""
        key = (service, method if method in METHODS else "OTHER", STATUS_LABELS.get(status, OTHER_STATUS), agent)
        series = self._series.get(key)
        if series is None:  # labels() is the costly part of a hot-path update; look each series up once
            series = self._series[key] = (self.requests.labels(*key),
                                          self.duration.labels(service), self.upstream.labels(service))
        requests, duration, upstream = series
        requests.inc()
        duration.observe(seconds)
        if upstream_seconds is not None:
            upstream.observe(upstream_seconds)
        if denied:
            self.blocked.labels(service, reason, agent).inc()
            self._blocked.add((service, reason, agent))

    def retain(self, agents: Collection[str], services: Collection[str]) -> None:
        """Drop every series of an agent or a service the vault no longer has: agents made per session or per
        CI job, then removed, would otherwise grow the scrape and the daemon's memory for good."""

        def gone(service: str, agent: str) -> bool:
            return ((agent != NO_AGENT and agent not in agents)
                    or (service not in services and service not in (UNKNOWN_SERVICE, OPERATOR_SERVICE)))

        observed = {key[0] for key in self._series}
        for key in [key for key in self._series if gone(key[0], key[3])]:
            del self._series[key]
            self.requests.remove(*key)
        for service in observed - {key[0] for key in self._series}:  # the histograms are by service alone
            self.duration.remove(service)
            self.upstream.remove(service)
        for blocked in [key for key in self._blocked if gone(key[0], key[2])]:
            self._blocked.discard(blocked)
            self.blocked.remove(*blocked)

    def render(self, accept: str) -> tuple[bytes, str]:
        """The exposition in the format the scraper asked for, and its content type. Blocks briefly (SQLite).
        An Accept header prometheus_client cannot parse (`version=abc` makes it raise) gets the text format."""
        try:
            encoder, content_type = choose_encoder(accept)
        except Exception:  # anyone can send any Accept: it must not turn a scrape into a 500
            encoder, content_type = generate_latest, CONTENT_TYPE_PLAIN_0_0_4  # as without an Accept
        return encoder(self.registry), content_type


def service_label(service: str, granted: bool, known: Mapping[str, Any]) -> str:
    """The vault's name for the service when the request's agent holds a grant for it (`granted`: it got
    past the grant check), "_aegis" for the gate's own endpoints, else "unknown": a request without a
    token, or refused not_granted, must not tell anyone which service names the vault defines."""
    if service == OPERATOR_SERVICE:
        return OPERATOR_SERVICE
    return service if granted and service in known else UNKNOWN_SERVICE


class _ScrapeTimeState:
    """Vault, credential, ledger and webhook state, read when Prometheus scrapes rather than tracked."""

    def __init__(self, vault: Vault, ledger: LedgerWriter, webhooks: Dispatcher,
                 connections: AgentConnections | None) -> None:
        self._vault = vault
        self._ledger = ledger
        self._webhooks = webhooks
        self._connections = connections

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("aegis_vault_unlocked", "1 while the vault is unlocked, else 0.",
                                value=1 if self._vault.state == "unlocked" else 0)
        credentials = self._credential_states()
        if credentials is not None:
            family = GaugeMetricFamily("aegis_credentials_total", "Credentials by expiry state (expiring_soon: "
                                       "within 7 days), failing authentication, or unchecked while locked.",
                                       labels=("status",))
            for state in CREDENTIAL_STATES:
                family.add_metric((state,), credentials[state])
            yield family
        yield GaugeMetricFamily("aegis_ledger_queue_depth", "Ledger rows waiting for the writer thread.",
                                value=self._ledger.queue_depth)
        yield GaugeMetricFamily("aegis_ledger_commit_seconds", "Duration of the latest ledger group commit.",
                                value=self._ledger.last_commit_seconds)
        yield CounterMetricFamily("aegis_ledger_commits", "Ledger group commits of new rows since the daemon started.",
                                  value=self._ledger.commits)
        yield CounterMetricFamily("aegis_ledger_rows_committed", "Ledger rows committed since the daemon started.",
                                  value=self._ledger.rows_committed)
        yield GaugeMetricFamily("aegis_ledger_failing", "1 while the ledger cannot be written (its latest commit "
                                "failed, or its writer stopped): the gate forwards nothing meanwhile.",
                                value=1 if self._ledger.failing else 0)
        yield CounterMetricFamily("aegis_ledger_commit_failures", "Ledger group commits that failed, retries "
                                  "included; the requests whose rows they held got 503 ledger_unavailable or were cut.",
                                  value=self._ledger.commit_failures)
        if self._connections is not None:
            yield GaugeMetricFamily("aegis_gate_connections", "Agent connections open to the gate.",
                                    value=len(self._connections.open))
            yield CounterMetricFamily("aegis_gate_connections_refused", "Agent connections reset on accept "
                                      "because [gate] max_connections were open.", value=self._connections.refused)
            yield CounterMetricFamily("aegis_gate_connections_evicted", "Idle agent connections on which no agent "
                                      "had authenticated, reset to make room at [gate] max_connections.",
                                      value=self._connections.evicted)
        hooks = self._webhooks
        yield GaugeMetricFamily("aegis_webhook_queue_depth", "Webhook deliveries queued, not yet being sent.",
                                value=hooks.queue_depth)
        yield GaugeMetricFamily("aegis_webhook_retries_pending", "Webhook deliveries waiting to be retried.",
                                value=hooks.retries_pending)
        yield CounterMetricFamily("aegis_webhook_delivered", "Webhook deliveries the receiver accepted (2xx).",
                                  value=hooks.delivered)
        yield CounterMetricFamily("aegis_webhook_failed", "Webhook deliveries given up after the last attempt.",
                                  value=hooks.failed)
        yield CounterMetricFamily("aegis_webhook_dropped", "Webhook deliveries (or pending retries) "
                                  "dropped to keep within queue_size.", value=hooks.dropped)

    def _credential_states(self) -> dict[str, int] | None:
        counts = dict.fromkeys(CREDENTIAL_STATES, 0)
        if self._vault.state == "uninitialized":
            return counts
        try:
            checks = self._vault.checked_credentials()
        except AegisError as exc:
            log.warning("metrics: cannot read credentials: %s", exc.message)
            return None
        now = now_ms()
        for check in checks:
            if check.status == OK:
                counts[expiry_state(check.credential.expires_at, now)] += 1
            else:
                counts["unchecked" if check.status == UNCHECKED else "failing"] += 1
        return counts
