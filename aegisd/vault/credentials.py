"""What a credential is, apart from its secret, and the rules its fields must follow."""

from __future__ import annotations

import dataclasses
import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aegisd.errors import InvalidArgument
from aegisd.rates import RateError, parse_rate
from aegisd.vault.domains import AllowedHost, DomainAllowlist, DomainError, quoted

AUTH_TYPES = ("bearer", "header", "basic", "query")
INSPECTION_MODES = ("off", "warn", "block")
SCOPES = ("read", "write", "*")
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")
MAX_NAME_LENGTH = 64  # NAME's; row ids are 32 hex digits
# A name or row id to look up that is longer than this is nobody's: refused before the lookup, whose NOT_FOUND would
# name it whole. One more than a name: until f0b1126 NAME ended in `$`, which let a name end in a newline.
MAX_LOOKUP_LENGTH = MAX_NAME_LENGTH + 1
# Entries in one credential's allowlist, on add and update: far above any real use (an API is a few hosts, at most a
# few dozen), low enough that checking, sealing and routing one stays cheap. Stored lists are not re-checked: a
# credential restored from a backup, or adopted, keeps the entries it has.
MAX_DOMAINS = 1000
# A rate is `N/unit`, N at most 9 digits: nothing valid comes near this, so a longer one is refused unparsed.
MAX_RATE_LENGTH = 64
SERVICE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")
TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}\Z")  # RFC 9110 header field name
QUERY_PARAM = re.compile(r"^[A-Za-z0-9._~-]{1,64}\Z")
MAX_SECRET_BYTES = 16384
# Unicode categories no API key holds: controls (C0, DEL, C1 such as U+0085), format characters (zero-width
# U+200B, U+FEFF, bidi marks) and the line and paragraph separators: invisible, or a line break to some parsers.
_REFUSED_IN_SECRETS = frozenset({"Cc", "Cf", "Zl", "Zp"})
# Header names the gate manages itself; a credential may not claim them.
RESERVED_HEADERS = frozenset({
    "host", "connection", "content-length", "transfer-encoding", "te", "trailer", "upgrade",
    "keep-alive", "proxy-connection", "proxy-authenticate", "cookie", "set-cookie", "content-type",
    "x-target-host", "x-aegis-agent", "x-aegis-request-id",
})


@dataclass
class Credential:
    """Credential metadata as stored; `domains` holds canonical allowlist entries."""

    id: str
    name: str
    service: str
    domains: list[str]
    auth_type: str = "bearer"
    header_name: str = ""
    query_param: str = ""
    scopes: list[str] = field(default_factory=lambda: ["*"])
    rate_limit: str = ""
    body_inspection: str = "block"
    created_at: int = 0
    updated_at: int = 0
    rotated_at: int = 0
    expires_at: int | None = None

    def expired(self, now_ms: int) -> bool:
        return self.expires_at is not None and now_ms >= self.expires_at

    def sealed_metadata(self) -> bytes:
        """The fields sealed with the secret (its AEAD associated data): what it is called, where and how it
        may be used. Changing any of them outside aegisd breaks the seal; the timestamps are display only."""
        return json.dumps([self.name, self.service, self.domains, self.auth_type, self.header_name,
                           self.query_param, self.scopes, self.rate_limit, self.body_inspection, self.expires_at],
                          separators=(",", ":"), ensure_ascii=True).encode()


def validate_name(name: str, what: str = "credential name") -> str:
    if not NAME.match(name):
        raise InvalidArgument(f"{what} {quoted(name)} must be 1-{MAX_NAME_LENGTH} characters of a-z, 0-9, '.', '_' "
                              "or '-', starting with a letter or digit")
    return name


def check_lookup(value: str, what: str = "credential name") -> str:
    """A name (or row id) a call asks for, refused if it is longer than any stored one can be, before it is looked
    up: the lookup's NOT_FOUND names what was asked for. A shorter one is looked up as given, so a row an older
    aegisd wrote under a name today's rules refuse is still found."""
    if len(value) > MAX_LOOKUP_LENGTH:
        raise InvalidArgument(f"{what} {quoted(value)} is too long ({len(value)} characters): no name or id aegisd "
                              f"writes is longer than {MAX_NAME_LENGTH}")
    return value


def validate_service(service: str) -> str:
    if not SERVICE.match(service):
        raise InvalidArgument(f"service {quoted(service)} must be 1-63 characters of a-z, 0-9 or '-', starting "
                              "with a letter or digit (it is the first path segment at the gate)")
    return service


def canonical_domains(entries: list[str]) -> list[str]:
    """Validate and canonicalise the allowlist, refusing entries broader than one domain."""
    try:
        return DomainAllowlist.parse(entries).as_strings()
    except DomainError as exc:
        raise InvalidArgument(str(exc)) from None


