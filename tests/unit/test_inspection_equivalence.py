"""The Hyperscan-based scan finds exactly what the plain-Python scan it replaced found.

The reference below is that earlier scan, kept small: every vault-secret search form looked for with
`in`, every key format's regex run over the whole data with `finditer`, and the decoded views built by a
plain regex substitution. Generated bodies plant secrets and key formats at and off token boundaries,
behind escapes, split across the views, truncated, at the very end of the data, and in bursts that
push the scan onto its whole-data fallbacks.
"""

from __future__ import annotations

import base64
import json
import random
import re
import threading
from collections.abc import Callable
from urllib.parse import quote

import pytest

from aegisd.inspection import VAULT_SECRET, Inspector, SecretSource, key_formats, views
from aegisd.inspection.key_formats import _PLACEHOLDER, _SCHEME_BEFORE, FORMATS, TOKEN_BYTES, find_key_formats
from aegisd.inspection.literal_matcher import FRAGMENT, LiteralScanner, LiteralSearch
from aegisd.inspection.secret_forms import search_forms, secret_values
from tests.inspection_samples import clean_corpus, fake_keys

_rng = random.Random(41)
SOURCES = [
    SecretSource("odd", (b"vault-Secret/with+odd&chars=0123",)),
    SecretSource("token", (b"Zq8vLw2mNc4Rt6Yp1Hs3Kd5F",)),
    SecretSource("basic", secret_values(b"svcuser:basic-pass-Q1w2", "basic")),
    SecretSource("unicode", ("pässwörd-ünïcode-42/x".encode(),)),
    SecretSource("binary", (b"bin\x00ary\xff\x80secret-77",)),
    # Longer than a Hyperscan fragment, two of them sharing it, and longer than Hyperscan's pattern limit.
    SecretSource("long-a", (b"L" * FRAGMENT + b"-tail-A-0123456789",)),
    SecretSource("long-b", (b"L" * FRAGMENT + b"-tail-B-0123456789",)),
    SecretSource("huge", (bytes(_rng.choice(b"abcdefgh0123/+") for _ in range(20_000)),)),
    SecretSource("short", (b"pw7",)),
    *(SecretSource(f"filler{i}", (_rng.randbytes(18).hex().encode(),)) for i in range(40)),
]
SECRETS = [value for source in SOURCES for value in source.values]
KEYS = [key for keys in fake_keys().values() for key in keys]
PREFIXES = [prefix for fmt in FORMATS for prefix in fmt.prefixes]
CORPUS = list(clean_corpus().values())
EDGES = [b"%", b"%2", b"%25", b"%5C", b"%5c", b"%75", b"%30", b"%2F", b"%2f", b"\\", b"\\u00", b"\\u0025", b"\\/",
         b"\\\\", b'\\"', b"\\t", b"\\u00e4", b"\\u4e2d", b"\\ud83d\\ude00", b"\\ud83d",
         b"/", b"u", b"0", b"-", b"_", b":", b"@", b"\n", b"\\n", b" ", b"\0", b"=", b"x", b"://u:", b"pw@db"]


# --- the reference: the scan as it was before Hyperscan --------------------------------------------------

def reference_views(data: bytes) -> list[bytes]:
    """`data` and its layers, each decoded escape by escape from the one before while that holds an escape."""
    found = [data]
    while len(found) <= views.MAX_LAYERS and (decoded := reference_decode(found[-1])) != found[-1]:
        found.append(decoded)
    return found


def reference_decode(data: bytes) -> bytes:
    """One left-to-right pass undoing every `%XX` and JSON string escape (`json.loads` decodes each), as a JSON
    parser reads them; nothing when the data holds no `%XX`, `\\\\`, `\\/` or `\\uXXXX` (SOURCES hold control and
    non-ASCII characters, so the inspector undoes every kind of escape: views.escapes_for)."""
    if not re.search(rb"%[0-9A-Fa-f]{2}|\\(?:[\\/]|u[0-9A-Fa-f]{4})", data):
        return data
    return re.sub(rb'%([0-9A-Fa-f]{2})|\\(["\\/bfnrt]|u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}'
                  rb'|u(?![dD][89a-fA-F])[0-9a-fA-F]{4})',
                  lambda m: bytes([int(m[1], 16)]) if m[1] else json.loads(b'"\\' + m[2] + b'"').encode(), data)


# Every secret's search forms, of each value as stored and as decoded (the inspector searches both).
FORMS = sorted({form for source in SOURCES for value in source.values
                for form in search_forms(reference_views(value))})


