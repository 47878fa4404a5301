"""Domain allowlist parsing and matching: the gate's host check rests on these rules."""

from __future__ import annotations

import ipaddress

import pytest

from aegisd.errors import InvalidArgument
from aegisd.vault.domains import (
    AllowedHost,
    AmbiguousTarget,
    DomainAllowlist,
    DomainError,
    canonical_target,
    is_internal_ip,
    is_loopback_host,
    parse_allowed_host,
    target_text,
)
from aegisd.webhooks.registry import check_url

# --- canonicalisation of operator entries ---------------------------------------------------------

CANONICAL = [
    # text, scheme, host, port, wildcard, str()
    ("api.github.com", "https", "api.github.com", 443, False, "api.github.com"),
    ("API.GitHub.COM", "https", "api.github.com", 443, False, "api.github.com"),
    ("api.github.com.", "https", "api.github.com", 443, False, "api.github.com"),
    ("https://api.github.com", "https", "api.github.com", 443, False, "api.github.com"),
    ("HTTPS://api.github.com:443", "https", "api.github.com", 443, False, "api.github.com"),
    ("https://api.github.com:8443", "https", "api.github.com", 8443, False, "https://api.github.com:8443"),
    ("api.github.com:8443", "https", "api.github.com", 8443, False, "https://api.github.com:8443"),
    ("http://example.com", "http", "example.com", 80, False, "http://example.com"),
    ("http://example.com:80", "http", "example.com", 80, False, "http://example.com"),
    ("http://example.com:443", "http", "example.com", 443, False, "http://example.com:443"),
    ("http://127.0.0.1:8080", "http", "127.0.0.1", 8080, False, "http://127.0.0.1:8080"),
    ("127.0.0.1", "https", "127.0.0.1", 443, False, "127.0.0.1"),
    ("[::1]", "https", "::1", 443, False, "[::1]"),
    ("http://[::1]:8080", "http", "::1", 8080, False, "http://[::1]:8080"),
    ("[2001:DB8:0:0::1]", "https", "2001:db8::1", 443, False, "[2001:db8::1]"),
    ("[::ffff:127.0.0.1]", "https", "::ffff:7f00:1", 443, False, "[::ffff:7f00:1]"),
    ("*.example.com", "https", "example.com", 443, True, "*.example.com"),
    ("*.Slack.com", "https", "slack.com", 443, True, "*.slack.com"),
    ("*.example.co.uk", "https", "example.co.uk", 443, True, "*.example.co.uk"),
    ("*.corp.internal", "https", "corp.internal", 443, True, "*.corp.internal"),
    ("http://*.example.com:8080", "http", "example.com", 8080, True, "http://*.example.com:8080"),
    ("BÜCHER.de", "https", "xn--bcher-kva.de", 443, False, "xn--bcher-kva.de"),
    ("xn--bcher-kva.de", "https", "xn--bcher-kva.de", 443, False, "xn--bcher-kva.de"),
    ("XN--BCHER-KVA.DE", "https", "xn--bcher-kva.de", 443, False, "xn--bcher-kva.de"),
    ("*.bücher.de", "https", "xn--bcher-kva.de", 443, True, "*.xn--bcher-kva.de"),
    ("\uff42\uff55\uff43\uff48\uff45\uff52\u3002de", "https", "bucher.de", 443, False, "bucher.de"),
    ("straße.de", "https", "xn--strae-oqa.de", 443, False, "xn--strae-oqa.de"),
    ("localhost", "https", "localhost", 443, False, "localhost"),
    ("http://localhost:3000", "http", "localhost", 3000, False, "http://localhost:3000"),
    ("r4---sn-4g5e6nzz.googlevideo.com", "https", "r4---sn-4g5e6nzz.googlevideo.com", 443, False,
     "r4---sn-4g5e6nzz.googlevideo.com"),
    ("123.example.com", "https", "123.example.com", 443, False, "123.example.com"),
    ("a:1", "https", "a", 1, False, "https://a:1"),
    ("a:65535", "https", "a", 65535, False, "https://a:65535"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "scheme", "host", "port", "wildcard", "shown"), CANONICAL)
