"""Body-inspection detectors: key formats, vault-secret encodings, decoded views and decompression."""

from __future__ import annotations

import base64
import gzip
import json
import random
import re
import threading
import zlib
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote, quote_plus

import hyperscan
import pytest

from aegisd.gate.routing import credentials_sharing_hosts
from aegisd.inspection import VAULT_SECRET, Inspector, SecretSource
from aegisd.inspection.decompress import DecodeError, TooLarge, decompress_capped
from aegisd.inspection.key_formats import FAMILIES, find_key_formats
from aegisd.inspection.literal_matcher import LiteralSearch, PatternScanner, compile_literals, compile_longest
from aegisd.inspection.secret_forms import MIN_SECRET_LENGTH, base64_cores, secret_values, url_forms
from aegisd.inspection.views import json_unescape
from aegisd.vault.domains import DomainAllowlist
from tests.inspection_samples import clean_corpus, fake_keys

SECRET = b"vault-Secret/with+odd&chars=0123"
KEYS = fake_keys()


def inspector(*secrets: bytes, filler: int = 100) -> Inspector:
    rng = random.Random(3)
    sources = [SecretSource(f"filler{i}", (rng.randbytes(18).hex().encode(),)) for i in range(filler)]
    return Inspector([*sources, *(SecretSource(f"c{i}", (s,)) for i, s in enumerate(secrets))])


def test_every_family_has_samples() -> None:
    assert set(KEYS) == set(FAMILIES)


@pytest.mark.parametrize(("family", "key"), [(f, k) for f, keys in KEYS.items() for k in keys],
                         ids=[f"{f}-{i}" for f, keys in KEYS.items() for i in range(len(keys))])
def test_each_key_format_is_found_alone_and_embedded(family: str, key: str) -> None:
    assert find_key_formats(key.encode()) == {family}
    for wrapped in (f"token: {key}\n", json.dumps({"config": {"key": key}}), f"key={key}&x=1", f"'{key}'"):
        assert find_key_formats(wrapped.encode()) == {family}, wrapped
    assert inspector().scan(json.dumps({"k": key}).encode()) == {family}  # JSON-escaped newlines in PEM too


@pytest.mark.parametrize(("family", "key"), [(f, keys[0]) for f, keys in KEYS.items()
                                              if f not in ("private_key", "connection_url")])
def test_a_key_right_after_a_json_escape_stands_alone(family: str, key: str) -> None:
    """`"line one\\nsk-proj-..."`: the byte before the key is `n`, but the escape stands for a newline, which a body
    whose only escapes are `\\n` and `\\"` is not decoded of; so for a tab, a non-ASCII character or a surrogate
    pair. An escape of a letter (`\\u0041`) still joins the key to a word, as `Ask-...` does."""
    for before in ("\\n", "\\t", "\\r", "\\u4e2d", "\\u00E9", "\\ud83d\\ude00"):
        body = ('{"text": "here:' + before + key + '"}').encode()
        assert inspector().scan(body) == {family}, before
    assert find_key_formats(("x\\u0041" + key).encode()) == set()
    assert inspector().scan(('{"text": "x\\u0041' + key + '"}').encode()) == set()


@pytest.mark.parametrize(("family", "key"), [(f, keys[0]) for f, keys in KEYS.items()
                                              if f not in ("private_key", "connection_url")])
def test_a_key_after_an_escaped_backslash_and_a_letter_is_one_token(family: str, key: str) -> None:
    """Found by the third review: `{"path": "dir\\\\nsk-proj-..."}` (the text `dir\\nsk-proj-...`, one token)
    was refused as a key after a newline: that `\\n` is an escaped backslash and the letter `n`. After an odd
    run of backslashes the last one starts an escape (`dir\\\\\\n`: a backslash, then a newline)."""
    for text in ("dir\\n", "dir\\t", "dir\\u4e2d", "dir\\\\\\n", "x\\u00E9"):  # a backslash, then a letter
        body = json.dumps({"path": text + key}).encode()  # that backslash doubled, and no escape before the key
        assert find_key_formats(body) == set() == inspector().scan(body), body
    for text in ("dir\\\n", "dir\\\u4e2d", "dir\\\\\t"):  # backslashes, then a newline, CJK, a tab
        body = json.dumps({"path": text + key}).encode()
        assert find_key_formats(body) == {family} == inspector().scan(body), body


