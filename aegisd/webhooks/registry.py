"""Registered webhooks in the vault database, their URL and signing secret sealed with the vault.

A webhook URL is often a credential itself (Slack's and Discord's carry their secret in the
path), so the URL is sealed together with the signing secret, AES-GCM under a vault subkey with
associated data binding the row's id, its origin and its events: only the origin and the events
stay readable (for `webhook list` while the vault is locked), and an edit to either in vault.db
breaks the seal, so the webhook is not loaded (logged, and `aegisctl doctor` names it) rather
than silently subscribed to other events. Rows sealed before the origin and events were bound
are refused the same way, with their own message: their seal cannot say which events they had.
Plain http is allowed only to loopback: an alert crossing a network must be encrypted.
"""

from __future__ import annotations

import base64
import builtins
import ipaddress
import json
import logging
import secrets
import socket
import sqlite3
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

from aegisd.errors import AegisError, InvalidArgument, NotFound, StorageCorrupt, VaultLocked, VaultUninitialized
from aegisd.store import VaultStore
from aegisd.vault.crypto import SealBroken, seal, unseal
from aegisd.vault.domains import DEFAULT_PORTS, is_loopback_host
from aegisd.vault.sealing import OK, TAMPERED, UNCHECKED
from aegisd.vault.vault import Vault, now_ms
from aegisd.webhooks.events import parse_events

log = logging.getLogger("aegisd.webhooks")
SECRET_PREFIX = "whsec_"  # noqa: S105 - a marker, not a secret
ID_PREFIX = "wh_"
SUBKEY = "webhook-secrets"
MAX_URL_LENGTH = 2048
_YEAR_10000_MS = 253402300800000  # a created_at past it cannot be shown (protobuf's Timestamp ends before)
# How long `webhook add` waits for its host's addresses before taking it unchecked: each delivery checks them
# again (resolver.py), so a slow lookup only loses the early refusal, and must not hold up the command.
ADD_LOOKUP_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Webhook:
    """A webhook as the control API shows it: never its URL path or its secret."""

    id: str
    origin: str
    events: tuple[str, ...]
    created_at: int
    # Whether the row passes its check (sealing.OK, TAMPERED, UNCHECKED while locked); "" where none was made.
    integrity: str = ""


@dataclass(frozen=True, slots=True)
class Target:
    """What the dispatcher needs to deliver: the full URL and the HMAC key. Lives only in memory."""

    id: str
    url: str
    events: frozenset[str]
    secret: bytes

    def __repr__(self) -> str:  # never print the URL or the key, even in a traceback
        return f"Target(id={self.id!r})"


def check_url(url: str, gate: tuple[str, int] | None = None) -> str:
    """Validate a webhook URL and return its origin (scheme://host[:port]) with the host as deliveries send it.
    `gate`: the gate's listen address (host, port), which a webhook must not point at."""
    if len(url) > MAX_URL_LENGTH:
        raise InvalidArgument(f"the webhook URL is longer than {MAX_URL_LENGTH} characters")
    if not url.isprintable() or any(c.isspace() for c in url):
        raise InvalidArgument("the webhook URL contains spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # urllib's message quotes the port or the whole netloc, a user:password included
        raise InvalidArgument("the webhook URL is malformed: its host or port cannot be read (is a port "
                              "a number up to 65535, an IPv6 address in [brackets]?)") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InvalidArgument("the webhook URL must start with https:// (or http:// to a loopback address)")
    if not parts.hostname:
        raise InvalidArgument("the webhook URL has no host")
    if port == 0:  # no receiver listens there: every delivery would fail to connect
        raise InvalidArgument("the webhook URL's port is 0, which no receiver can listen on: give the port the "
                              "receiver listens on, or none for the scheme's default (443 for https, 80 for http)")
    if parts.username is not None or parts.password is not None:
        raise InvalidArgument("the webhook URL must not carry a user or password; receivers authenticate "
                              "deliveries by the X-Aegis-Signature header")
    if parts.fragment:
        raise InvalidArgument("the webhook URL must not have a #fragment")
    if "%" in parts.hostname:  # a zone id (`[fe80::1%25eth0]`) or an escape: yarl keeps it, getaddrinfo fails
        raise InvalidArgument("the webhook URL's host must not hold '%': no percent-encoding and no IPv6 zone id "
                              "(such as %25eth0); give the host name or address as it is")
    host = _sent_host(url)
    if host is None:
        raise InvalidArgument("the webhook URL's host is not a valid name: each dot-separated part of it must be 1 "
                              "to 63 characters long, of characters a host name may hold")
    if scheme == "http" and not is_loopback_host(host):
        raise InvalidArgument("plain http:// is allowed only to loopback (127.0.0.1, [::1], localhost); use "
                              "https:// for any other host")
    if gate is not None and reaches_gate(host, port if port is not None else DEFAULT_PORTS[scheme], *gate):
        raise InvalidArgument("the webhook URL points at aegisd's own gate (its [gate] listen address): each "
                              "delivery would be refused there and raise another alert, without end; give the "
                              "receiver's address")
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}" + (f":{port}" if port is not None else "")


