"""The front door: refuse malformed or hostile request shapes before anything else looks at them.

Browsers can be made to call localhost (DNS rebinding), so the Host header must name a
loopback host. Paths must not smuggle traversal past the service segment.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from urllib.parse import unquote

from multidict import CIMultiDictProxy

from aegisd.gate.agent_connection import GateRequest
from aegisd.gate.refusal import Refusal

LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})
# The Host names nearly every agent sends, matched without the regex or an address parse: the names
# above plus the loopback literals that `ipaddress` would accept anyway (lowercase, without the port).
_USUAL_HOSTS = LOOPBACK_NAMES | {"127.0.0.1", "[::1]"}
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[^:\[\]]+)(?::(\d{1,5}))?$")
_BAD_ENCODED = re.compile(r"%(2f|5c|00)", re.IGNORECASE)
_LONE_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")  # `%u002e`, `%zz`, a `%` at the end
_WIDE_ESCAPE = re.compile(r"%u[0-9A-Fa-f]{4}")  # IIS's and ASP.NET's `%u002e`
SINGLE_HEADERS = ("Host", "X-Aegis-Agent", "X-Target-Host", "Authorization", "Content-Length")
_AT_MOST_ONCE = SINGLE_HEADERS[1:]  # Host must appear exactly once: check_host_header's business
# A 405 must say what is allowed (RFC 9110): the gate forwards any method but CONNECT; these are the usual ones.
_CONNECT_ALLOW = {"Allow": "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"}
_NONE: tuple[str, ...] = ()  # getall's default, shared so a missing header allocates nothing


def bad_request(message: str) -> Refusal:
    return Refusal(400, "bad_request", message)


def check_host_header(headers: CIMultiDictProxy[str], extra_hosts: frozenset[str]) -> None:
    """Only loopback names (or the configured listen host) may address the gate."""
    hosts = headers.getall("Host", _NONE)
    if len(hosts) != 1:
        raise bad_request("exactly one Host header is required")
    value = hosts[0].strip()
    if _usual_host(value):
        return
    match = _HOST_PORT.match(value)
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


def _usual_host(value: str) -> bool:
    """A loopback name or literal with, at most, a well-formed port: exactly the values the regex and the
    address parse in check_host_header would accept as such, found with a split and a set lookup."""
    name, colon, port = value.rpartition(":")
    if not colon or port.endswith("]"):  # no port, or the colon was inside "[::1]"
        return value.lower() in _USUAL_HOSTS
    return 0 < len(port) <= 5 and port.isascii() and port.isdigit() and name.lower() in _USUAL_HOSTS


def gate_url(host: str, port: int) -> str:
    """The base URL an agent on this machine calls the gate listening on host:port by, for refusals to name: a
    gate on every address (0.0.0.0, ::) is reached on loopback."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"http://{host}:{port}"
    if address.is_unspecified:
        address = ipaddress.ip_address("127.0.0.1" if address.version == 4 else "::1")
    return f"http://[{address}]:{port}" if address.version == 6 else f"http://{address}:{port}"


def check_shape(request: GateRequest, base_url: str) -> None:
    """No CONNECT or absolute-form (proxy) requests; no repeated single-value headers. `base_url`: the gate's own
    (gate_url), which the CONNECT refusal tells the agent to call instead."""
    if request.method == "CONNECT":
        raise Refusal(405, "proxy_not_supported", f"CONNECT is not supported: call {base_url}/{{service}}/{{path}} "
                      "instead of using the gate as a proxy", headers=_CONNECT_ALLOW)
    if not request.raw_path.startswith("/"):
        raise Refusal(400, "proxy_not_supported", "absolute-form request targets are not supported: call "
                      "/{service}/{path} on the gate")
    headers = request.headers
    for name in _AT_MOST_ONCE:
        if len(headers.getall(name, _NONE)) > 1:
            raise bad_request(f"the {name} header must appear at most once")