@pytest.mark.parametrize("text", [
    "pip install sk-learn", "scikit-learn", "task-" + "a" * 40, "risk-" + "B1" * 20, "desk-lamp",
    "sk_test_" + "a1B2" * 6, "rk_test_" + "a1B2" * 6, "AKIA" + "A" * 15, "AKIA" + "a" * 16, "xAKIA" + "B" * 16,
    "AKIA" + "B" * 17, "ghp_" + "a" * 35, "xghp_" + "a" * 36, "gh_" + "a" * 40, "AIza" + "b" * 34,
    "AIza" + "b" * 36, "xoxb-notdigits-abcdefghijkl", "github_pat_short", "sk-proj-short",
    "-----BEGIN PRIVATE KEY-----", "-----BEGIN PRIVATE KEY----- (see docs)", "-----BEGIN PUBLIC KEY-----\n" + "A" * 64,
    "https://user@example.com/x", "https://example.com:8080/a@b", "postgres://user:${DB_PASSWORD}@db/app",
    "mysql://root:password@localhost/db", "redis://:****@cache", "amqp://guest:$RABBIT_PASS@mq",
    "http://u:{{ secret }}@h", "C://x:y@z", "mailto:user:pass@example.com", "url = 'https://' + user + ':' + pw + '@h'",
    "ghp_" + "a" * 36 + "_more", "sk-" + "a" * 31,
], ids=lambda t: t[:24])
def test_near_misses_are_not_flagged(text: str) -> None:
    assert find_key_formats(text.encode()) == set()


@pytest.mark.parametrize("name", sorted(clean_corpus()))
def test_clean_corpus_passes(name: str) -> None:
    body = clean_corpus()[name]
    assert inspector(SECRET).scan(body) == set(), name


def test_every_encoding_of_a_vault_secret_is_found() -> None:
    check = inspector(SECRET)
    text = SECRET.decode()
    encodings = {
        "raw": SECRET,
        "quote": quote(SECRET, safe="").encode(),
        "quote-default": quote(SECRET).encode(),
        "quote_plus": quote_plus(SECRET).encode(),
        "lower-hex": re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), quote(text, safe="")).encode(),
        "double-encoded": quote(quote(SECRET, safe=""), safe="").encode(),
        "partly-encoded": text.replace("/", "%2F").replace("S", "%53").encode(),
        "json": json.dumps({"a": text}).encode(),
        "json-slash": json.dumps({"a": text}).replace("/", "\\/").encode(),
        "json-u-escaped": ('{"a": "' + "".join(f"\\u{ord(c):04x}" for c in text) + '"}').encode(),
        "json-u-mixed": ('"' + "".join(f"\\u{ord(c):04X}" if i % 3 == 0 else c for i, c in enumerate(text))
                         + '"').encode(),
        "percent-in-json": ('"' + quote(text, safe="").replace("%", "\\u0025") + '"').encode(),
        "json-in-form": ("payload=" + quote(json.dumps({"a": text}).replace("/", "\\u002f"), safe="")).encode(),
    }
    for name, body in encodings.items():
        assert check.scan(b"prefix " + body + b" suffix") == {VAULT_SECRET}, name


@pytest.mark.parametrize("encode", [base64.b64encode, base64.urlsafe_b64encode, base64.encodebytes],
                         ids=["standard", "urlsafe", "mime-lines"])
def test_base64_inside_a_bigger_blob_at_every_offset(encode: object) -> None:
    check = inspector(SECRET)
    rng = random.Random(5)
    for before in range(0, 9):
        for after in (0, 1, 2, 5):
            blob = encode(rng.randbytes(before) + SECRET + rng.randbytes(after))  # type: ignore[operator]
            if encode is base64.encodebytes and b"\n" in blob[:-1]:
                continue  # a line break through the secret's encoding is documented as not caught
            assert check.scan(b'{"file": "' + blob + b'"}') == {VAULT_SECRET}, (before, after)


def test_base64_cores_are_exactly_the_determined_characters() -> None:
    rng = random.Random(9)
    for _ in range(200):
        secret = rng.randbytes(rng.randrange(8, 40))
        cores = base64_cores(secret)
        for before in range(3):
            for encode in (base64.b64encode, base64.urlsafe_b64encode):
                # Whatever the neighbouring bytes, one core appears.
                blob = encode(rng.randbytes(before) + secret + rng.randbytes(rng.randrange(3)))
                assert any(core in blob for core in cores)