def test_parse_allowed_host_canonicalises(
    text: str, scheme: str, host: str, port: int, wildcard: bool, shown: str
) -> None:
    entry = parse_allowed_host(text)
    assert entry == AllowedHost(scheme, host, port, wildcard)
    assert str(entry) == shown


@pytest.mark.parametrize("text", [row[0] for row in CANONICAL])
def test_round_trip(text: str) -> None:
    entry = parse_allowed_host(text)
    assert parse_allowed_host(str(entry)) == entry
    assert str(parse_allowed_host(str(entry))) == str(entry)


# --- refusals -------------------------------------------------------------------------------------

REFUSED = [
    ("", "empty"),
    ("ftp://example.com", "scheme 'ftp' is not allowed"),
    ("ws://example.com", "scheme 'ws' is not allowed"),
    ("://example.com", "scheme '' is not allowed"),
    ("https://", "empty"),
    ("example.com/", "a path is not allowed"),
    ("https://example.com/v1", "a path is not allowed"),
    ("example.com?x=1", "a query string is not allowed"),
    ("example.com#top", "a fragment is not allowed"),
    ("user@example.com", "userinfo"),
    ("https://user:pw@example.com", "userinfo"),
    ("example.com\\x", "backslash"),
    ("exa%6Dple.com", "percent-encoding"),
    (" example.com", "whitespace or control character U+0020"),
    ("example.com ", "whitespace or control character U+0020"),
    ("exam\tple.com", "U+0009"),
    ("exam\x00ple.com", "U+0000"),
    ("exam\u200bple.com", "U+200B"),
    ("example.com:", "port must be a number from 1 to 65535"),
    ("example.com:0", "port must be a number from 1 to 65535"),
    ("example.com:65536", "port must be a number from 1 to 65535"),
    ("example.com:123456", "port must be a number from 1 to 65535"),
    ("example.com:-1", "port must be a number from 1 to 65535"),
    ("example.com:+443", "port must be a number from 1 to 65535"),
    ("example.com:\u0664\u0664\u0663", "port must be a number from 1 to 65535"),
    ("example.com:https", "port must be a number from 1 to 65535"),
    ("*", "'*' is only allowed as the whole first label"),
    ("*.", "empty"),
    ("*example.com", "'*' is only allowed as the whole first label"),
    ("a*.example.com", "'*' is only allowed as the whole first label"),
    ("api.*.example.com", "'*' is only allowed as the whole first label"),
    ("*.*.example.com", "'*' is only allowed as the whole first label"),
    ("example.*", "'*' is only allowed as the whole first label"),
    ("*.com", "wildcard too broad: 'com' is a public suffix"),
    ("*.co.uk", "wildcard too broad: 'co.uk' is a public suffix"),
    ("*.github.io", "wildcard too broad: 'github.io' is a public suffix"),
    ("*.xn--p1ai", "wildcard too broad"),
    ("*.рф", "wildcard too broad"),
    ("*.internal", "wildcard too broad"),
    ("*.localhost", "wildcard too broad"),
    ("com", "'com' is a public suffix, not a host"),
    ("co.uk", "'co.uk' is a public suffix, not a host"),
    ("github.io", "'github.io' is a public suffix, not a host"),
    ("*.127.0.0.1", "a wildcard cannot cover an IP address"),
    ("*.[::1]", "a wildcard cannot cover an IP address"),
    ("http://*.[::1]:8080", "a wildcard cannot cover an IP address"),
    ("::1", "an IPv6 address must be written in brackets"),
    ("http://::1:8080", "an IPv6 address must be written in brackets"),
    ("[::1", "'[' without a closing ']'"),
    ("[::1]x", "unexpected text after ']'"),
    ("[::1]:", "port must be a number"),
    ("[127.0.0.1]", "brackets must hold an IPv6 address"),
    ("[example.com]", "brackets must hold an IPv6 address"),
    ("[]", "brackets must hold an IPv6 address"),
    ("ex[ample.com", "brackets are only allowed around a whole IPv6 address"),
    ("a..com", "empty label"),
    (".example.com", "empty label"),
    ("example.com..", "empty label"),
    ("a_b.example.com", "label 'a_b' must be letters, digits and inner hyphens"),
    ("bücher_x.de", "not a valid hostname (Codepoint U+005F not allowed"),
    ("-a.example.com", "must be letters, digits and inner hyphens"),
    ("a-.example.com", "must be letters, digits and inner hyphens"),
    ("a!b.com", "label 'a!b' must be letters"),
    ("a" * 64 + ".com", "must be letters, digits and inner hyphens"),
    (".".join(["a" * 63] * 4), "hostname longer than 253 characters"),
    ("x" * 301, "too long (301 characters)"),
    ("xn--zz.com", "not a valid hostname"),
    ("xn--.com", "not a valid hostname"),
    ("ex\uff0fample.com", "not a valid hostname"),
    ("127.1", "looks like an IPv4 address in a non-standard form"),
    ("0x7f.0.0.1", "looks like an IPv4 address in a non-standard form"),
    ("2130706433", "looks like an IPv4 address in a non-standard form"),
    ("127.000.000.001", "looks like an IPv4 address in a non-standard form"),
    ("1.2.3.0x4", "looks like an IPv4 address in a non-standard form"),
    ("256.1.1.1", "looks like an IPv4 address in a non-standard form"),
]