def reference_key_formats(data: bytes) -> set[str]:
    found: set[str] = set()
    for fmt in FORMATS:
        for match in fmt.pattern.finditer(data):
            start = match.start()
            if fmt.before == "boundary":  # a JSON escape of a control or non-ASCII character is no token byte
                escape = re.search(rb"\\(?:[bfnrt]|u(?!00[0-7])[0-9A-Fa-f]{4})\Z", data[max(0, start - 6):start])
                accepted = start == 0 or data[start - 1] not in TOKEN_BYTES or escape is not None
            elif fmt.before == "scheme":
                accepted = (_SCHEME_BEFORE.search(data, max(0, start - 33), start) is not None
                            and _PLACEHOLDER.fullmatch(match.group(2)) is None)
            else:
                accepted = True
            if accepted and match.lastgroup is not None:
                found.add(match.lastgroup)
    return found


def reference_scan(data: bytes) -> set[str]:
    found: set[str] = set()
    for view in reference_views(data):
        if any(form in view for form in FORMS):
            found.add(VAULT_SECRET)
        found |= reference_key_formats(view)
    return found


# --- generated bodies ---------------------------------------------------------------------------------------

def _escape_some(rng: random.Random, text: bytes) -> bytes:
    """Percent- or JSON-escape a random subset of the bytes (ASCII ones for \\u00XX)."""
    out = []
    for byte in text:
        roll = rng.random()
        if roll < 0.15:
            out.append(b"%%%02X" % byte if rng.random() < 0.5 else b"%%%02x" % byte)
        elif roll < 0.25 and byte < 0x80:
            out.append(b"\\u00%02x" % byte)
        elif byte == ord("/") and roll < 0.5:
            out.append(b"\\/")
        else:
            out.append(bytes([byte]))
    return b"".join(out)


def _secret_form(rng: random.Random) -> bytes:
    secret = rng.choice(SECRETS)
    if len(secret) > 1000 and rng.random() < 0.7:
        secret = secret[rng.randrange(len(secret) - 100):][:200]  # a piece of the huge one: no finding
    forms: list[Callable[[], bytes]] = [
        lambda: secret,
        lambda: quote(secret, safe="").encode(),
        lambda: _escape_some(rng, secret),
        lambda: quote(quote(secret, safe=""), safe="").encode(),
        lambda: quote(secret, safe="").replace("%", "\\u0025").encode(),
        lambda: quote(secret.replace(b"/", b"\\/"), safe="").encode(),
        lambda: json.dumps(secret.decode(errors="replace"), ensure_ascii=rng.random() < 0.5).encode(),
        lambda: rng.choice((base64.b64encode, base64.urlsafe_b64encode))(
            rng.randbytes(rng.randrange(4)) + secret + rng.randbytes(rng.randrange(4))),
        lambda: secret[:rng.randrange(len(secret))],  # truncated: a near miss
        lambda: secret[:FRAGMENT] + b"-not-the-tail",
    ]
    return rng.choice(forms)()


def _key_form(rng: random.Random) -> bytes:
    key = rng.choice(KEYS).encode()
    before = rng.choice([b"", b" ", b"x", b"_", b"-", b"=", b"\"", b"9", b"\n", b"'"])
    forms: list[Callable[[], bytes]] = [
        lambda: before + key,
        lambda: before + key[:rng.randrange(1, len(key))],  # truncated, possibly to its bare prefix
        lambda: before + _escape_some(rng, key),
        lambda: json.dumps(key.decode()).encode(),
        lambda: b"postgres://app:" + rng.choice([b"s3cr3t", b"${DB_PASSWORD}", b"****", b"password"]) + b"@db/x",
        lambda: rng.choice(PREFIXES) * rng.randrange(1, 140),  # bursts: past PREFILTER_MAX one by one
        lambda: (b"\\" + rng.choice([b"%2F", b"%75%30%30"])) * rng.randrange(1, 90),  # past SPELLED_CHECKS_MAX
    ]
    return rng.choice(forms)()


def _spelled_escape(rng: random.Random) -> bytes:
    """`\\u00XX` or `\\/` with any of its bytes percent-encoded: percent-decoding makes the escape."""
    parts = [[b"\\", b"%5C", b"%5c"], [b"u", b"%75"], [b"0", b"%30"], [b"0", b"%30"], [b"4"], [b"1", b"c"]]
    if rng.random() < 0.4:
        parts = [[b"\\", b"%5C", b"%5c"], [b"/", b"%2F", b"%2f"]]
    return b"".join(rng.choice(options) for options in parts)


