"""Domain allowlists: the hosts the gate may forward each credential to.

Operator entries and the agent's target host both pass through one canonicaliser (lowercase, IDNA
A-labels, no trailing dot, no smuggling characters), so hosts are only ever compared in a single form.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

import idna
from publicsuffixlist import PublicSuffixList

from aegisd.errors import InvalidArgument

DEFAULT_PORTS: dict[str, int] = {"https": 443, "http": 80}

_MAX_INPUT = 300  # longest host (253) + scheme + brackets + port, with room to spare
_MAX_HOST = 253
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")  # what URL parsers would read as an IPv4 part
_PORT = re.compile(r"[0-9]{1,5}")
_FORBIDDEN = {
    "@": "userinfo ('user@') is not allowed",
    "/": "a path is not allowed; give only host[:port], optionally after http:// or https://",
    "?": "a query string is not allowed",
    "#": "a fragment is not allowed",
    "\\": "a backslash is not allowed",
    "%": "percent-encoding is not allowed",
}
_INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})  # control, format and space characters
_METADATA_IPS = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
_SPECIAL_NAMES = frozenset({"localhost", "metadata.google.internal"})
# IPv6 ranges whose last 32 bits are an IPv4 address a translator or tunnel reaches (`ipv4_mapped` and 6to4's
# `sixtofour` are read separately): NAT64's well-known prefix (RFC 6052), SIIT's IPv4-translated ::ffff:0:0:0/96
# (RFC 2765) and the deprecated IPv4-compatible ::/96.
_EMBEDS_IPV4 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("::ffff:0:0:0/96"),
                ipaddress.IPv6Network("::/96"))
# Never global, whatever Python's `is_global` says of them: NAT64 for local use (RFC 8215), whose translators embed
# the IPv4 address at any of several offsets, and the deprecated site-local fec0::/10 (RFC 3879).
_INTERNAL_V6 = (ipaddress.IPv6Network("64:ff9b:1::/48"), ipaddress.IPv6Network("fec0::/10"))
_METADATA_NAMES = frozenset({"metadata.google.internal"})
# Loopback by name: `localhost` only, which the system answers itself (/etc/hosts, systemd-resolved). The fully
# qualified `localhost.` is not: glibc sends it to DNS, which may answer with any address, and plain http must
# never leave the host. (An allowlist entry loses its trailing dot when canonicalised, and the gate then connects
# to the dotless name, so there `localhost.` is `localhost`.)
LOOPBACK_NAMES = frozenset({"localhost"})


class DomainError(InvalidArgument, ValueError):
    """A domain entry or target host that is malformed, ambiguous or too broad."""

    reason = "invalid_domain"


class AmbiguousTarget(Exception):
    """A target host that entries of more than one scheme or port fit, because the agent named neither: the gate
    must not pick one for it. `entries` are those that fit, in allowlist order (exact entries first)."""

    def __init__(self, entries: tuple[AllowedHost, ...]) -> None:
        super().__init__(", ".join(map(str, entries)))
        self.entries = entries


@dataclass(frozen=True, slots=True)
class AllowedHost:
    """One canonical allowlist entry; build it with `parse_allowed_host`.

    `host` is an A-label name (for a wildcard, the part after `*.`), a dotted IPv4 address, or a
    compressed IPv6 address without brackets.
    """

    scheme: str
    host: str
    port: int
    wildcard: bool = False

    def __str__(self) -> str:
        text = ("*." if self.wildcard else "") + _bracketed(self.host)
        if self.scheme == "https" and self.port == DEFAULT_PORTS["https"]:
            return text
        if self.port != DEFAULT_PORTS[self.scheme]:
            text = f"{text}:{self.port}"
        return f"{self.scheme}://{text}"

    @property
    def netloc(self) -> str:
        """The `Host` header value: the port appears only when it is not the scheme's default."""
        host = _bracketed(self.host)
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def is_ip(self) -> bool:
        """True for an IP literal entry, which the gate must not resolve or widen."""
        return _ip(self.host) is not None

    @property
    def is_special_address(self) -> bool:
        """True when the entry points inside the machine or network (loopback, private, link-local,
        cloud metadata), so forwarding a credential there deserves a warning."""
        return _is_special_host(self.host)

    @property
    def is_plain_http_off_host(self) -> bool:
        """True for a plain `http://` entry to anything but loopback: the secret would cross a network in clear."""
        return self.scheme == "http" and not is_loopback_host(self.host)

    @property
    def is_link_local_or_metadata(self) -> bool:
        """True for a link-local address (169.254.0.0/16, fe80::/10) or a cloud metadata endpoint: accepted,
        but where a credential rarely belongs, so worth a warning."""
        if self.host in _METADATA_NAMES:
            return True
        addr = _ip(self.host)
        embedded = _embedded_ipv4(addr) if isinstance(addr, ipaddress.IPv6Address) else None
        return any(a in _METADATA_IPS or a.is_link_local for a in (addr, embedded) if a is not None)

    def matches(self, scheme: str, host: str, port: int) -> bool:
        """Whether an already canonical scheme, host and port fall under this entry."""
        if scheme != self.scheme or port != self.port:
            return False
        if not self.wildcard:
            return host == self.host
        first, dot, parent = host.partition(".")
        return bool(first) and bool(dot) and parent == self.host