@pytest.mark.parametrize(("text", "message"), REFUSED)
def test_parse_allowed_host_refuses(text: str, message: str) -> None:
    with pytest.raises(DomainError) as info:
        parse_allowed_host(text)
    assert message in str(info.value)
    assert str(info.value).startswith("domain entry ")


def test_domain_error_is_a_value_error_and_an_invalid_argument() -> None:
    with pytest.raises(DomainError) as info:
        parse_allowed_host("*.com")
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, InvalidArgument)
    assert info.value.reason == "invalid_domain"
    assert "'*.com'" in str(info.value)


def test_error_message_quotes_long_input_truncated() -> None:
    with pytest.raises(DomainError) as info:
        canonical_target("a" * 200 + "/")
    assert len(str(info.value)) < 200


# --- IP entries and special addresses -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "is_ip", "special"),
    [
        ("127.0.0.1", True, True),
        ("[::1]", True, True),
        ("10.1.2.3", True, True),
        ("192.168.1.10", True, True),
        ("172.16.0.1", True, True),
        ("169.254.169.254", True, True),
        ("[fd00:ec2::254]", True, True),
        ("[fe80::1]", True, True),
        ("100.64.0.1", True, True),
        ("0.0.0.0", True, True),
        ("[::ffff:169.254.169.254]", True, True),
        ("224.0.0.1", True, True),
        ("8.8.8.8", True, False),
        ("[2606:4700:4700::1111]", True, False),
        ("localhost", False, True),
        ("http://app.localhost:8080", False, True),
        ("metadata.google.internal", False, True),
        ("api.github.com", False, False),
        ("*.example.com", False, False),
    ],
)
def test_ip_and_special_address(text: str, is_ip: bool, special: bool) -> None:
    entry = parse_allowed_host(text)
    assert entry.is_ip is is_ip
    assert entry.is_special_address is special