def split_target(raw_target: str) -> tuple[str, str, str]:
    """`/{service}/{rest}?{query}` → (service, "/rest" still percent-encoded, raw query).

    A `#fragment` (which no HTTP client sends) is dropped first, so that policy rules, inspection, the
    ledger and the upstream all see the same path and query.
    """
    path, _, query = raw_target.partition("#")[0].partition("?")
    encoded = "%" in path
    if "\\" in path or "\x00" in path or (encoded and _BAD_ENCODED.search(path)):
        raise bad_request("the path contains a backslash, NUL or an encoded '/' or '\\'")
    if encoded:
        once = _decoded_strictly(path, _LONE_PERCENT, "the path")
        twice = _decoded_strictly(once, _WIDE_ESCAPE, "the path, decoded once,") if "%" in once else once
        if twice.isascii():
            _refuse_dot_segments(path, once, twice)
        else:  # fullwidth dots and slashes (U+FF0E, U+FF0F), which NFKC and IIS's best-fit mapping make '.' and '/'
            _refuse_dot_segments(path, once, twice, unicodedata.normalize("NFKC", twice))
        if "\x00" in once:
            raise bad_request("the path contains a NUL byte")
    elif "." in path:  # undecoded, the path is all its decoded forms; without a dot it has no dot segment
        _refuse_dot_segments(path)
    _, service, rest = path.split("/", 2) if path.count("/") >= 2 else (*path.split("/", 1), "")
    if not service:
        raise Refusal(404, "not_found", "call /{service}/{path}: the first path segment names the service")
    # `/svc//evil.example/x` would go upstream as `//evil.example/x`, which a proxying upstream may read as a
    # scheme-relative URL to another host, the credential with it; checked decoded too, as dot segments are.
    if rest.startswith("/") or (encoded and _scheme_relative(rest)):
        raise bad_request("the path after the service starts with '//', which an upstream may read as another "
                          "host (a scheme-relative URL): send /{service}/{path} with one '/' after the service")
    return unquote(service) if encoded else service, "/" + rest, query


def _decoded_strictly(form: str, escapes: re.Pattern[str], where: str) -> str:
    """`form` decoded once, refused where servers disagree on what it decodes to: policy rules judge the decoded
    path, while an upstream that reads `%u002e` (ASP.NET, IIS) or the overlong UTF-8 `%C0%AE` (older Java
    servers) as '.' would see a '..' segment the rules never saw. Applied to the path as sent (`escapes`: any
    '%' not followed by two hex digits) and once more to the path decoded once, as an upstream that decodes twice
    reads it (`escapes`: `%uXXXX` only, since `100%25` is a path ending in `100%`)."""
    if escapes.search(form):
        raise bad_request(f"{where} holds a '%' not followed by two hex digits (such as %u002e), which servers "
                          "decode in different ways: percent-encode a literal '%' as %25")
    try:
        return unquote(form, errors="strict")
    except UnicodeDecodeError:
        raise bad_request(f"{where} holds percent-encoding that does not decode to UTF-8 (such as the overlong "
                          "%C0%AE), which servers decode in different ways") from None


def _scheme_relative(rest: str) -> bool:
    """Whether `/rest`, decoded once or twice, starts with `//`."""
    once = unquote(rest)
    return once.startswith("/") or unquote(once).startswith("/")


def _refuse_dot_segments(*forms: str) -> None:
    """A '.' or '..' segment in the path as sent or in any of its decoded forms would let it climb out. So
    would one with `;` parameters (`..;`, `..;x=1`): Java servlet containers (Tomcat, Jetty, Spring) drop a
    segment's parameters and then resolve what is left, so `/repos/acme/..;/..;/admin` reaches /admin there
    while policy rules and the ledger see a path under /repos/acme. Spaces around the dots count too (`%20..`):
    IIS trims them from a segment."""
    for form in forms:
        for segment in form.split("/"):
            if segment.partition(";")[0].strip() in (".", ".."):
                raise bad_request("the path contains a '.' or '..' segment (with or without ';' parameters)")