def resolves_to_gate(url: str, gate: tuple[str, int]) -> bool:
    """Whether `url` (which check_url accepted) has a host name that resolves, now, to the gate's listen address, so
    that `webhook add` can refuse it with a clear message rather than have every delivery fail. Only a first word:
    a name can resolve elsewhere later, so each delivery's connection checks the addresses again (resolver.py). A
    lookup that fails, or takes longer than ADD_LOOKUP_SECONDS, is no refusal."""
    host = _sent_host(url)
    parts = urlsplit(url)
    port = parts.port if parts.port is not None else DEFAULT_PORTS[parts.scheme.lower()]
    if host is None or _address(host) is not None:  # an address (or localhost): check_url judged it already
        return False
    found: builtins.list[str] = []
    done = threading.Event()

    def lookup() -> None:  # a daemon thread: a lookup stuck on unreachable DNS is abandoned, never joined
        try:
            found.extend(str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, ValueError):  # no such name (yet), or IDNA: the deliveries will tell
            pass
        finally:
            done.set()

    threading.Thread(target=lookup, daemon=True, name="aegis-webhook-add-dns").start()
    return done.wait(ADD_LOOKUP_SECONDS) and any(reaches_gate(address, port, *gate) for address in found)


def _sent_host(url: str) -> str | None:
    """The host as each delivery sends it, or None if no delivery could look it up. aiohttp (yarl) writes it as
    lowercase A-labels (UTS #46: `。` is a dot, a Cyrillic letter becomes `xn--...`), then getaddrinfo's IDNA codec
    refuses an empty label or one over 63 characters. The origin shows this form, never urllib's Unicode one,
    so that a host cannot be shown as one place and sent to another. Said once, here, rather than at every
    delivery."""
    from yarl import URL  # aiohttp's; loaded when a webhook is added, as for its deliveries

    try:
        host = URL(url).raw_host or ""
        host.encode("idna")
    except ValueError:  # UnicodeError included
        return None
    return host if host.isascii() else None


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a connection to `host` (an IP literal, or `localhost`) goes to, as the kernel reads it:
    IPv4's short forms (`127.1`, `2130706433`) as getaddrinfo reads them, an IPv4-mapped IPv6 address as its
    IPv4 one, and the unspecified address (`0.0.0.0`, `::`) as loopback. None for any other name."""
    if host == "localhost":  # what the gate binds for it too (AF_INET); a webhook tries ::1 as well (below)
        return ipaddress.IPv4Address("127.0.0.1")
    try:
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(host)
    except ValueError:
        try:
            addr = ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_unspecified:
        addr = ipaddress.ip_address("127.0.0.1" if addr.version == 4 else "::1")
    return addr


def reaches_gate(host: str, port: int, gate_host: str, gate_port: int) -> bool:
    """Whether a delivery to host:port would reach the gate listening on gate_host:gate_port: the same address,
    or, for a gate on the unspecified address, any loopback one of its family (the gate's `::` socket is
    IPv6-only, as asyncio makes it, so 127.0.0.1 does not reach it). Its other interfaces' addresses are not
    enumerated: such a gate needs allow_non_loopback."""
    if port != gate_port:
        return False
    host, gate_host = host.lower().removesuffix("."), gate_host.lower().removesuffix(".")
    if host == gate_host:
        return True
    found = [addr for addr in (_address(host),) if addr is not None]
    if host == "localhost":
        found.append(ipaddress.IPv6Address("::1"))
    if gate_host in ("0.0.0.0", "::"):  # noqa: S104 - compared with, not bound
        family = 6 if gate_host == "::" else 4
        return any(addr.is_loopback and addr.version == family for addr in found)
    listen = _address(gate_host)
    return listen is not None and listen in found


def new_secret() -> str:
    """A 256-bit signing secret, printable, with a prefix that says what it is."""
    return SECRET_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def webhook_aad(vault_id: str, webhook_id: str, origin: str, events: str) -> bytes:
    """The seal's associated data: the vault, the row, and its clear columns exactly as stored (`events` is the
    column's JSON text), so a seal moved to another row or a clear column edited fails to open."""
    return b"aegis-webhook-v2\0" + json.dumps([vault_id, webhook_id, origin, events], separators=(",", ":"),
                                              ensure_ascii=True).encode()