@pytest.mark.parametrize(("address", "internal"), [
    # NAT64's well-known prefix: internal when the IPv4 address it reaches is; a public one is how NAT64 works
    ("64:ff9b::a9fe:a9fe", True), ("64:ff9b::169.254.169.254", True), ("64:ff9b::127.0.0.1", True),
    ("64:ff9b::10.0.0.1", True), ("64:ff9b::8.8.8.8", False),
    ("64:ff9b:1::808:808", True),  # NAT64 for local use (RFC 8215)
    # 6to4: the IPv4 address in bits 16-48
    ("2002:a9fe:a9fe::1", True), ("2002:7f00:1::", True), ("2002:c0a8:101::1", True), ("2002:808:808::1", False),
    # IPv4-compatible (deprecated)
    ("::127.0.0.1", True), ("::169.254.169.254", True), ("::10.1.2.3", True), ("::8.8.8.8", False),
    # SIIT's IPv4-translated form (RFC 2765)
    ("::ffff:0:127.0.0.1", True), ("::ffff:0:a9fe:a9fe", True), ("::ffff:0:8.8.8.8", False),
    # site-local (deprecated)
    ("fec0::1", True), ("feff::1", True),
    # unchanged: mapped, plain global and internal IPv6
    ("::ffff:169.254.169.254", True), ("::ffff:8.8.8.8", False), ("2606:4700:4700::1111", False), ("::1", True),
    ("fd00:ec2::254", True),
])
def test_ipv6_addresses_that_embed_an_ipv4_one_are_judged_by_it(address: str, internal: bool) -> None:
    """Found by a cold review: NAT64, 6to4, IPv4-compatible and site-local addresses counted as global, so a name
    resolving to 64:ff9b::a9fe:a9fe (169.254.169.254 through a NAT64 gateway) passed the SSRF guard."""
    assert is_internal_ip(ipaddress.ip_address(address)) is internal
    assert parse_allowed_host(f"[{address}]").is_special_address is internal


@pytest.mark.parametrize(
    ("text", "netloc"),
    [
        ("api.github.com", "api.github.com"),
        ("https://api.github.com:8443", "api.github.com:8443"),
        ("http://example.com", "example.com"),
        ("http://[::1]:8080", "[::1]:8080"),
        ("[::1]", "[::1]"),
    ],
)
def test_netloc(text: str, netloc: str) -> None:
    assert parse_allowed_host(text).netloc == netloc


# --- AllowedHost.matches: wildcard depth ----------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "scheme", "host", "port", "expected"),
    [
        ("*.example.com", "https", "a.example.com", 443, True),
        ("*.example.com", "https", "example.com", 443, False),
        ("*.example.com", "https", "a.b.example.com", 443, False),
        ("*.example.com", "https", ".example.com", 443, False),
        ("*.example.com", "https", "aexample.com", 443, False),
        ("*.example.com", "https", "a.example.com.evil.com", 443, False),
        ("*.example.com", "http", "a.example.com", 443, False),
        ("*.example.com", "https", "a.example.com", 8443, False),
        ("api.github.com", "https", "api.github.com", 443, True),
        ("api.github.com", "http", "api.github.com", 80, False),
        ("api.github.com", "https", "api.github.com", 8443, False),
        ("api.github.com", "https", "x.api.github.com", 443, False),
        ("http://127.0.0.1:8080", "http", "127.0.0.1", 8080, True),
        ("http://127.0.0.1:8080", "https", "127.0.0.1", 8080, False),
        ("[::1]", "https", "::1", 443, True),
    ],
)
def test_matches(entry: str, scheme: str, host: str, port: int, expected: bool) -> None:
    assert parse_allowed_host(entry).matches(scheme, host, port) is expected


