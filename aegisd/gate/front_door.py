"""The front door: refuse malformed or hostile request shapes before anything else looks at them.

Browsers can be made to call localhost (DNS rebinding), so the Host header must name a
loopback host. Paths must not smuggle traversal past the service segment.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import unquote

from aiohttp import web

from aegisd.gate.refusal import Refusal

LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[^:\[\]]+)(?::(\d{1,5}))?$")
_BAD_ENCODED = re.compile(r"%(2f|5c|00)", re.IGNORECASE)
SINGLE_HEADERS = ("Host", "X-Aegis-Agent", "X-Target-Host", "Authorization", "Content-Length")


def bad_request(message: str) -> Refusal:
    return Refusal(400, "bad_request", message)


def check_host_header(request: web.BaseRequest, extra_hosts: frozenset[str]) -> None:
    """Only loopback names (or the configured listen host) may address the gate."""
    hosts = request.headers.getall("Host", [])
    if len(hosts) != 1:
        raise bad_request("exactly one Host header is required")
    match = _HOST_PORT.match(hosts[0].strip())
    if not match:
        raise bad_request("the Host header is malformed")
    name = match.group(1).lower()
    if name in LOOPBACK_NAMES or name in extra_hosts:
        return
    try:
        address = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        raise Refusal(403, "host_not_allowed", "the gate answers only to loopback Host names (localhost, "
                      "127.0.0.1, [::1]); a browser page cannot reach it through another name") from None
    if not address.is_loopback:
        raise Refusal(403, "host_not_allowed", "the gate answers only to loopback Host names")


def check_shape(request: web.BaseRequest) -> None:
    """No CONNECT or absolute-form (proxy) requests; no repeated single-value headers."""
    if request.method == "CONNECT":
        raise Refusal(405, "proxy_not_supported", "CONNECT is not supported: call "
                      "http://127.0.0.1:3100/{service}/{path} instead of using the gate as a proxy")
    if not request.raw_path.startswith("/"):
        raise Refusal(400, "proxy_not_supported", "absolute-form request targets are not supported: call "
                      "/{service}/{path} on the gate")
    for name in SINGLE_HEADERS[1:]:
        if len(request.headers.getall(name, [])) > 1:
            raise bad_request(f"the {name} header must appear at most once")


def split_target(raw_target: str) -> tuple[str, str, str]:
    """`/{service}/{rest}?{query}` → (service, "/rest" still percent-encoded, raw query)."""
    path, _, query = raw_target.partition("?")
    if "\\" in path or "\x00" in path or _BAD_ENCODED.search(path):
        raise bad_request("the path contains a backslash, NUL or an encoded '/' or '\\'")
    once = unquote(path)
    for segment in (*path.split("/"), *once.split("/"), *unquote(once).split("/")):
        if segment in (".", ".."):
            raise bad_request("the path contains a '.' or '..' segment")
    if "\x00" in once:
        raise bad_request("the path contains a NUL byte")
    _, service, rest = path.split("/", 2) if path.count("/") >= 2 else (*path.split("/", 1), "")
    if not service:
        raise Refusal(404, "not_found", "call /{service}/{path}: the first path segment names the service")
    return unquote(service), "/" + rest, query