def test_gzip_and_deflate_bodies_are_looked_into() -> None:
    body = json.dumps({"k": SECRET.decode(), "pad": "x" * 1000}).encode()
    assert decompress_capped(gzip.compress(body), "gzip", 10_000) == body
    assert decompress_capped(gzip.compress(body[:500]) + gzip.compress(body[500:]), "gzip", 10_000) == body
    assert decompress_capped(zlib.compress(body), "deflate", 10_000) == body
    raw = zlib.compressobj(wbits=-15)
    assert decompress_capped(raw.compress(body) + raw.flush(), "deflate", 10_000) == body
    assert decompress_capped(gzip.compress(b"abc") + b"TRAILER", "gzip", 100) == b"abcTRAILER"


def test_decompression_is_capped_and_strict() -> None:
    bomb = gzip.compress(b"\0" * 1_000_000)
    assert len(bomb) < 2000
    with pytest.raises(TooLarge):
        decompress_capped(bomb, "gzip", 100_000)
    with pytest.raises(TooLarge):
        decompress_capped(gzip.compress(b"a" * 600) * 2, "gzip", 1000)  # the cap counts every member
    assert len(decompress_capped(bomb, "gzip", 1_000_000)) == 1_000_000
    with pytest.raises(DecodeError):
        decompress_capped(b"\x1f\x8b\x08garbage", "gzip", 1000)
    with pytest.raises(DecodeError):
        decompress_capped(gzip.compress(b"x" * 100)[:-12], "gzip", 1000)


def test_basic_auth_password_counts_alone_and_short_secrets_are_not_searched() -> None:
    assert secret_values(b"svcuser:basic-pass-Q1w2", "basic") == (b"svcuser:basic-pass-Q1w2", b"basic-pass-Q1w2")
    assert secret_values(b"svcuser:basic-pass-Q1w2", "bearer") == (b"svcuser:basic-pass-Q1w2",)
    assert secret_values(b"u:short", "basic") == ()  # both too short
    check = Inspector([SecretSource("b", secret_values(b"svcuser:basic-pass-Q1w2", "basic")),
                       SecretSource("s", secret_values(b"x" * (MIN_SECRET_LENGTH - 1), "bearer"))])
    assert check.scan(b"the password is basic-pass-Q1w2") == {VAULT_SECRET}
    assert check.scan(b"xxxxxxx and svcuser") == set()


def test_a_key_in_the_basic_username_counts_alone_when_the_password_is_too_short_to_be_it() -> None:
    """Stripe's `sk_live_...:` and Freshdesk's `KEY:X`: the username is the key. A username beside a password
    long enough to be the secret is a name, and is not redacted."""
    assert secret_values(b"sk_live_51Habcdef:", "basic") == (b"sk_live_51Habcdef:", b"sk_live_51Habcdef")
    assert secret_values(b"KEYfd1234567890:X", "basic") == (b"KEYfd1234567890:X", b"KEYfd1234567890")
    assert secret_values(b"alice.long.name:basic-pass-Q1w2", "basic") == (b"alice.long.name:basic-pass-Q1w2",
                                                                          b"basic-pass-Q1w2")
    # A short real password: neither half alone is searched for (a public name must not become a secret).
    assert secret_values(b"john.smith@corp.example:1234567", "basic") == (b"john.smith@corp.example:1234567",)


def test_url_forms_include_a_tilde_written_as_percent_7e() -> None:
    """Java's URLEncoder, PHP's urlencode and .NET write `~` as `%7E`; Python and JavaScript leave it. Java
    keeps `*` and encodes `!'()`."""
    forms = url_forms(b"q~secret~Tilde*Star+1")
    assert {b"q%7Esecret%7ETilde*Star%2B1", b"q%7esecret%7eTilde*Star%2b1", b"q~secret~Tilde*Star%2B1"} <= forms
    assert b"ab%7Ecd*ef%21gh" in url_forms(b"ab~cd*ef!gh")