# --- canonical_target -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("api.github.com", "api.github.com", None),
        ("api.github.com:443", "api.github.com", 443),
        ("API.GitHub.com:8443", "api.github.com", 8443),
        ("X.A.COM.", "x.a.com", None),
        ("bücher.de", "xn--bcher-kva.de", None),
        ("xn--bcher-kva.de", "xn--bcher-kva.de", None),
        ("\u0430pi.a.com", "xn--pi-6kc.a.com", None),
        ("127.0.0.1:8080", "127.0.0.1", 8080),
        ("[::1]", "::1", None),
        ("[0:0::1]:8080", "::1", 8080),
        ("localhost", "localhost", None),
    ],
)
def test_canonical_target(text: str, host: str, port: int | None) -> None:
    assert canonical_target(text) == (host, port, None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # the form /_aegis/services lists an entry in; with a scheme, no port means the scheme's default
        ("http://127.0.0.1:8765", ("127.0.0.1", 8765, "http")),
        ("https://api.example.com:8443", ("api.example.com", 8443, "https")),
        ("https://api.github.com", ("api.github.com", 443, "https")),
        ("http://localhost", ("localhost", 80, "http")),
        ("HTTPS://API.Example.com", ("api.example.com", 443, "https")),
        ("http://[::1]:8080", ("::1", 8080, "http")),
        ("http://bücher.de", ("xn--bcher-kva.de", 80, "http")),
    ],
)
def test_canonical_target_takes_a_scheme(text: str, expected: tuple[str, int, str]) -> None:
    assert canonical_target(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("api.a.com@evil.com", "userinfo"),
        ("api.a.com/x", "a path is not allowed"),
        ("api.a.com?x", "a query string is not allowed"),
        ("api.a.com#x", "a fragment is not allowed"),
        ("api.a.com\\x", "backslash"),
        ("api.a.com%2e", "percent-encoding"),
        ("api.a.com\r\nHost: evil.com", "U+000D"),
        ("api.a.com\x7f", "U+007F"),
        ("api.\u00ada.com", "U+00AD"),
        ("*.a.com", "'*' is not allowed"),
        ("a..com", "empty label"),
        ("api.a.com:", "port must be"),
        ("api.a.com:0", "port must be"),
        ("api.a.com:99999", "port must be"),
        ("api.a.com:44 3", "U+0020"),
        ("xn--zz.com", "not a valid hostname"),
        ("api.a.com/", "a path is not allowed; give only host[:port], optionally after http:// or https://"),
        ("https://api.a.com/", "a path is not allowed"),
        ("https://api.a.com/v1", "a path is not allowed"),
        ("http://user@api.a.com", "userinfo"),
        ("https://api.a.com?x", "a query string is not allowed"),
        ("https://api.a.com#x", "a fragment is not allowed"),
        ("https://api.a.com%2e", "percent-encoding"),
        ("https:// api.a.com", "U+0020"),
        ("https://api.a.com ", "U+0020"),
        (" https://api.a.com", "scheme ' https' is not allowed"),
        ("https://", "the host is empty"),
        ("https://http://api.a.com", "a path is not allowed"),
        ("https:///api.a.com", "a path is not allowed"),
        ("https:/api.a.com", "a path is not allowed"),
        ("ftp://api.a.com", "scheme 'ftp' is not allowed; give only host[:port], optionally after http:// or https://"),
        ("ws://api.a.com", "scheme 'ws' is not allowed"),
        ("://api.a.com", "scheme '' is not allowed"),
        ("http\u017f://api.a.com", "is not allowed"),  # long s: not 's', whatever case folding makes of it
        ("http\\://api.a.com", "is not allowed"),
        ("https://*.a.com", "'*' is not allowed"),
        ("::1", "must be written in brackets"),
        ("[fe80::1%25eth0]", "percent-encoding"),
        ("127.1", "non-standard form"),
        ("x" * 301, "too long"),
    ],
)
def test_canonical_target_refuses(text: str, message: str) -> None:
    with pytest.raises(DomainError) as info:
        canonical_target(text)
    assert message in str(info.value)
    assert str(info.value).startswith("target host ")


SMUGGLING = [
    "api.a.com:443@evil.com",
    "evil/.a.com",
    "localhost/.a.com",
    "api.a.com#@evil.com",
    "api.a.com\\@evil.com",
    "api.a.com%2f.evil.com",
    "api.a.com .evil.com",
    "api.a.com\t.evil.com",
    "api.a.com.evil.com",
    "evil.com#api.a.com",
    "evil.com?.api.a.com",
    "api.a.com\x00.evil.com",
    "[api.a.com]",
    "api.a.com:443:443",
    "\u0430pi.a.com",
    "api.a.com..",
    "api%2ea.com",
    "https://evil.com@api.a.com",
    "https://api.a.com@evil.com",
    "https://evil.com/https://api.a.com",
    "https://evil.com#https://api.a.com",
    "http://api.a.com",  # the entry is https: plain http is another entry
    "https://api.a.com:8443",
    "javascript://api.a.com",
    "file://api.a.com",
]


@pytest.mark.parametrize("text", SMUGGLING)
def test_smuggling_is_refused_or_does_not_match(text: str) -> None:
    allowlist = DomainAllowlist.parse(["api.a.com"])
    try:
        host, port, scheme = canonical_target(text)
    except DomainError:
        return
    assert allowlist.match(host, port, scheme) is None


