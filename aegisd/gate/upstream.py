"""Connections to the real APIs: pooled, strict TLS, no redirects, and an address guard.

The guard lives in the resolver, so the address that was checked is the address the
connector dials: a hostname that resolves to loopback, private, link-local or metadata
addresses is refused unless the allowlist entry itself names such a place.
"""

from __future__ import annotations

import os
import socket
import ssl
from ipaddress import ip_address
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from aegisd.config import Config
from aegisd.vault.domains import is_internal_ip


class AddressNotAllowed(OSError):
    """Every address the name resolved to is internal, and the entry does not allow that."""


class GuardedResolver(AbstractResolver):
    """Resolves, then drops internal addresses unless this pool is for internal entries."""

    def __init__(self, allow_internal: bool) -> None:
        self._inner = ThreadedResolver()
        self._allow_internal = allow_internal

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if self._allow_internal:
            return results
        allowed = [r for r in results if not is_internal_ip(ip_address(r["host"]))]
        if not allowed:
            raise AddressNotAllowed(f"{host} resolves only to internal addresses")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def tls_context() -> ssl.SSLContext:
    """Verify against the system store, plus SSL_CERT_FILE when set (OpenSSL would use it instead)."""
    context = ssl.create_default_context()
    extra = os.environ.get("SSL_CERT_FILE")
    system = ssl.get_default_verify_paths().openssl_cafile
    if extra and system and os.path.exists(system):
        context.load_verify_locations(cafile=system)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class UpstreamPool:
    """Two pools: one that may only reach public addresses, one for entries naming internal ones."""

    def __init__(self, config: Config) -> None:
        self.timeout = aiohttp.ClientTimeout(total=config.total_timeout, sock_connect=config.connect_timeout,
                                             sock_read=config.read_timeout)
        self._tls = tls_context()
        self._sessions: dict[bool, aiohttp.ClientSession] = {}

    def session(self, allow_internal: bool) -> aiohttp.ClientSession:
        session = self._sessions.get(allow_internal)
        if session is None:
            connector = aiohttp.TCPConnector(ssl=self._tls, resolver=GuardedResolver(allow_internal),
                                             limit=0, limit_per_host=256, ttl_dns_cache=30,
                                             enable_cleanup_closed=True)
            session = aiohttp.ClientSession(connector=connector, timeout=self.timeout, auto_decompress=False,
                                            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept",
                                                               "Content-Type"),
                                            cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)
            self._sessions[allow_internal] = session
        return session

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()


def describe_connect_error(exc: Any) -> tuple[int, str, str]:
    """(status, code, message) for a failure to reach the upstream; no secrets in any of it."""
    os_error = getattr(exc, "os_error", None)
    if isinstance(os_error, AddressNotAllowed):
        return 403, "address_not_allowed", str(os_error) + "; allowlist the address itself to permit it"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return 502, "upstream_tls_error", "the upstream's TLS certificate failed verification"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return 502, "upstream_error", "the upstream host name did not resolve"
    if isinstance(exc, aiohttp.ClientSSLError):
        return 502, "upstream_tls_error", "the TLS handshake with the upstream failed"
    return 502, "upstream_error", "could not connect to the upstream"