def test_credentials_sharing_a_host_redact_each_others_secrets() -> None:
    """An upstream may keep what one credential sent and echo it to another calling the same host: each answer
    is redacted of the secrets of every credential whose allowlist reaches a host its own does."""
    def route(cid: str, *domains: str) -> Any:
        return SimpleNamespace(credential_id=cid, allowlist=DomainAllowlist.parse(list(domains)))

    shared = credentials_sharing_hosts([route("a", "api.example.com"), route("b", "https://api.example.com:8443"),
                                        route("w", "*.example.com"), route("o", "other.example.org"),
                                        route("x", "x.api.example.com")])
    group = frozenset({"a", "b", "w"})  # x is under api.example.com, which no wildcard covers: alone, like o
    assert shared == {"a": group, "b": group, "w": group}
    assert credentials_sharing_hosts([route("a", "a.example.com"), route("b", "b.example.com")]) == {}
    same_machine = credentials_sharing_hosts([route("l", "http://localhost:8080"), route("f", "http://127.0.0.1:8080"),
                                              route("s", "http://[::1]:8080"), route("m", "[::ffff:127.0.0.1]")])
    assert same_machine["l"] == frozenset({"l", "f", "s", "m"})  # one machine, however it is named
    # Names under localhost are this machine too (RFC 6761; systemd-resolved and macOS answer them so): found at
    # the 29th stop, a credential on api.localhost was not redacted from a 127.0.0.1 credential's answers.
    under = credentials_sharing_hosts([route("n", "https://api.localhost:9443"), route("f", "http://127.0.0.1:80"),
                                       route("t", "https://app.localhost.:9443"), route("w", "*.api.localhost")])
    assert under["f"] == frozenset({"n", "f", "t", "w"})
    assert credentials_sharing_hosts([route("a", "a.example.com"), route("w", "*.example.com"),
                                      route("b", "b.example.com")])["a"] == frozenset({"a", "w", "b"})  # through w
    check = Inspector([SecretSource("a", (b"first-secret-value-1",)), SecretSource("b", (b"second-secret-value-2",)),
                       SecretSource("o", (b"third-secret-value-3",))], shared)
    redaction = check.redaction("a")
    assert redaction is not None
    redacted, count = redaction.redact_all(b"second-secret-value-2 first-secret-value-1 third-secret-value-3")
    assert (redacted, count) == (b"[REDACTED] [REDACTED] third-secret-value-3", 2)


def test_findings_never_say_which_credential() -> None:
    found = inspector(b"first-secret-value-1", b"second-secret-value-2").scan(b"second-secret-value-2")
    assert found == {VAULT_SECRET}


def test_json_unescape_undoes_ascii_escapes_only() -> None:
    assert json_unescape(b'\\u0073\\u004B-x \\/ \\u00e9 \\u4e2d \\n') == b'sK-x / \\u00e9 \\u4e2d \\n'


def test_literal_search_agrees_with_plain_search() -> None:
    rng = random.Random(1)
    for alphabet, sizes in ((b"abc/+%", (1, 6)), (b"ab", (8, 40))):  # short literals (regex), long (anchors)
        for _ in range(300):
            words = [bytes(rng.choice(alphabet) for _ in range(rng.randrange(*sizes)))
                     for _ in range(rng.randrange(1, 12))]
            data = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 120)))
            if rng.random() < 0.5:  # plant one at a random offset
                cut = rng.randrange(len(data) + 1)
                data = data[:cut] + rng.choice(words) + data[cut:]
            expected = any(w in data for w in words)
            assert LiteralSearch(words).search(data) == expected, (words, data)
            pattern = compile_literals(words)
            assert pattern is not None and (pattern.search(data) is not None) == expected
    assert compile_literals([]) is None and not LiteralSearch([]).search(b"anything at all, 8+ bytes")


def test_literal_matcher_handles_long_and_deeply_nested_literals() -> None:
    long_secret = bytes(random.Random(2).choice(b"ABCDEFGH") for _ in range(5000))
    assert compile_literals([long_secret]).search(b"x" + long_secret + b"y")  # type: ignore[union-attr]
    nested = [b"a" * n + b"b" for n in range(1, 600)]  # each branches off the previous one: too deep a trie
    pattern = compile_literals(nested)
    assert pattern is not None and pattern.search(b"x" + b"a" * 300 + b"b") and not pattern.search(b"a" * 700)
    assert compile_longest(nested).sub(b"#", b"x" + b"a" * 50 + b"b") == b"x#"


def test_a_pattern_scanner_compiles_at_its_first_scan_once_whichever_threads_scan_first() -> None:
    """Fixed patterns (the method-override guard's) are compiled when first needed, not at aegisd's start; threads
    that scan first together all get an answer from the one database."""
    scanner = PatternScanner([rb"_m[e]thod", rb"x{3}"])
    assert not hasattr(scanner, "_database")
    start = threading.Barrier(8)
    answers: list[bool] = []

    def scan(data: bytes) -> None:
        start.wait()
        answers.append(scanner.search(data))

    threads = [threading.Thread(target=scan, args=(b"a _method=" if n % 2 else b"nothing",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers) == [False] * 4 + [True] * 4
    database = scanner._database
    assert scanner.search(b"xxx") and scanner._database is database
    with pytest.raises(hyperscan.error):  # a bad pattern shows at its first scan; the tests of each scan it
        PatternScanner([rb"(unclosed"]).search(b"data")