def test_punycode_and_unicode_match_the_same_entry() -> None:
    allowlist = DomainAllowlist.parse(["bücher.de"])
    expected = parse_allowed_host("xn--bcher-kva.de")
    assert allowlist.match(*canonical_target("xn--bcher-kva.de")) == expected
    assert allowlist.match(*canonical_target("BÜCHER.de")) == expected
    assert allowlist.match(*canonical_target("bücher.de.")) == expected


def test_homograph_does_not_match() -> None:
    allowlist = DomainAllowlist.parse(["api.a.com"])
    assert allowlist.match(*canonical_target("\u0430pi.a.com")) is None  # Cyrillic small a
    assert allowlist.match(*canonical_target("api.a.com")) is not None


def test_a_scheme_picks_the_entry_of_that_scheme() -> None:
    allowlist = DomainAllowlist.parse(["http://127.0.0.1:8765", "https://127.0.0.1:8765", "api.a.com:8443"])
    http, https, other = allowlist.entries
    assert allowlist.match(*canonical_target("http://127.0.0.1:8765")) == http
    assert allowlist.match(*canonical_target("https://127.0.0.1:8765")) == https
    with pytest.raises(AmbiguousTarget) as ambiguous:  # no scheme, and both fit: the gate does not pick one
        allowlist.match(*canonical_target("127.0.0.1:8765"))
    assert ambiguous.value.entries == (http, https)
    assert allowlist.match(*canonical_target("https://api.a.com:8443")) == other
    assert allowlist.match(*canonical_target("api.a.com")) == other  # no scheme, no port: the entry's own
    assert allowlist.match(*canonical_target("https://api.a.com")) is None  # a scheme without a port means 443
    assert allowlist.match(*canonical_target("http://api.a.com:8443")) is None
    # every entry as listed names exactly itself
    for entry, listed in zip(allowlist.entries, allowlist.as_strings(), strict=True):
        assert allowlist.match(*canonical_target(listed)) == entry


def test_target_text_shows_the_target_as_given() -> None:
    assert target_text(*canonical_target("127.0.0.1:8766")) == "127.0.0.1:8766"
    assert target_text(*canonical_target("api.a.com")) == "api.a.com"
    assert target_text(*canonical_target("HTTPS://API.A.COM")) == "https://api.a.com"
    assert target_text(*canonical_target("http://[::1]:8080")) == "http://[::1]:8080"
    assert target_text(*canonical_target("http://api.a.com:443")) == "http://api.a.com:443"


def test_trailing_dot_and_case_match() -> None:
    allowlist = DomainAllowlist.parse(["*.a.com"])
    assert allowlist.match(*canonical_target("X.A.COM.")) == parse_allowed_host("*.a.com")


# --- DomainAllowlist ------------------------------------------------------------------------------


def test_allowlist_dedups_and_keeps_order() -> None:
    allowlist = DomainAllowlist.parse(
        [
            "api.github.com",
            "*.slack.com",
            "https://API.github.com:443",
            "http://127.0.0.1:8080",
            "*.SLACK.com",
        ]
    )
    assert allowlist.as_strings() == ["api.github.com", "*.slack.com", "http://127.0.0.1:8080"]
    assert str(allowlist) == "api.github.com,*.slack.com,http://127.0.0.1:8080"
    assert allowlist.entries == tuple(parse_allowed_host(s) for s in allowlist.as_strings())
    assert DomainAllowlist.parse(allowlist.as_strings()).entries == allowlist.entries
    assert "api.github.com" in repr(allowlist)


def test_allowlist_refuses_empty_and_bad_entries() -> None:
    with pytest.raises(DomainError, match="allowlist is empty"):
        DomainAllowlist.parse([])
    with pytest.raises(DomainError, match=r"domain entry '\*\.com'"):
        DomainAllowlist.parse(["api.github.com", "*.com"])