def _filler(rng: random.Random) -> bytes:
    if rng.random() < 0.2:
        return _spelled_escape(rng)
    if rng.random() < 0.3:
        piece = rng.choice(CORPUS)
        start = rng.randrange(len(piece))
        return piece[start:start + rng.randrange(1, 3000)]
    if rng.random() < 0.5:
        return rng.choice(EDGES)
    return bytes(rng.choice(b"azAZ09%\\/u:@-_ \n\0=+") for _ in range(rng.randrange(1, 12)))


def _body(rng: random.Random) -> bytes:
    pieces = []
    for _ in range(rng.randrange(1, 12)):
        kind = rng.random()
        pieces.append(_secret_form(rng) if kind < 0.2 else _key_form(rng) if kind < 0.4 else _filler(rng))
    if rng.random() < 0.3:  # end on a bare prefix or escape: matches must not run past the data
        pieces.append(rng.choice(PREFIXES + EDGES)[:rng.randrange(1, 12)])
    body = b"".join(pieces)
    wrap = rng.random()
    if wrap < 0.15:
        return json.dumps({"input": body.decode("latin-1")}).encode()
    if wrap < 0.25:
        return quote(body, safe="").encode()
    if wrap < 0.3:
        return body.replace(b"/", b"\\/")
    return body


def _bodies(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [_body(rng) for _ in range(count)]


@pytest.fixture(scope="module")
def scanner() -> Inspector:
    return Inspector(SOURCES)


def test_views_are_the_reference_views() -> None:
    bodies = _bodies(3000, seed=1)
    assert [list(views.views(body)) for body in bodies] == [reference_views(body) for body in bodies]
    assert sum(len(reference_views(body)) > 2 for body in bodies) > 200  # second-layer views were built


def test_key_formats_are_the_reference_key_formats() -> None:
    samples = [view for body in _bodies(3000, seed=3) for view in reference_views(body)]
    found = [find_key_formats(sample) for sample in samples]
    assert found == [reference_key_formats(sample) for sample in samples]
    assert sum(map(bool, found)) > 800 and sum(not f for f in found) > 800
    assert {family for f in found for family in f} == set(fake_keys())


def test_scan_is_the_reference_scan(scanner: Inspector) -> None:
    bodies = _bodies(2500, seed=4)
    found = [scanner.scan(body) for body in bodies]
    assert found == [reference_scan(body) for body in bodies]
    assert sum(VAULT_SECRET in f for f in found) > 300
    assert sum(bool(f - {VAULT_SECRET}) for f in found) > 500
    assert sum(not f for f in found) > 300


def test_scan_is_the_reference_scan_on_large_bodies(scanner: Inspector, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(5)
    bodies = [b"".join(_body(rng) for _ in range(60)) for _ in range(12)]
    expected = [reference_scan(body) for body in bodies]
    assert [scanner.scan(body) for body in bodies] == expected
    monkeypatch.setattr(key_formats, "PREFILTER_MAX", -1)  # every view through the whole-data fallback
    assert [scanner.scan(body) for body in bodies] == expected


def test_literal_search_finds_long_binary_and_fragment_sharing_literals() -> None:
    long_a, long_b = b"L" * FRAGMENT + b"-tail-A", b"L" * FRAGMENT + b"-tail-B"
    huge = bytes(random.Random(6).choice(b"ABCDEFGH") for _ in range(40_000))
    search = LiteralSearch([long_a, long_b, huge, b"nul\x00byte", b"\xff\xfe-high"])
    assert search.search(b"x" + long_b + b"y") and search.search(long_a)
    assert not search.search(b"L" * FRAGMENT + b"-tail-C" + b"L" * (FRAGMENT - 1) + b"-tail-A")
    assert search.search(b"<" + huge + b">") and not search.search(huge[:-1])
    assert search.search(b"a nul\x00byte here") and not search.search(b"a nul byte here")
    assert search.search(b"\x00\xff\xfe-high") and not search.search(b"\xff\xfe-hig")


def test_a_scanner_serves_two_threads_at_once() -> None:
    """Hyperscan runs without the GIL; a scratch space shared by threads would fail the second scan."""
    scanner, entered, release = LiteralScanner([b"needle"]), threading.Event(), threading.Event()
    results: list[bool] = []

    def hold(_id: int, _from: int, _to: int, _flags: int, _context: object) -> bool:
        entered.set()
        release.wait(10)
        return False

    first = threading.Thread(target=lambda: results.append(scanner.scan(b"a needle", hold)))
    first.start()
    assert entered.wait(10)
    try:
        assert not scanner.scan(b"another needle", lambda *_: True)  # stopped by its handler: it ran
    finally:
        release.set()
        first.join(10)
    assert results == [True]
