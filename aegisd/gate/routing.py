"""The gate's in-memory view of the vault: services, agents and grants, rebuilt on every change.

Built in a worker thread whenever the vault unlocks or its contents change, and swapped in
whole, so the hot path reads one immutable snapshot and never touches SQLite. Dropped the
moment the vault locks.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import ipaddress
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import quote

from aegisd.agents import AgentRegistry
from aegisd.errors import AegisError, VaultLocked
from aegisd.gate.headers import GATE_HEADERS, HOP_BY_HOP, ROUTING_HEADERS, cgi_name, plain_name
from aegisd.inspection import Inspector, SecretSource
from aegisd.inspection.secret_forms import secret_values
from aegisd.vault.credentials import Credential
from aegisd.vault.crypto import keyed_hasher
from aegisd.vault.domains import AllowedHost, DomainAllowlist, is_loopback_host
from aegisd.vault.sealing import NOT_ADOPTED, OK, TAMPERED, UNCHECKED
from aegisd.vault.vault import Vault

log = logging.getLogger("aegisd.gate")
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Always stripped from what an agent sends: it may not choose the upstream's credentials.
AGENT_AUTH_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key"})
# Why a credential row is left out of the table, and what to do, by its SealCheck status.
NOT_SERVED = {
    TAMPERED: "fails authentication (its sealed secret, or the metadata sealed with it, was changed outside aegisd "
              "or moved), so it is not served: remove the row (`aegisctl vault remove --id {id}`) and add the "
              "credential again as you intend it",
    NOT_ADOPTED: "comes from an older aegisd, so it is not served until adopted: check `aegisctl vault adopt`",
}


@dataclass(frozen=True, slots=True)
class Route:
    """One credential as the gate applies it."""

    credential_id: str
    name: str
    service: str
    allowlist: DomainAllowlist
    default_entry: AllowedHost | None
    methods: frozenset[str] | None  # None: every method (scope "*")
    scopes: tuple[str, ...]  # as the operator set them, for the agent's own view (/_aegis/services)
    auth_type: str
    expires_at: int | None
    inject_header: tuple[str, str] | None
    inject_query: tuple[str, str] | None
    # Lowercase names of the agent's headers never forwarded: hop-by-hop, the gate's own, the routing headers,
    # the agent's credentials and this credential's header. One set per route, so no request builds it.
    drop_headers: frozenset[str]
    # The CGI variables (headers.cgi_name) of the agent's credentials, this credential's header and the routing
    # headers: an agent's `X_Api_Key` is dropped too, since a CGI-style upstream may read it as the injected
    # `X-Api-Key` (and `X_Forwarded_Host` as `X-Forwarded-Host`).
    dropped_cgi_names: frozenset[str]
    # Some of those names is itself spelt with `_` or `.` (`--header-name X_Api_Token`): then an agent's plainly
    # spelt `X-Api-Token` shares its CGI variable, and every request compares CGI names.
    spelt_credential_names: bool
    rate_limit: str
    body_inspection: str
    secret: bytes  # for the inspection and redaction steps; never logged

    def allows_method(self, method: str) -> bool:
        return self.methods is None or method in self.methods


@dataclass(frozen=True, slots=True)
class AgentEntry:
    id: str
    name: str
    credential_ids: frozenset[str]
    rate_limit: str


@dataclass(frozen=True, slots=True)
class RoutingTable:
    routes: dict[str, Route]
    agents_by_hash: dict[bytes, AgentEntry]
    token_key: bytes
    inspector: Inspector  # every secret's search forms, compiled once per build (steps 8 and 11)
    # agents.token_hash's function, keyed once per table rather than once per request
    _token_hash: Callable[[bytes], bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_token_hash", keyed_hasher(self.token_key))

    def agent_for(self, token: str) -> AgentEntry | None:
        """Constant-time in the token: a keyed hash, then one lookup on the digest."""
        # surrogateescape: header bytes that are not UTF-8 come back as they were sent, and match no agent
        return self.agents_by_hash.get(self._token_hash(token.encode("utf-8", "surrogateescape")))


def _methods(scopes: list[str]) -> frozenset[str] | None:
    if "*" in scopes:
        return None
    allowed: set[str] = set()
    if "read" in scopes:
        allowed |= READ_METHODS
    if "write" in scopes:
        allowed |= WRITE_METHODS
    return frozenset(allowed)


def build_route(cred: Credential, secret: bytes) -> Route:
    text = secret.decode()
    header: tuple[str, str] | None = None
    query: tuple[str, str] | None = None
    strip = set(AGENT_AUTH_HEADERS)
    if cred.auth_type == "bearer":
        header = ("Authorization", f"Bearer {text}")
    elif cred.auth_type == "basic":
        header = ("Authorization", "Basic " + base64.b64encode(secret).decode())
    elif cred.auth_type == "header":
        header = (cred.header_name, text)
        strip.add(cred.header_name.lower())
    else:
        query = (cred.query_param, quote(text, safe=""))
    allowlist = DomainAllowlist.parse(cred.domains)
    return Route(
        credential_id=cred.id, name=cred.name, service=cred.service, allowlist=allowlist,
        default_entry=allowlist.default_entry(), methods=_methods(cred.scopes), scopes=tuple(cred.scopes),
        auth_type=cred.auth_type, expires_at=cred.expires_at,
        inject_header=header, inject_query=query, drop_headers=HOP_BY_HOP | GATE_HEADERS | ROUTING_HEADERS | strip,
        dropped_cgi_names=frozenset(map(cgi_name, strip | ROUTING_HEADERS)),
        spelt_credential_names=not plain_name("".join(strip)),
        rate_limit=cred.rate_limit, body_inspection=cred.body_inspection, secret=secret,
    )


class RoutingState:
    """Holds the current table; rebuilds are serialised so the newest state always wins."""

    def __init__(self, vault: Vault, agents: AgentRegistry) -> None:
        self._vault = vault
        self._agents = agents
        self._lock = threading.Lock()
        self.table: RoutingTable | None = None
        self._routes: dict[tuple[str, bytes], Route] = {}  # by credential id and sealing; see rebuild

    def on_vault_event(self, event: str) -> None:
        """Rebuild for a vault change. A failure leaves no table (the gate refuses everything) and is logged:
        it must not fail the change that was already written, nor the unlock that caused it."""
        try:
            if event == "locked":
                with self._lock:  # after any rebuild in progress, so it cannot put a table back
                    if self._vault.state != "unlocked":  # else an unlock overtook this lock and has built
                        self.table, self._routes = None, {}
            elif event == "agents":
                self.rebuild_agents()
            else:
                self.rebuild()
        except VaultLocked:  # locked while rebuilding: the "locked" event that follows clears the table
            with self._lock:
                self.table, self._routes = None, {}
        except Exception as exc:
            with self._lock:
                self.table, self._routes = None, {}
            log.error("the gate's routing table could not be rebuilt (%s: %s), so it refuses every request until "
                      "the next change or unlock", type(exc).__name__,
                      exc.message if isinstance(exc, AegisError) else "see the traceback at debug level")
            log.debug("routing rebuild failed", exc_info=True)

    def rebuild_agents(self) -> None:
        """An agent or grant changed: keep the routes and their inspector, which cost the most to build."""
        with self._lock:
            table = self.table
            if table is None or self._vault.state != "unlocked":
                self.table = None
            else:
                self.table = dataclasses.replace(table, agents_by_hash=self._agent_entries())

    def _agent_entries(self) -> dict[bytes, AgentEntry]:
        return {a.token_hash: AgentEntry(a.id, a.name, a.credential_ids, a.rate_limit)
                for a in self._agents.snapshot()}

    def rebuild(self) -> None:
        """A credential changed, or the vault unlocked. Routes are kept per sealing (a credential's row as last
        sealed) and the inspector while the set of secrets stands, so a change costs what it touched."""
        with self._lock:
            self.table = self._build() if self._vault.state == "unlocked" else None
            if self.table is None:
                self._routes = {}

    def _route_or_none(self, cred: Credential, secret: bytes) -> Route | None:
        """The credential's route, or None if its stored settings no longer build one (a newer domain library
        refusing an allowlist entry it once took): that credential is not served, the others still are."""
        try:
            return build_route(cred, secret)
        except Exception as exc:
            reason = exc.message if isinstance(exc, AegisError) else type(exc).__name__
            log.error("credential %r (%s) cannot be served: %s; set its settings again with `aegisctl vault update`",
                      cred.name, cred.id, reason)
            return None

    def _build(self) -> RoutingTable | None:
        """A new table from the credentials that authenticate; None if the vault locked meanwhile."""
        master = self._vault.master()
        checks = self._vault.checked_credentials()
        if any(check.status == UNCHECKED for check in checks):
            return None
        routes, built = {}, {}
        for check in checks:
            if check.status != OK or check.secret is None:
                why = NOT_SERVED.get(check.status, "could not be checked, so it is not served")
                log.error("credential %r (%s) %s", check.credential.name, check.credential.id,
                          why.format(id=check.credential.id))
                continue
            key = (check.credential.id, check.seal)
            route = self._routes.get(key) or self._route_or_none(check.credential, check.secret)
            if route is not None:
                built[key] = routes[route.service] = route
        self._routes = built
        agents = self._agent_entries()
        sources = {r.credential_id: secret_values(r.secret, r.auth_type) for r in routes.values()}
        groups = credentials_sharing_hosts(routes.values())
        inspector = self.table.inspector if self.table is not None else None
        if inspector is None or inspector.values != sources or inspector.groups != groups:
            inspector = Inspector((SecretSource(cid, values) for cid, values in sources.items()), groups,
                                  previous=inspector)
        return RoutingTable(routes, agents, bytes(master.subkey("agent-tokens")), inspector)


def credentials_sharing_hosts(routes: Iterable[Route]) -> dict[str, frozenset[str]]:
    """The groups of credentials whose answers are redacted of each other's secrets, by credential id (each
    group holds its own members; a credential alone on its hosts has none). Two credentials share when their
    allowlists reach a common host (the same host, or one under the same `*.` parent), whatever the scheme or
    port: an upstream there may store what one sent (a request-bin, an audit log) and echo it to the other.
    Groups are closed under sharing, so a host with a thousand credentials compiles one redaction, not a
    thousand each of a thousand secrets."""
    routes = list(routes)
    wildcards = {entry.host for route in routes for entry in route.allowlist.entries if entry.wildcard}
    buckets: dict[tuple[str, str], list[str]] = {}  # ("host", h): exact entries; ("under", p): `*.p` and p's children
    for route in routes:
        for entry in route.allowlist.entries:
            first, dot, parent = entry.host.partition(".")
            if entry.wildcard:
                buckets.setdefault(("under", entry.host), []).append(route.credential_id)
                if _server(entry.host) == LOOPBACK:  # `*.api.localhost`: every name it covers is this machine
                    buckets.setdefault(("host", LOOPBACK), []).append(route.credential_id)
                continue
            buckets.setdefault(("host", _server(entry.host)), []).append(route.credential_id)
            if first and dot and parent in wildcards:  # siblings share no host unless a wildcard covers both
                buckets.setdefault(("under", parent), []).append(route.credential_id)
    leader: dict[str, str] = {}

    def find(cid: str) -> str:
        while leader.setdefault(cid, cid) != cid:
            leader[cid] = leader[leader[cid]]
            cid = leader[cid]
        return cid

    for members in buckets.values():
        for other in members[1:]:
            leader[find(other)] = find(members[0])
    groups: dict[str, set[str]] = {}
    for cid in leader:
        groups.setdefault(find(cid), set()).add(cid)
    return {cid: frozen for group in groups.values() if len(group) > 1
            for frozen in (frozenset(group),) for cid in group}


LOOPBACK = "loopback"  # the one server every loopback name and address reaches


@functools.lru_cache(maxsize=4096)  # a pure function of the name, asked again for every entry at each change
def _server(host: str) -> str:
    """One name per server an exact entry reaches: every loopback name and address is this machine (and any name
    under `localhost`, which RFC 6761 reserves for it and systemd-resolved and macOS resolve to it: found at the
    29th stop), and an IPv4-mapped IPv6 address is its IPv4 one. (A name and the address it resolves to are not
    joined.)"""
    if is_loopback_host(host) or host.rstrip(".").endswith(".localhost"):
        return LOOPBACK
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return LOOPBACK if mapped is not None and mapped.is_loopback else str(mapped or address)