def test_allowlist_parse_refuses_a_bare_string() -> None:
    with pytest.raises(TypeError, match="list of entries"):
        DomainAllowlist.parse("api.github.com")


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("api.github.com", None, "ambiguous"),  # two entries for it, and no port to choose
        ("api.github.com", 443, "api.github.com"),
        ("api.github.com", 8443, "https://api.github.com:8443"),
        ("api.github.com", 80, None),
        ("hooks.slack.com", None, "*.slack.com"),
        ("hooks.slack.com", 443, "*.slack.com"),
        ("slack.com", None, None),
        ("a.hooks.slack.com", None, None),
        ("special.slack.com", None, "ambiguous"),  # its own entry and the wildcard's, of other schemes and ports
        ("special.slack.com", 8080, "http://special.slack.com:8080"),
        ("special.slack.com", 443, "*.slack.com"),
        ("127.0.0.1", None, "http://127.0.0.1:8080"),
        ("127.0.0.1", 8080, "http://127.0.0.1:8080"),
        ("127.0.0.1", 443, None),
        ("::1", None, "[::1]"),
        ("evil.com", None, None),
        ("", None, None),
        (".slack.com", None, None),
    ],
)
def test_allowlist_match(host: str, port: int | None, expected: str | None) -> None:
    allowlist = DomainAllowlist.parse(
        [
            "api.github.com",
            "https://api.github.com:8443",
            "*.slack.com",
            "http://special.slack.com:8080",
            "http://127.0.0.1:8080",
            "[::1]",
        ]
    )
    try:
        found = allowlist.match(host, port)
    except AmbiguousTarget:
        assert expected == "ambiguous"
        return
    assert (None if found is None else str(found)) == expected


def test_exact_entry_preferred_over_wildcard_regardless_of_order() -> None:
    allowlist = DomainAllowlist.parse(["*.a.com", "http://api.a.com", "*.b.com", "api.b.com"])
    assert allowlist.match("api.a.com", 80) == parse_allowed_host("http://api.a.com")
    assert allowlist.match("api.a.com", 443) == parse_allowed_host("*.a.com")
    assert allowlist.match("other.a.com", None) == parse_allowed_host("*.a.com")
    assert allowlist.match("api.b.com", None) == parse_allowed_host("api.b.com")  # same scheme and port: no doubt


@pytest.mark.parametrize(("entries", "target"), [
    (["http://127.0.0.1:38732", "http://127.0.0.1:38733"], "127.0.0.1"),
    (["api.example.com", "https://api.example.com:8443"], "api.example.com"),
    (["http://x.a.com:8080", "x.a.com"], "x.a.com"),
    (["*.a.com", "https://*.a.com:8443"], "x.a.com"),
    (["*.a.com", "http://api.a.com"], "api.a.com"),
])
def test_a_target_without_a_port_that_several_entries_fit_is_ambiguous(entries: list[str], target: str) -> None:
    """It was given the first entry quietly; gate.md says a missing port means the entry's own, and there are two."""
    allowlist = DomainAllowlist.parse(entries)
    with pytest.raises(AmbiguousTarget) as ambiguous:
        allowlist.match(*canonical_target(target))
    assert ambiguous.value.entries == allowlist.entries_for(canonical_target(target)[0])
    assert len(ambiguous.value.entries) == 2
    # each entry as /_aegis/services lists it names exactly that entry (a wildcard's, through a name under it)
    for entry, listed in zip(allowlist.entries, allowlist.as_targets(), strict=True):
        assert allowlist.match(*canonical_target(listed.replace("*", "x"))) == entry, listed


def test_services_list_a_bare_entry_that_shares_its_host_with_its_scheme() -> None:
    allowlist = DomainAllowlist.parse(["api.example.com", "https://api.example.com:8443", "b.com", "*.a.com",
                                       "http://*.a.com"])
    assert allowlist.as_targets() == ["https://api.example.com", "https://api.example.com:8443", "b.com",
                                      "https://*.a.com", "http://*.a.com"]
    assert allowlist.as_strings()[0] == "api.example.com"  # the stored, canonical form is unchanged


