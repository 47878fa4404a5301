"""Shortcuts in body inspection that must never change a result: the joined scan of a request's path,
query and headers (Inspector.scan_each) and the key-format prefilter for small data."""

from __future__ import annotations

import base64
import importlib
import json
import random
import re
import sys
from typing import Any
from urllib.parse import quote

import pytest

from aegisd.inspection import Inspector, SecretSource, inspector, key_formats, views
from aegisd.inspection.key_formats import FORMATS, PREFILTER_MAX, find_key_formats
from tests.inspection_samples import fake_keys

SECRETS = (b"vault-Secret/with+odd&chars=0123", b"Zq8vLw2mNc4Rt6Yp1Hs3Kd5F", b"short-pw9")
KEYS = [key for keys in fake_keys().values() for key in keys]
# Bytes that start, end or break an escape, a key or a boundary: where a separator could go wrong.
EDGES = [b"%", b"%2", b"%25", b"%4", b"1", b"41", b"\\", b"\\u00", b"\\u004", b"\\/", b"/", b"u0041", b"A", b"a",
         b"-", b"_", b":", b"//", b"@", b"\n", b"\r\n", b"\\n", b" ", b"\0", b"\n\0", b"=", b"+", b"sk-", b"AKIA",
         b"ghp_", b"xoxb-", b"-----BEGIN ", b"PRIVATE KEY-----", b"postgres", b"://u:", b"pw@db", b"s3cr3t@h"]
WORDS = [b"/v1/items", b"x=1&page=2", b"User-Agent: agent/1.0", b"Accept: application/json", b"caf\xc3\xa9",
         b"5f0c2a9e-1b7d-4c3a-9e2f-0a1b2c3d4e5f", b"through", b"https://example.com/a?b=c"]


def _scanner() -> Inspector:
    return Inspector(SecretSource(f"c{i}", (s,)) for i, s in enumerate(SECRETS))


def _secret_form(rng: random.Random) -> bytes:
    secret = rng.choice(SECRETS)
    text = secret.decode()
    forms = [
        secret,
        quote(secret, safe="").encode(),
        "".join(f"%{ord(c):02X}" if rng.random() < 0.3 else c for c in text).encode(),
        "".join(f"\\u{ord(c):04x}" if rng.random() < 0.3 else c for c in text).encode(),
        text.replace("/", "\\/").encode(),
        quote(quote(secret, safe=""), safe="").encode(),
        quote(text, safe="").replace("%", "\\u0025").encode(),
        json.dumps({"k": text}).encode(),
        rng.choice((base64.b64encode, base64.urlsafe_b64encode))(rng.randbytes(rng.randrange(4)) + secret
                                                                   + rng.randbytes(rng.randrange(4))),
    ]
    return rng.choice(forms)


def _key_form(rng: random.Random) -> bytes:
    key = rng.choice(KEYS)
    forms = [key.encode(), quote(key, safe="").encode(), json.dumps(key).encode(),
             ("\\u00" + f"{ord(key[0]):02x}" + key[1:]).encode(), key.replace("/", "%2F").encode(),
             ("postgres://app:" + key[:12].replace("/", "") + "@db.internal/x").encode()]
    return rng.choice(forms)