ALLOW_PLAIN_HTTP_FLAG = "--allow-plain-http"
PLAIN_LISTED = 5  # plain http:// entries a refusal names; it counts the rest


def check_new_domains(entries: list[str], allow_plain_http: bool) -> list[AllowedHost]:
    """The operator's new allowlist, checked for what only a new list must pass (stored credentials are not
    re-checked, so one added before this rule keeps working): at most MAX_DOMAINS entries (counted before any is
    parsed), and a plain `http://` entry to anything but loopback would send the secret across a network in clear,
    so needs `allow_plain_http`. Returns the parsed entries."""
    if len(entries) > MAX_DOMAINS:
        raise InvalidArgument(f"an allowlist holds at most {MAX_DOMAINS} entries; {len(entries)} were given "
                              "(use a `*.` wildcard for many hosts under one domain)", reason="too_many_domains")
    try:
        parsed = list(DomainAllowlist.parse(entries).entries)
    except DomainError as exc:
        raise InvalidArgument(str(exc)) from None
    plain = [str(entry) for entry in parsed if entry.is_plain_http_off_host]
    if plain and not allow_plain_http:
        shown = ", ".join(map(quoted, plain[:PLAIN_LISTED]))
        more = f" and {len(plain) - PLAIN_LISTED} more" if len(plain) > PLAIN_LISTED else ""
        listed = ("domain entry " if len(plain) == 1 else "domain entries ") + shown + more
        raise InvalidArgument(
            f"{listed}: plain http:// would send the credential unencrypted across the network; it is "
            f"allowed only to loopback (127.0.0.1, [::1], localhost). Use https://, or pass "
            f"{ALLOW_PLAIN_HTTP_FLAG} if the host really speaks only http and the path to it is trusted",
            reason="plain_http")
    return parsed


def validate_scopes(scopes: list[str]) -> list[str]:
    cleaned = sorted({s.strip().lower() for s in scopes if s.strip()})
    if not cleaned:
        raise InvalidArgument("scopes must name at least one of: read, write, *")
    bad = [s for s in cleaned if s not in SCOPES]
    if bad:
        raise InvalidArgument(f"unknown scope {quoted(bad[0])}; use read, write or * (comma-separated)")
    return ["*"] if "*" in cleaned else cleaned


def validate_rate(rate: str) -> str:
    if not rate:
        return ""
    if len(rate) > MAX_RATE_LENGTH:  # the parser's message would echo it whole
        raise InvalidArgument(f"rate {quoted(rate)} must look like N/sec, N/min, N/hour or N/day (e.g. 100/min)")
    try:
        return str(parse_rate(rate))
    except RateError as exc:
        raise InvalidArgument(str(exc)) from None


def validate_inspection(mode: str) -> str:
    if mode not in INSPECTION_MODES:
        raise InvalidArgument(f"body inspection {quoted(mode)} must be off, warn or block")
    return mode


def validate_auth(auth_type: str, header_name: str, query_param: str) -> tuple[str, str, str]:
    """Check the injection settings fit together; returns the normalised triple."""
    if auth_type not in AUTH_TYPES:
        raise InvalidArgument(f"auth type {quoted(auth_type)} must be bearer, header, basic or query")
    if auth_type == "header":
        if not header_name:
            raise InvalidArgument("auth type 'header' needs --header-name (e.g. X-Api-Key)")
        if not TOKEN.match(header_name) or header_name.lower() in RESERVED_HEADERS:
            raise InvalidArgument(f"header name {quoted(header_name)} is not a valid header the gate may inject")
        return auth_type, header_name, ""
    if auth_type == "query":
        if not query_param:
            raise InvalidArgument("auth type 'query' needs --query-param NAME (letters, digits, '.', '_', "
                                  "'~', '-')")
        if not QUERY_PARAM.match(query_param):
            raise InvalidArgument(f"--query-param {quoted(query_param)} is not a parameter name the gate may inject: "
                                  "use letters, digits, '.', '_', '~' or '-'")
        return auth_type, "", query_param
    if header_name or query_param:
        raise InvalidArgument(f"--header-name and --query-param do not apply to auth type {quoted(auth_type)}")
    return auth_type, "", ""