@functools.lru_cache(maxsize=1024)
def _is_special_host(host: str) -> bool:
    """`AllowedHost.is_special_address`, remembered per host: the gate asks it for every request it forwards
    and an address parse plus `is_global` cost microseconds. Hosts come from operator entries: few."""
    addr = _ip(host)
    if addr is None:
        return host in _SPECIAL_NAMES or host.endswith(".localhost")
    return is_internal_ip(addr)


def is_internal_ip(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Loopback, private, link-local, metadata, multicast or otherwise not globally routable:
    where a forwarded credential would reach inside the machine or network. An IPv6 address that carries an
    IPv4 one (mapped, NAT64, 6to4, IPv4-compatible) is internal when that IPv4 address is."""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        else:
            embedded = _embedded_ipv4(addr)
            if (embedded is not None and is_internal_ip(embedded)) or any(addr in net for net in _INTERNAL_V6):
                return True
    return addr in _METADATA_IPS or not addr.is_global or addr.is_multicast


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries for a translator or tunnel: mapped, 6to4, NAT64, SIIT, compatible."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if any(addr in network for network in _EMBEDS_IPV4):
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def is_loopback_host(host: str) -> bool:
    """Whether plain http to `host` stays on this machine: `localhost` (LOOPBACK_NAMES) or a loopback address
    (127.0.0.0/8, ::1). `host` is lowercase and without brackets, as URL parsers and the canonicaliser give it.
    The one rule for webhooks and credential allowlists alike."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_allowed_host(text: str) -> AllowedHost:
    """Canonicalise and validate one operator entry, so the vault stores only unambiguous hosts."""
    what = f"domain entry {quoted(text)}"
    _check_length(text, what)
    scheme, sep, rest = text.partition("://")
    if sep:
        scheme = scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise DomainError(f"{what}: scheme {scheme!r} is not allowed; use https:// or http://")
    else:
        scheme, rest = "https", text
    _check_chars(rest, what)
    wildcard = rest.startswith("*.")
    if wildcard:
        rest = rest[2:]
    if "*" in rest:
        raise DomainError(f"{what}: '*' is only allowed as the whole first label, as in '*.example.com'")
    raw_host, bracketed, port = _split_host_port(rest, what)
    host, is_ip = _canonical_host(raw_host, bracketed, what)
    if wildcard and is_ip:
        raise DomainError(f"{what}: a wildcard cannot cover an IP address")
    if wildcard and not _is_registrable_or_below(host):
        raise DomainError(
            f"{what}: wildcard too broad: {host!r} is a public suffix, so '*.{host}' "
            "would match sites of unrelated owners"
        )
    if not wildcard and not is_ip and _is_known_public_suffix(host):
        raise DomainError(f"{what}: {host!r} is a public suffix, not a host")
    return AllowedHost(scheme, host, DEFAULT_PORTS[scheme] if port is None else port, wildcard)


@functools.lru_cache(maxsize=256)
def canonical_target(text: str) -> tuple[str, int | None, str | None]:
    """Canonicalise the agent's untrusted target host once, refusing anything a URL parser could
    read differently; returns (host, port or None, scheme or None). IPv6 comes back without brackets.

    The form `/_aegis/services` lists an entry in is accepted: `host[:port]`, optionally after `http://` or
    `https://` (in any case). With a scheme the port is that scheme's default when none is given, as in a
    URL, and only an entry of that scheme can match; without one, a missing port means the entry's own.

    Remembered per text, since agents name the same few hosts on every request and the checks cost
    microseconds; only accepted texts (at most 300 characters) are kept, as a refusal raises.
    """
    what = f"target host {quoted(text)}"
    _check_length(text, what)
    scheme: str | None = None
    given, sep, rest = text.partition("://")
    if sep:
        scheme = given.lower()
        if not given.isascii() or scheme not in DEFAULT_PORTS:
            raise DomainError(f"{what}: scheme {quoted(given)} is not allowed; give only host[:port], optionally after "
                              "http:// or https://")
        text = rest
        if not text:
            raise DomainError(f"{what}: the host is empty")
    _check_chars(text, what)
    if "*" in text:
        raise DomainError(f"{what}: '*' is not allowed in a target host")
    raw_host, bracketed, port = _split_host_port(text, what)
    host, _ = _canonical_host(raw_host, bracketed, what)
    if scheme is not None and port is None:
        port = DEFAULT_PORTS[scheme]
    return host, port, scheme


def target_text(host: str, port: int | None, scheme: str | None) -> str:
    """A canonical target as the agent gave it, for messages: the scheme if it gave one, the port if it is not
    implied (none given without a scheme; the scheme's default with one)."""
    shown = _bracketed(host)
    if scheme is not None:
        shown = f"{scheme}://{shown}"
    if port is not None and (scheme is None or port != DEFAULT_PORTS[scheme]):
        shown = f"{shown}:{port}"
    return shown


class DomainAllowlist:
    """A credential's allowlist, indexed so that matching a host is a dict lookup."""

    __slots__ = ("_default", "_hosts", "_wildcards", "entries")

    def __init__(self, entries: Iterable[AllowedHost]) -> None:
        self.entries: tuple[AllowedHost, ...] = tuple(dict.fromkeys(entries))
        if not self.entries:
            raise DomainError("the domain allowlist is empty; give at least one host")
        exact: dict[str, list[AllowedHost]] = {}
        wildcards: dict[str, list[AllowedHost]] = {}
        for entry in self.entries:
            table = wildcards if entry.wildcard else exact
            table.setdefault(entry.host, []).append(entry)
        self._wildcards = {parent: tuple(found) for parent, found in wildcards.items()}
        # Per exact host, every entry that covers it: its own, then the wildcards over it (so exact ones win), built
        # once per allowlist so that a match stays one lookup.
        self._hosts: dict[str, tuple[AllowedHost, ...]] = {}
        for host, found in exact.items():
            first, dot, parent = host.partition(".")
            self._hosts[host] = (*found, *(self._wildcards.get(parent, ()) if first and dot else ()))
        only = self.entries[0]
        self._default = only if len(self.entries) == 1 and not only.wildcard else None

    @classmethod
    def parse(cls, entries: Iterable[str]) -> DomainAllowlist:
        """Build from operator text entries; duplicates are dropped and order is kept."""
        if isinstance(entries, str):
            raise TypeError("DomainAllowlist.parse takes a list of entries, not one string")
        return cls(parse_allowed_host(entry) for entry in entries)

    def __str__(self) -> str:
        return ",".join(self.as_strings())

    def __repr__(self) -> str:
        return f"DomainAllowlist({self.as_strings()!r})"

    def as_strings(self) -> list[str]:
        """The canonical entries, in the form `parse` accepts back."""
        return [str(entry) for entry in self.entries]

    def as_targets(self) -> list[str]:
        """The entries as an agent names each exactly in X-Target-Host (what `/_aegis/services` lists): as
        `as_strings`, but an entry written without scheme or port (https on 443) whose host other entries cover
        too gets its `https://`, since without it that host is ambiguous (`https://api.example.com`, beside
        `https://api.example.com:8443`)."""
        shown = []
        for entry, text in zip(self.entries, self.as_strings(), strict=True):
            if "://" not in text:
                covering = self._wildcards[entry.host] if entry.wildcard else self.entries_for(entry.host)
                if len(covering) > 1:
                    text = f"https://{text}"
            shown.append(text)
        return shown

    def targets_of(self, entries: Iterable[AllowedHost]) -> str:
        """`entries` as `as_targets` lists them, joined, for a refusal that tells the agent what to send instead."""
        listed = dict(zip(self.entries, self.as_targets(), strict=True))
        return ", ".join(listed[entry] for entry in entries)

    def match(self, host: str, port: int | None, scheme: str | None = None) -> AllowedHost | None:
        """The entry allowing a canonical host (from `canonical_target`), or None.

        A port of None means the entry's own port, a scheme of None the entry's own scheme; exact entries win
        over wildcards of the same scheme and port. Raises AmbiguousTarget when entries of different schemes or
        ports fit (`api.example.com` given, `api.example.com` and `https://api.example.com:8443` listed).
        """
        return _pick(self.entries_for(host), port, scheme)

    def entries_for(self, host: str) -> tuple[AllowedHost, ...]:
        """Every entry covering a canonical host, whatever its scheme and port: exact ones, then wildcards."""
        found = self._hosts.get(host)
        if found is None:
            first, dot, parent = host.partition(".")
            found = self._wildcards.get(parent, ()) if first and dot else ()
        return found

    def beyond(self, other: DomainAllowlist) -> list[AllowedHost]:
        """This list's entries that reach a scheme, host or port `other` does not: an entry `other` has, or an
        exact host one of its wildcards covers, reaches nowhere new. What makes an update widen a credential."""
        return [entry for entry in self.entries
                if entry not in other.entries
                and (entry.wildcard or not any(w.matches(entry.scheme, entry.host, entry.port)
                                               for w in other.entries_for(entry.host) if w.wildcard))]

    def default_entry(self) -> AllowedHost | None:
        """The only possible target when the agent names none: a single, non-wildcard entry."""
        return self._default


def _fits(entry: AllowedHost, port: int | None, scheme: str | None) -> bool:
    """Whether a target naming `port` and `scheme` (None: the entry's own) may be `entry`."""
    return (port is None or entry.port == port) and (scheme is None or entry.scheme == scheme)


def _pick(candidates: tuple[AllowedHost, ...], port: int | None, scheme: str | None) -> AllowedHost | None:
    if len(candidates) == 1:  # most hosts have one entry: no list, nothing to compare
        (entry,) = candidates
        return entry if _fits(entry, port, scheme) else None
    fitting = [entry for entry in candidates if _fits(entry, port, scheme)]
    if not fitting:
        return None
    first = fitting[0]
    if any(entry.port != first.port or entry.scheme != first.scheme for entry in fitting[1:]):
        raise AmbiguousTarget(tuple(fitting))
    return first


def quoted(text: str) -> str:
    """Text a caller sent, for an error message: repr'd, and cut after 80 characters, so that a message never
    carries a whole oversized input (gRPC drops a status message past its metadata limit, and the caller gets
    a transport error instead of it)."""
    return repr(text) if len(text) <= 80 else repr(text[:80]) + "..."


def _check_length(text: str, what: str) -> None:
    if not text:
        raise DomainError(f"{what}: empty")
    if len(text) > _MAX_INPUT:
        raise DomainError(f"{what}: too long ({len(text)} characters)")


def _check_chars(text: str, what: str) -> None:
    for char in text:
        problem = _FORBIDDEN.get(char)
        if problem is not None:
            raise DomainError(f"{what}: {problem}")
        if char.isspace() or unicodedata.category(char) in _INVISIBLE:
            raise DomainError(f"{what}: whitespace or control character U+{ord(char):04X} is not allowed")


def _split_host_port(text: str, what: str) -> tuple[str, bool, int | None]:
    """Split `host[:port]` or `[v6][:port]`; returns (host, bracketed, port)."""
    if text.startswith("["):
        end = text.find("]")
        if end == -1:
            raise DomainError(f"{what}: '[' without a closing ']'")
        host, after, bracketed = text[1:end], text[end + 1 :], True
        if after and not after.startswith(":"):
            raise DomainError(f"{what}: unexpected text after ']'")
    else:
        if "[" in text or "]" in text:
            raise DomainError(f"{what}: brackets are only allowed around a whole IPv6 address")
        if text.count(":") > 1:
            raise DomainError(f"{what}: an IPv6 address must be written in brackets, as in '[::1]'")
        host, colon, port_text = text.partition(":")
        after, bracketed = colon + port_text, False
    if not after:
        return host, bracketed, None
    port_text = after[1:]
    if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise DomainError(f"{what}: port must be a number from 1 to 65535")
    return host, bracketed, int(port_text)


def _canonical_host(host: str, bracketed: bool, what: str) -> tuple[str, bool]:
    """Canonical form of a host and whether it is an IP literal."""
    if bracketed:
        try:
            return ipaddress.IPv6Address(host).compressed, True
        except ValueError:
            raise DomainError(f"{what}: brackets must hold an IPv6 address") from None
    if not host:
        raise DomainError(f"{what}: the host is empty")
    try:
        return str(ipaddress.IPv4Address(host)), True
    except ValueError:
        return _canonical_name(host, what), False


def _canonical_name(name: str, what: str) -> str:
    try:
        name = name.lower() if name.isascii() else idna.uts46_remap(name, std3_rules=True, transitional=False)
        name = name.removesuffix(".")
        labels = name.split(".")
        for i, label in enumerate(labels):
            if not label:
                raise DomainError(f"{what}: empty label in {name!r}")
            if label.isascii() and not label.startswith("xn--"):
                # Plain ASCII labels only need to be LDH; IDNA's rules would wrongly refuse
                # real hostnames such as 'r4---sn-abc.googlevideo.com'.
                if not _LDH_LABEL.fullmatch(label):
                    raise DomainError(f"{what}: label {label!r} must be letters, digits and inner hyphens")
            else:
                labels[i] = idna.alabel(label).decode("ascii").lower()
    except UnicodeError as exc:  # idna.IDNAError is a UnicodeError
        raise DomainError(f"{what}: not a valid hostname ({exc})") from None
    canonical = ".".join(labels)
    if len(canonical) > _MAX_HOST:
        raise DomainError(f"{what}: hostname longer than {_MAX_HOST} characters")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        raise DomainError(f"{what}: looks like an IPv4 address in a non-standard form; write it as a.b.c.d")
    return canonical


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@functools.cache
def _psl() -> PublicSuffixList:
    """The list, parsed once (~1.7 MiB held for the daemon's life; each check says how to treat unknown TLDs)."""
    return PublicSuffixList()


def _is_known_public_suffix(host: str) -> bool:
    # Unknown single labels ('localhost', an intranet name) are fine as exact hosts.
    return bool(_psl().is_public(host, accept_unknown=False))


def _is_registrable_or_below(host: str) -> bool:
    # Unknown TLDs count as public here, so '*.internal' is refused but '*.corp.internal' is not.
    return _psl().privatesuffix(host, accept_unknown=True) is not None