def _fragment(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.15:
        return _secret_form(rng)
    if kind < 0.3:
        return _key_form(rng)
    if kind < 0.65:
        return rng.choice(EDGES)
    if kind < 0.8:
        return rng.choice(WORDS)
    return bytes(rng.choice(b"azAZ09%\\/u:@-_ \n\0=+") for _ in range(rng.randrange(1, 12)))


def _requests(count: int, seed: int = 17) -> list[list[bytes]]:
    """Path, query and headers cut from one stream of fragments, often right inside a secret or a key."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        pieces = [_fragment(rng) for _ in range(rng.randrange(1, 8))]
        stream = b"".join(pieces)
        ends = [sum(len(p) for p in pieces[:i]) for i in range(len(pieces) + 1)]
        cuts = sorted(min(len(stream), max(0, rng.choice(ends) + rng.randrange(-3, 4)))
                      if rng.random() < 0.7 else rng.randrange(len(stream) + 1) for _ in range(2))
        cases.append([stream[:cuts[0]], stream[cuts[0]:cuts[1]], stream[cuts[1]:]])
    return cases


def _mismatches(scanner: Inspector, cases: list[list[bytes]]) -> int:
    """How many requests scan_each judges otherwise than scanning each part alone (found, and where)."""
    places = ("path", "query string", "headers")
    return sum(list(scanner.scan_each(dict(zip(places, parts, strict=True))).items())
               != [(place, found) for place, part in zip(places, parts, strict=True) if (found := scanner.scan(part))]
               for parts in cases)


def test_scan_each_finds_exactly_what_scanning_each_part_finds() -> None:
    scanner, cases = _scanner(), _requests(3000)
    assert _mismatches(scanner, cases) == 0
    per_part = [[scanner.scan(part) for part in parts] for parts in cases]
    unsplit = [scanner.scan(b"".join(parts)) for parts in cases]
    # The cases cover clean requests, findings, and cuts right through a secret or a key.
    assert sum(not any(found) for found in per_part) > 300
    assert sum(any(found) for found in per_part) > 300
    assert sum(bool(whole) and not any(found) for whole, found in zip(unsplit, per_part, strict=True)) > 30


def test_scan_each_holds_where_every_json_escape_is_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a secret holding `"`, a control and a non-ASCII character, a pass undoes every JSON escape, and only
    in data that holds one of those that make a view (`%XX`, `\\\\`, `\\/`, `\\u`): still local, so still exact."""
    special = (*SECRETS, 'pw"quo\\te\tä-0123'.encode())
    monkeypatch.setattr(sys.modules[__name__], "SECRETS", special)
    monkeypatch.setattr(sys.modules[__name__], "EDGES", [*EDGES, b'\\"', b"\\\\", b"\\t", b"\\u00e4", b"\\ud83d",
                                                         b"\\ude00", b'"', b"\xc3\xa4"])
    scanner, cases = _scanner(), _requests(3000, seed=31)
    assert views.escapes_for(special) is views.EVERY
    assert _mismatches(scanner, cases) == 0
    assert sum(any(scanner.scan(part) for part in parts) for parts in cases) > 300


@pytest.mark.parametrize("separator", [b"", b"-", b"a"])
def test_the_generated_requests_catch_a_separator_that_is_not_safe(separator: bytes,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inspector, "PART_SEPARATOR", separator)
    assert _mismatches(_scanner(), _requests(3000)) > 0


def _starts(items: Any) -> tuple[set[bytes], bool]:
    """What every match of these parsed regex items starts with, and whether that is the whole match."""
    out = {b""}
    for op, arg in items:
        name = str(op)
        if name == "LITERAL":
            options, complete = {bytes([arg])}, True
        elif name == "IN" and all(str(kind) == "LITERAL" for kind, _ in arg):
            options, complete = {bytes([code]) for _, code in arg}, True
        elif name == "SUBPATTERN" and not arg[1]:  # a group that switches on no flag (case folding)
            options, complete = _starts(arg[3])
        elif name == "BRANCH":
            branches = [_starts(branch) for branch in arg[1]]
            options = set().union(*(found for found, _ in branches))
            complete = all(whole for _, whole in branches)
        else:
            return out, False
        out = {head + tail for head in out for tail in options}
        if not complete:
            return out, False
    return out, True


def test_every_key_format_match_begins_with_a_declared_prefix() -> None:
    parser = importlib.import_module("re._parser")
    for fmt in FORMATS:
        assert not fmt.pattern.flags & re.IGNORECASE
        starts, _ = _starts(parser.parse(fmt.pattern.pattern))
        assert all(start.startswith(fmt.prefixes) for start in starts), (fmt.pattern.pattern, starts)


def test_the_prefilter_changes_no_result(monkeypatch: pytest.MonkeyPatch) -> None:
    samples = [part for parts in _requests(1500, seed=23) for part in (*parts, b"".join(parts))]
    samples += [key.encode() for key in KEYS] + [b" " * (PREFILTER_MAX - len(k)) + k.encode() for k in KEYS]
    filtered = [find_key_formats(sample) for sample in samples]
    monkeypatch.setattr(key_formats, "PREFILTER_MAX", -1)
    assert [find_key_formats(sample) for sample in samples] == filtered
    assert sum(map(bool, filtered)) > 300


def test_the_escape_search_agrees_with_decoding() -> None:
    samples = [data for parts in _requests(1500, seed=29) for data in (*parts, b"".join(parts))]
    assert [views.has_escape(data) for data in samples] == [views.decode(data) != data for data in samples]
    assert sum(map(views.has_escape, samples)) > 300
