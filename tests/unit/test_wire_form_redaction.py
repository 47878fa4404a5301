"""Redaction forms of the secret as the gate sends it (secret_forms.wire_values), URL-encoded once more.

Query auth sends `quote(secret, safe="")` and basic auth `Basic <base64>`: an upstream that echoes that
URL-encoded (a login redirect's `?next=`, a form-encoded header dump) must not hand the agent the key."""

from __future__ import annotations

import base64
import random
import re
from urllib.parse import quote, quote_plus, unquote

import pytest

from aegisd.gate.routing import build_route
from aegisd.inspection import REDACTED, Inspector, Redaction, SecretSource
from aegisd.inspection.secret_forms import (
    base64_whole,
    redaction_forms,
    search_forms,
    secret_values,
    url_forms,
    wire_values,
)
from aegisd.vault.credentials import Credential

QUERY = b"qry/Secret+value=42xyz-AbCd"
BASIC = b"svcuser:p>ss?w0rd~Probe/+x1"


def redaction(secret: bytes, auth_type: str) -> Redaction:
    """The redaction the gate builds for one credential: its secret values through an Inspector."""
    found = Inspector([SecretSource("c", secret_values(secret, auth_type))]).redaction("c")
    assert found is not None
    return found


def injected(secret: bytes, auth_type: str) -> bytes:
    """What build_route puts on the wire for the secret, without the scheme word."""
    cred = Credential(id="c", name="c", service="c", domains=["https://api.example.com"], auth_type=auth_type,
                      header_name="X-Api-Key" if auth_type == "header" else "",
                      query_param="api_key" if auth_type == "query" else "")
    route = build_route(cred, secret)
    value = route.inject_query[1] if route.inject_query else route.inject_header[1] if route.inject_header else ""
    return value.removeprefix("Bearer ").removeprefix("Basic ").encode()


def _lower_hex(text: bytes) -> bytes:
    return re.sub(rb"%[0-9A-F]{2}", lambda m: m.group().lower(), text)


def split(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(1, 12)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def stream(red: Redaction, chunks: list[bytes]) -> bytes:
    redactor = red.stream()
    return b"".join(redactor.feed(c) for c in chunks) + redactor.finish()


@pytest.mark.parametrize("auth_type", ["bearer", "header", "query", "basic"])
def test_what_routing_injects_is_the_secret_or_one_of_its_wire_values(auth_type: str) -> None:
    """wire_values follows build_route: if an injection kind changes, this fails before an echo leaks."""
    for secret in (QUERY, BASIC, b"plain-token-0123456789"):
        assert injected(secret, auth_type) in {secret} | wire_values(secret)


@pytest.mark.parametrize(("secret", "auth_type"), [(QUERY, "query"), (BASIC, "basic")])
def test_the_wire_value_url_encoded_once_more_is_redacted_in_every_spelling(secret: bytes, auth_type: str) -> None:
    red = redaction(secret, auth_type)
    sent = injected(secret, auth_type)
    echoes = [quote(sent, safe="").encode(), quote(sent).encode(), quote_plus(sent).encode(),
              _lower_hex(quote(sent, safe="").encode()), quote(b"Basic " + sent, safe="").encode(),
              quote_plus(b"Basic " + sent).encode()]
    for echo in echoes:
        body = b'{"next": "/login/?next=' + echo + b'", "kept": 1}'
        out, count = red.redact_all(body)
        assert count == 1 and REDACTED in out, (echo, out)
        assert out.startswith(b'{"next": "/login/?next=') and out.endswith(b'", "kept": 1}')
        for layer in (out, unquote(out.decode()).encode(), unquote(unquote(out.decode())).encode()):
            assert secret not in layer and base64.b64encode(secret) not in layer
            assert quote(secret, safe="").encode() not in layer


def test_a_login_redirect_location_is_redacted_whole_and_in_any_chunks() -> None:
    """Django's redirect_to_login: `?next=` + the original path and query, `quote(..., safe="/")`."""
    red = redaction(QUERY, "query")
    original = "/account/settings?page=2&api_key=" + injected(QUERY, "query").decode()
    body = b"Redirecting to /accounts/login/?next=" + quote(original, safe="/").encode() + b"\n"
    expected = b"Redirecting to /accounts/login/?next=/account/settings%3Fpage%3D2%26api_key%3D[REDACTED]\n"
    assert red.redact_all(body) == (expected, 1)
    rng = random.Random(7)
    for _ in range(300):
        assert stream(red, split(body, rng)) == expected
    assert stream(red, [bytes([b]) for b in body]) == expected


def test_wire_forms_are_few_and_none_for_a_secret_no_wire_spelling_changes() -> None:
    """A secret of unreserved characters whose base64 holds no `+`, `/` or `=` gets no form from its wire
    values; the others a handful (the matcher's cost grows with the forms)."""
    plain = b"abcdefghijkl"  # base64 YWJjZGVmZ2hpamts
    assert redaction_forms([plain]) == search_forms([plain]) | base64_whole(plain)
    for secret, auth_type in ((QUERY, "query"), (BASIC, "basic")):
        values = secret_values(secret, auth_type)
        before = search_forms(values) | {f for v in values for f in base64_whole(v)}
        added = redaction_forms(values) - before
        assert added and len(added) <= 6 * len(values), sorted(added)
        assert added <= {f for v in values for w in wire_values(v) for f in url_forms(w)}


def test_the_forms_are_still_replaced_as_written_next_to_the_new_ones() -> None:
    """A body holding the secret raw, URL-encoded, JSON-escaped and base64 beside the wire echoes: each replaced."""
    red = redaction(BASIC, "basic")
    body = b" | ".join([BASIC, quote(BASIC, safe="").encode(), b"p>ss?w0rd~Probe\\/+x1",
                        base64.b64encode(BASIC), quote(base64.b64encode(BASIC), safe="").encode()])
    out, count = red.redact_all(body)
    assert out == b" | ".join([REDACTED] * 5) and count == 5