def test_entries_for_lists_every_entry_covering_a_host() -> None:
    allowlist = DomainAllowlist.parse(["*.a.com", "http://api.a.com", "api.a.com:8443", "b.com"])
    assert [str(e) for e in allowlist.entries_for("api.a.com")] == [
        "http://api.a.com", "https://api.a.com:8443", "*.a.com"]
    assert [str(e) for e in allowlist.entries_for("x.a.com")] == ["*.a.com"]
    assert allowlist.entries_for("evil.com") == allowlist.entries_for("") == ()


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        (["api.github.com"], "api.github.com"),
        (["http://127.0.0.1:8080"], "http://127.0.0.1:8080"),
        (["api.github.com", "API.GITHUB.COM."], "api.github.com"),
        (["*.slack.com"], None),
        (["api.github.com", "uploads.github.com"], None),
        (["api.github.com", "https://api.github.com:8443"], None),
    ],
)
def test_default_entry(entries: list[str], expected: str | None) -> None:
    default = DomainAllowlist.parse(entries).default_entry()
    assert (None if default is None else str(default)) == expected


@pytest.mark.parametrize(("text", "plain_off_host", "link_local"), [
    ("http://127.0.0.1:8080", False, False), ("http://127.200.0.1", False, False), ("http://[::1]", False, False),
    ("http://localhost:3000", False, False), ("http://LocalHost.", False, False),  # canonical: `localhost`
    ("http://api.example.com", True, False), ("http://10.0.0.5", True, False),
    ("http://[::ffff:127.0.0.1]", True, False),
    ("http://localhost.example", True, False), ("http://169.254.169.254", True, True),
    ("api.example.com", False, False), ("https://10.0.0.5", False, False), ("169.254.1.2:8443", False, True),
    ("[fd00:ec2::254]", False, True), ("[fe80::1]", False, True), ("metadata.google.internal", False, True),
    # The metadata address through a translator or tunnel (found by a review: no warning for these).
    ("[64:ff9b::a9fe:a9fe]", False, True), ("[2002:a9fe:a9fe::1]", False, True), ("[::ffff:169.254.1.1]", False, True),
    ("[64:ff9b::808:808]", False, False),
])
def test_plain_http_and_link_local_entries(text: str, plain_off_host: bool, link_local: bool) -> None:
    entry = parse_allowed_host(text)
    assert entry.is_plain_http_off_host is plain_off_host
    assert entry.is_link_local_or_metadata is link_local


def test_loopback_rule_is_the_webhooks_one() -> None:
    assert all(is_loopback_host(h) for h in ("localhost", "127.0.0.1", "127.1.2.3", "::1"))
    assert not any(is_loopback_host(h) for h in ("localhost.", "localhost.example", "10.0.0.1", "::ffff:127.0.0.1"))
    assert check_url("http://localhost:9000/hook") == "http://localhost:9000"
    with pytest.raises(InvalidArgument, match="loopback"):
        check_url("http://localhost.:9000/hook")


@pytest.mark.parametrize(("old", "new", "beyond"), [
    (["api.example.com"], ["API.example.com."], []),
    (["*.svc.example.com"], ["a.svc.example.com"], []),
    (["*.svc.example.com"], ["*.svc.example.com", "api.example.com"], ["api.example.com"]),
    (["*.svc.example.com"], ["a.b.svc.example.com"], ["a.b.svc.example.com"]),  # a wildcard covers one label
    (["*.svc.example.com"], ["*.a.svc.example.com"], ["*.a.svc.example.com"]),
    (["*.svc.example.com"], ["svc.example.com"], ["svc.example.com"]),
    (["api.example.com"], ["*.example.com"], ["*.example.com"]),
    (["api.example.com"], ["api.example.com:8443"], ["https://api.example.com:8443"]),
    (["*.example.com"], ["http://a.example.com"], ["http://a.example.com"]),  # another scheme
    (["http://127.0.0.1:8080"], ["http://127.0.0.1:8081"], ["http://127.0.0.1:8081"]),
])
def test_beyond_names_the_entries_that_reach_somewhere_new(old: list[str], new: list[str], beyond: list[str]) -> None:
    widened = DomainAllowlist.parse(new).beyond(DomainAllowlist.parse(old))
    assert [str(entry) for entry in widened] == beyond