def validate_secret(secret: str, auth_type: str) -> bytes:
    """Refuse secrets that could not be injected safely (empty, multi-line, oversized)."""
    if not secret:
        raise InvalidArgument("the secret is empty")
    data = secret.encode()
    if len(data) > MAX_SECRET_BYTES:
        raise InvalidArgument(f"the secret is longer than {MAX_SECRET_BYTES} bytes")
    if any(ch in secret for ch in "\r\n\0"):
        raise InvalidArgument("the secret contains a line break or NUL byte, which cannot go in a header")
    if any(unicodedata.category(ch) in _REFUSED_IN_SECRETS for ch in secret):
        raise InvalidArgument("the secret contains a control character or an invisible one (a zero-width or "
                              "other format character, a line or paragraph separator), which no API key has "
                              "and a header would carry as is")
    if secret != secret.strip():  # an upstream's parser trims it, so an echo of the key would escape redaction
        raise InvalidArgument("the secret starts or ends with whitespace; give it without")
    if auth_type == "basic" and ":" not in secret:
        raise InvalidArgument("a basic-auth secret must be 'user:password'")
    return data


def validate_credential(cred: Credential) -> None:
    """Check every metadata field, canonicalising in place (domains, auth fields, scopes, rate)."""
    validate_name(cred.name)
    validate_service(cred.service)
    cred.domains = canonical_domains(cred.domains)
    cred.auth_type, cred.header_name, cred.query_param = validate_auth(cred.auth_type, cred.header_name,
                                                                       cred.query_param)
    cred.scopes = validate_scopes(cred.scopes)
    cred.rate_limit = validate_rate(cred.rate_limit)
    cred.body_inspection = validate_inspection(cred.body_inspection)
    if cred.expires_at is not None and not is_time(cred.expires_at):
        raise InvalidArgument("the expiry must fall between 1970 and the year 9999: give a shorter --ttl")


def widenings(before: Credential, after: Credential) -> list[str]:
    """What an update lets the secret reach that it could not before: allowlist entries the old list did not
    cover (whoever holds the control socket could otherwise add a host of their own and read the secret there),
    and inspection turned `off`, which turns off redaction too (an upstream's echo of it then reaches the agent).
    Empty for every other change. An old entry that no longer parses covers nothing."""
    found = []
    try:
        old = DomainAllowlist.parse(before.domains)
    except DomainError:
        new_entries = DomainAllowlist.parse(after.domains).entries
    else:
        new_entries = tuple(DomainAllowlist.parse(after.domains).beyond(old))
    if new_entries:
        found.append("new allowlist " + ("entry " if len(new_entries) == 1 else "entries ")
                     + ", ".join(map(str, new_entries)))
    if after.body_inspection == "off" and before.body_inspection != "off":
        found.append("body inspection off, which turns off redaction of answers too")
    return found


def valid_as_stored(cred: Credential) -> bool:
    """Whether a stored credential passes validate_credential unchanged, i.e. is what `vault add` would write
    (for rows nothing authenticates: canonical hosts, no control characters, no reserved header)."""
    checked = dataclasses.replace(cred, domains=list(cred.domains), scopes=list(cred.scopes))
    try:
        validate_credential(checked)
    except (InvalidArgument, TypeError, ValueError, AttributeError):
        return False
    return checked == cred


# The credentials table's metadata columns, in the order credential_row writes and credential_from_row reads.
CREDENTIAL_COLUMNS = ("id, name, service, domains, auth_type, header_name, query_param, scopes, rate_limit, "
                      "body_inspection, created_at, updated_at, rotated_at, expires_at")


def credential_row(c: Credential) -> tuple[Any, ...]:
    return (c.id, c.name, c.service, json.dumps(c.domains), c.auth_type, c.header_name, c.query_param,
            json.dumps(c.scopes), c.rate_limit, c.body_inspection, c.created_at, c.updated_at, c.rotated_at,
            c.expires_at)


def is_time(value: object) -> bool:
    """Epoch milliseconds aegisd could have written: an int from 1970 to the year 9999."""
    return type(value) is int and 0 <= value <= 253_402_300_799_999


def credential_from_row(r: Sequence[Any]) -> Credential:
    """A Credential from a row of CREDENTIAL_COLUMNS; ValueError if the row does not have the shape aegisd
    writes (a JSON column that does not parse, a value of the wrong type: an edit or damage)."""
    cred = Credential(id=r[0], name=r[1], service=r[2], domains=json.loads(r[3]), auth_type=r[4],
                      header_name=r[5], query_param=r[6], scopes=json.loads(r[7]), rate_limit=r[8],
                      body_inspection=r[9], created_at=r[10], updated_at=r[11], rotated_at=r[12],
                      expires_at=r[13])
    texts = (cred.id, cred.name, cred.service, cred.header_name, cred.query_param, cred.rate_limit)
    lists = (cred.domains, cred.scopes)
    if not (all(isinstance(t, str) for t in texts)
            and all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in lists)
            and cred.auth_type in AUTH_TYPES and cred.body_inspection in INSPECTION_MODES
            and all(is_time(t) for t in (cred.created_at, cred.updated_at, cred.rotated_at))
            and (cred.expires_at is None or is_time(cred.expires_at))):
        raise ValueError(f"credential row {r[0]!r} is malformed")
    return cred
