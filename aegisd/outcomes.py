"""What happens after the gate decides: metrics, one log line per refusal, webhook events.

Called once per request, right before its ledger row is written, so it must stay cheap: an
allowed, unflagged request touches only the counters (and a debug line when debug is on).
A refusal that the ledger does not itemise (a flood of requests without a token, or of one agent's
refusals, past its budget in gate/unauthenticated.py) gets no log line: anyone who can reach the gate,
or a misbehaving agent, could otherwise fill the log. Its summary row is the record. A tokenless one
raises no webhook event either, so it cannot crowd real alerts out of the queue; an agent's still does,
so that a flood cannot hide the alert about the attempt it covers (the dispatcher bounds each agent's
share of the queue).
Logged fields are the ledger's own and never include a token, a secret or a query string;
the service is named only when the routing table knows it, so an agent cannot write
arbitrary text into the log through the path. The metrics, which anyone who can reach the gate may
read, name it only for a request whose agent holds a grant for it (metrics.service_label).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from aegisd.gate.routing import Route, RoutingState, RoutingTable
from aegisd.ledger import LedgerEntry
from aegisd.logs import event
from aegisd.metrics import NO_AGENT, GateMetrics, service_label
from aegisd.webhooks import Webhooks
from aegisd.webhooks.events import details, events_for

LEFT = "client_disconnected"  # a denied row with this reason: the agent left before its request was sent

log = logging.getLogger("aegisd.gate")


class OutcomeSink:
    """Turns each gate outcome into metrics, log lines and webhook events."""

    def __init__(self, routing: RoutingState, metrics: GateMetrics | None, webhooks: Webhooks) -> None:
        self.metrics = metrics
        self._routing = routing
        self._webhooks = webhooks
        self._known: Mapping[str, Route] = {}
        self._table: RoutingTable | None = None

    def follow_table(self) -> None:
        """Take up the routing table's current names, once per new table: the services to name in the metrics,
        and which agents' and services' series the metrics keep. While locked, the names of the last unlock."""
        table = self._routing.table
        if table is None or table is self._table:
            return
        self._table, self._known = table, table.routes
        if self.metrics is not None:
            self.metrics.retain({agent.name for agent in table.agents_by_hash.values()}, table.routes.keys())

    def record(self, entry: LedgerEntry, upstream_seconds: float | None, itemised: bool = True) -> None:
        """`itemised`: the ledger gives this outcome a row of its own; if not, it is only counted."""
        try:
            self._record(entry, upstream_seconds, itemised)
        except Exception:  # metrics and alerts must never cost a request its answer or its ledger row
            log.exception("recording a gate outcome for metrics, log and webhooks failed")

    def _record(self, entry: LedgerEntry, upstream_seconds: float | None, itemised: bool) -> None:
        self.follow_table()
        denied = entry.decision == "denied"
        if self.metrics is not None:
            # The credential is set once the grant check passed: only then is the service's name the agent's to see.
            granted = entry.credential != "" and entry.reason != "not_granted"
            self.metrics.observe(service_label(entry.service, granted, self._known), entry.method, entry.status,
                                 entry.agent or NO_AGENT, entry.reason, denied, entry.duration_ms / 1000,
                                 upstream_seconds)
        if not denied:
            if log.isEnabledFor(logging.DEBUG):
                event(log, logging.DEBUG, "request allowed", request_id=entry.request_id, agent=entry.agent,
                      service=self._log_name(entry.service), method=entry.method, status=entry.status,
                      duration_ms=entry.duration_ms)
            if not entry.flags:
                return
        elif not itemised:  # counted in the metrics and in the ledger's summary row (a *_flood system row)
            if entry.agent:
                self._notify(entry)
            return
        else:
            what = "request not sent: the agent left" if entry.reason == LEFT else "request refused"
            event(log, logging.INFO, what, request_id=entry.request_id, agent=entry.agent or "-",
                  service=self._log_name(entry.service), reason=entry.reason, status=entry.status)
        self._notify(entry)

    def _log_name(self, service: str) -> str:
        """The operator's log names any service the vault defines (a not_granted refusal says which was tried)."""
        return service_label(service, True, self._known)

    def _notify(self, entry: LedgerEntry) -> None:
        dispatcher = self._webhooks.dispatcher
        if not dispatcher.has_subscribers:
            return
        found = details(entry)
        for name in events_for(entry):
            if name == "credential_expiry":
                route = self._known.get(entry.service)
                expires_at = route.expires_at if route is not None else None
                self._webhooks.expiry.on_refused(found, entry.credential, entry.service, expires_at)
            elif dispatcher.wants(name):
                dispatcher.emit(name, found, unauthenticated=not entry.agent, agent=entry.agent)
