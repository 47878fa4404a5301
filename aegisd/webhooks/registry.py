"""Registered webhooks in the vault database, their URL and signing secret sealed with the vault.

A webhook URL is often a credential itself (Slack's and Discord's carry their secret in the
path), so the URL is sealed together with the signing secret, AES-GCM under a vault subkey with
associated data binding the row's id; only the origin stays readable for `webhook list`.
Plain http is allowed only to loopback: an alert crossing a network must be encrypted.
"""

from __future__ import annotations

import base64
import builtins
import json
import logging
import secrets
import sqlite3
from dataclasses import dataclass
from ipaddress import ip_address
from urllib.parse import urlsplit

from aegisd.errors import InvalidArgument, NotFound, StorageCorrupt, VaultUninitialized
from aegisd.store import VaultStore
from aegisd.vault.crypto import SealBroken, seal, unseal
from aegisd.vault.vault import Vault, now_ms
from aegisd.webhooks.events import parse_events

log = logging.getLogger("aegisd.webhooks")
SECRET_PREFIX = "whsec_"  # noqa: S105 - a marker, not a secret
ID_PREFIX = "wh_"
SUBKEY = "webhook-secrets"
MAX_URL_LENGTH = 2048
LOOPBACK_NAMES = frozenset({"localhost", "localhost."})


@dataclass(frozen=True, slots=True)
class Webhook:
    """A webhook as the control API shows it: never its URL path or its secret."""

    id: str
    origin: str
    events: tuple[str, ...]
    created_at: int


@dataclass(frozen=True, slots=True)
class Target:
    """What the dispatcher needs to deliver: the full URL and the HMAC key. Lives only in memory."""

    id: str
    url: str
    events: frozenset[str]
    secret: bytes

    def __repr__(self) -> str:  # never print the URL or the key, even in a traceback
        return f"Target(id={self.id!r})"


def check_url(url: str) -> str:
    """Validate a webhook URL and return its origin (scheme://host[:port])."""
    if len(url) > MAX_URL_LENGTH:
        raise InvalidArgument(f"the webhook URL is longer than {MAX_URL_LENGTH} characters")
    if not url.isprintable() or any(c.isspace() for c in url):
        raise InvalidArgument("the webhook URL contains spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidArgument(f"the webhook URL is malformed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InvalidArgument("the webhook URL must start with https:// (or http:// to a loopback address)")
    host = parts.hostname or ""
    if not host:
        raise InvalidArgument("the webhook URL has no host")
    if parts.username is not None or parts.password is not None:
        raise InvalidArgument("the webhook URL must not carry a user or password; receivers authenticate "
                              "deliveries by the X-Aegis-Signature header")
    if parts.fragment:
        raise InvalidArgument("the webhook URL must not have a #fragment")
    if scheme == "http" and not _is_loopback(host):
        raise InvalidArgument(f"plain http:// is allowed only to loopback (127.0.0.1, [::1], localhost); "
                              f"use https:// for {host}")
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}" + (f":{port}" if port is not None else "")


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def new_secret() -> str:
    """A 256-bit signing secret, printable, with a prefix that says what it is."""
    return SECRET_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def _aad(vault_id: str, webhook_id: str) -> bytes:
    return b"aegis-webhook-v1\0" + vault_id.encode() + b"\0" + webhook_id.encode()


class WebhookRegistry:
    """Webhooks in the vault database. Methods block; call them from worker threads."""

    def __init__(self, store: VaultStore, vault: Vault) -> None:
        self._store = store
        self._vault = vault

    def add(self, url: str, events: builtins.list[str]) -> tuple[Webhook, str]:
        """Register a webhook; returns it and its signing secret, which is never readable again."""
        origin = check_url(url)
        subscribed = parse_events(events)
        secret = new_secret()
        plaintext = json.dumps({"url": url, "secret": secret}).encode()
        with self._vault._lock:  # hold off a concurrent lock() from wiping the key mid-seal
            vault_id, master = self._require_initialized(), self._vault.master()
            webhook = Webhook(id=ID_PREFIX + secrets.token_hex(6), origin=origin, events=subscribed,
                              created_at=now_ms())
            nonce, sealed = seal(master.subkey(SUBKEY), plaintext, _aad(vault_id, webhook.id))
            with self._store.transaction() as conn:
                conn.execute("INSERT INTO webhooks (id, origin, events, created_at, nonce, sealed) "
                             "VALUES (?,?,?,?,?,?)", (webhook.id, origin, json.dumps(list(subscribed)),
                                                      webhook.created_at, nonce, sealed))
        return webhook, secret

    def list(self) -> builtins.list[Webhook]:
        self._require_initialized()
        with self._store.reading() as conn:
            rows = conn.execute("SELECT id, origin, events, created_at FROM webhooks "
                                "ORDER BY created_at, id").fetchall()
        return [_webhook(row) for row in rows]

    def remove(self, webhook_id: str) -> Webhook:
        self._require_initialized()
        with self._store.transaction() as conn:
            row = conn.execute("SELECT id, origin, events, created_at FROM webhooks WHERE id = ?",
                               (webhook_id,)).fetchone()
            if row is None:
                raise _not_found(webhook_id)
            conn.execute("DELETE FROM webhooks WHERE id = ?", (webhook_id,))
        return _webhook(row)

    def targets(self) -> builtins.list[Target]:
        """Every webhook with its URL and key unsealed; one with a broken seal is logged and skipped."""
        found = []
        for row in self._sealed_rows(None):
            try:
                found.append(self._open(row))
            except StorageCorrupt as exc:
                log.error("%s", exc.message)
        return found

    def target(self, webhook_id: str) -> Target:
        """One webhook unsealed, for a test delivery."""
        rows = self._sealed_rows(webhook_id)
        if not rows:
            raise _not_found(webhook_id)
        return self._open(rows[0])

    def _sealed_rows(self, webhook_id: str | None) -> builtins.list[tuple[str, str, bytes, bytes]]:
        self._require_initialized()
        query = "SELECT id, events, nonce, sealed FROM webhooks"
        with self._store.reading() as conn:
            if webhook_id is None:
                return conn.execute(query + " ORDER BY id").fetchall()
            return conn.execute(query + " WHERE id = ?", (webhook_id,)).fetchall()

    def _open(self, row: tuple[str, str, bytes, bytes]) -> Target:
        webhook_id, events, nonce, sealed = row
        with self._vault._lock:
            vault_id, master = self._require_initialized(), self._vault.master()
            try:
                opened = json.loads(unseal(master.subkey(SUBKEY), nonce, sealed, _aad(vault_id, webhook_id)))
            except (SealBroken, ValueError):
                raise StorageCorrupt(f"the sealed URL and secret of webhook {webhook_id} fail authentication: "
                                     "it was modified or moved; remove it and add it again") from None
        return Target(id=webhook_id, url=str(opened["url"]), events=frozenset(json.loads(events)),
                      secret=str(opened["secret"]).encode())

    def _require_initialized(self) -> str:
        if self._vault.vault_id is None:
            raise VaultUninitialized()
        return self._vault.vault_id


def _not_found(webhook_id: str) -> NotFound:
    return NotFound(f"no webhook with id {webhook_id!r}", reason="webhook_not_found")


def _webhook(row: sqlite3.Row | tuple[str, str, str, int]) -> Webhook:
    return Webhook(id=row[0], origin=row[1], events=tuple(json.loads(row[2])), created_at=int(row[3]))