def webhook_aad_v1(vault_id: str, webhook_id: str) -> bytes:
    """The associated data of seals written before the origin and events were bound: only to tell such a row
    from an edited one, in the refusal's message."""
    return b"aegis-webhook-v1\0" + vault_id.encode() + b"\0" + webhook_id.encode()


def _stored_events(events: tuple[str, ...]) -> str:
    """The events column as aegisd writes it."""
    return json.dumps(list(events))


SealedRow = tuple[object, object, object, object, object]  # id, origin, events, nonce, sealed: as read, unchecked


class WebhookRegistry:
    """Webhooks in the vault database. Methods block; call them from worker threads."""

    def __init__(self, store: VaultStore, vault: Vault, gate: tuple[str, int] | None = None) -> None:
        self._store = store
        self._vault = vault
        self._gate = gate  # the gate's listen address (host, port): a webhook there would alert on itself

    def refuse_gate_names(self, url: str) -> None:
        """InvalidArgument if the URL's host name resolves now to the gate (see resolves_to_gate). Apart from `add`:
        the lookup may take seconds, and a call cut off during it must not have stored anything."""
        check_url(url, self._gate)
        if self._gate is not None and resolves_to_gate(url, self._gate):
            raise InvalidArgument("the webhook URL's host resolves to aegisd's own gate (its [gate] listen address): "
                                  "each delivery would be refused there and raise another alert, without end (a "
                                  "delivery that would reach the gate is never sent); give the receiver's address")

    def add(self, url: str, events: builtins.list[str]) -> tuple[Webhook, str]:
        """Register a webhook; returns it and its signing secret, which is never readable again."""
        origin = check_url(url, self._gate)
        subscribed = parse_events(events)
        secret = new_secret()
        plaintext = json.dumps({"url": url, "secret": secret}).encode()
        stored = _stored_events(subscribed)
        with self._vault._lock:  # hold off a concurrent lock() from wiping the key mid-seal
            vault_id, master = self._require_initialized(), self._vault.master()
            webhook = Webhook(id=ID_PREFIX + secrets.token_hex(6), origin=origin, events=subscribed,
                              created_at=now_ms(), integrity=OK)
            nonce, sealed = seal(master.subkey(SUBKEY), plaintext, webhook_aad(vault_id, webhook.id, origin, stored))
            with self._store.transaction() as conn:
                conn.execute("INSERT INTO webhooks (id, origin, events, created_at, nonce, sealed) "
                             "VALUES (?,?,?,?,?,?)", (webhook.id, origin, stored, webhook.created_at, nonce, sealed))
        return webhook, secret

    def list(self) -> builtins.list[Webhook]:
        """Every webhook as stored, each with whether it passes the check delivery makes (OK, TAMPERED: nothing
        is sent to it), or UNCHECKED while the vault is locked, so a listing can mark a failing one."""
        self._require_initialized()
        with self._store.reading() as conn:
            rows = conn.execute("SELECT id, origin, events, created_at, nonce, sealed FROM webhooks "
                                "ORDER BY created_at, id").fetchall()
        return [_webhook(row, self._integrity((row[0], row[1], row[2], row[4], row[5]))) for row in rows]

    def _integrity(self, row: SealedRow) -> str:
        """The row checked as `targets` checks it before delivering; UNCHECKED if the vault is (or just got)
        locked. What was opened is dropped at once."""
        try:
            self._open(row)
        except VaultLocked:
            return UNCHECKED
        except StorageCorrupt:
            return TAMPERED
        return OK

    def remove(self, webhook_id: str) -> Webhook:
        self._require_initialized()
        with self._store.transaction(scrub=True) as conn:  # the row holds the webhook's sealed secret
            row = conn.execute("SELECT id, origin, events, created_at FROM webhooks WHERE id = ?",
                               (webhook_id,)).fetchone()
            if row is None:
                raise _not_found(webhook_id)
            conn.execute("DELETE FROM webhooks WHERE id = ?", (webhook_id,))
        return _webhook(row)

    def targets(self) -> builtins.list[Target]:
        """Every webhook with its URL and key unsealed. One that fails its check is logged and skipped: the
        others load all the same, and an unlock never fails over one row (doctor names it)."""
        found = []
        for row in self._sealed_rows(None):
            try:
                found.append(self._open(row))
            except StorageCorrupt as exc:
                log.error("webhook not loaded: %s", exc.message)
        return found

    def target(self, webhook_id: str) -> Target:
        """One webhook unsealed, for a test delivery."""
        rows = self._sealed_rows(webhook_id)
        if not rows:
            raise _not_found(webhook_id)
        return self._open(rows[0])

    def failing(self) -> tuple[int, builtins.list[str]]:
        """How many webhooks there are, and the ids of those that fail their check, so are not loaded; for
        doctor. Only reads."""
        rows = self._sealed_rows(None)
        bad = []
        for row in rows:
            try:
                self._open(row)
            except StorageCorrupt:
                bad.append(str(row[0]))
        return len(rows), bad

    def _sealed_rows(self, webhook_id: str | None) -> builtins.list[SealedRow]:
        self._require_initialized()
        query = "SELECT id, origin, events, nonce, sealed FROM webhooks"
        with self._store.reading() as conn:
            if webhook_id is None:
                return conn.execute(query + " ORDER BY id").fetchall()
            return conn.execute(query + " WHERE id = ?", (webhook_id,)).fetchall()

    def _open(self, row: SealedRow) -> Target:
        """The row opened and checked; StorageCorrupt, naming only the id, if it fails: any value an edit can
        leave (another type, text that is not JSON) fails here, never later in a caller.

        A seal written by an earlier aegisd, which bound neither the origin nor the events, is refused too, with
        its own message: accepting it, even once, would let anyone holding an old copy of the row put it back
        with events of their choosing, and have it sealed as if aegisd had written them."""
        webhook_id, origin, events, nonce, sealed = row
        broken = StorageCorrupt(f"webhook {webhook_id} fails authentication: its URL, origin or events were changed "
                                "outside aegisd (or its row was moved); remove it (`aegisctl webhook remove "
                                f"{webhook_id}`) and add it again", reason="webhook_tampered")
        if not (isinstance(webhook_id, str) and isinstance(origin, str) and isinstance(events, str)
                and isinstance(nonce, bytes) and isinstance(sealed, bytes)):
            raise broken
        with self._vault._lock:
            vault_id, master = self._require_initialized(), self._vault.master()
            key = master.subkey(SUBKEY)
            try:
                opened = unseal(key, nonce, sealed, webhook_aad(vault_id, webhook_id, origin, events))
            except SealBroken:
                try:
                    unseal(key, nonce, sealed, webhook_aad_v1(vault_id, webhook_id))
                except SealBroken:
                    raise broken from None
                raise StorageCorrupt(
                    f"webhook {webhook_id} was sealed by an earlier aegisd, whose seal did not cover its origin and "
                    f"events, so they cannot be trusted; remove it (`aegisctl webhook remove {webhook_id}`) and add "
                    "it again (it gets a new signing secret)", reason="webhook_sealed_by_older_aegisd") from None
        try:
            sealed_fields = json.loads(opened)
            url, secret = str(sealed_fields["url"]), str(sealed_fields["secret"])
            names = json.loads(events)
            if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
                raise broken
            subscribed = parse_events(names)
        except (ValueError, TypeError, KeyError, AegisError):
            raise broken from None
        return Target(id=webhook_id, url=url, events=frozenset(subscribed), secret=secret.encode())

    def _require_initialized(self) -> str:
        if self._vault.vault_id is None:
            raise VaultUninitialized()
        return self._vault.vault_id


def _not_found(webhook_id: str) -> NotFound:
    return NotFound(f"no webhook with id {webhook_id!r}", reason="webhook_not_found")


def _webhook(row: sqlite3.Row | tuple[object, ...], integrity: str = "") -> Webhook:
    """A row as stored, for listing, with the `integrity` its caller found: a value an edit left that aegisd
    could not have written shows as no events, and never fails the listing (the row is marked TAMPERED)."""
    try:
        stored = json.loads(str(row[2]))
    except ValueError:
        stored = None
    events = tuple(e for e in stored if isinstance(e, str)) if isinstance(stored, list) else ()
    created_at = row[3] if isinstance(row[3], int) and 0 <= row[3] < _YEAR_10000_MS else 0
    return Webhook(id=str(row[0]), origin=str(row[1]), events=events, created_at=created_at, integrity=integrity)
