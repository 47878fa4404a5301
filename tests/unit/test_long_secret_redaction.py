"""Response redaction for long secrets (the vault takes up to 16,384 bytes): building a redaction and
streaming through it cost memory and time linear in the secret's length, with the same results as the
trie regex of every whole form (`compile_longest`), which is too slow to compile for such secrets.

The work is counted, not timed: the memory a build holds, what it compiles, and the lines of aegisd's code a
stream runs (tests/unit/work_count.py)."""

from __future__ import annotations

import random
import re
import tracemalloc
from typing import Any

import pytest

from aegisd.inspection import REDACTED, Redaction
from aegisd.inspection.literal_matcher import FRAGMENT, LiteralScanner, compile_longest
from aegisd.inspection.secret_forms import redaction_forms, secret_values
from tests.unit.work_count import counted

ALPHABET = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"


def long_secret(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    return bytes(rng.choice(ALPHABET) for _ in range(size))


def streamed(redaction: Redaction, body: bytes, chunk: int) -> bytes:
    redactor = redaction.stream()
    out = [redactor.feed(body[pos:pos + chunk]) for pos in range(0, len(body), chunk)]
    return b"".join(out) + redactor.finish()


@pytest.mark.parametrize("size", [2000, 16000])
def test_building_a_redaction_holds_memory_linear_in_the_secret(size: int) -> None:
    """A set of every prefix of every form held 6 x 2667^2 / 2 bytes (21 MB) for a 2,000-byte secret, and
    850 MiB for 16,000 bytes, for as long as the credential lived."""
    forms = redaction_forms(secret_values(long_secret(size, size), "bearer"))
    total = sum(len(f) for f in forms)
    tracemalloc.start()
    try:
        redaction = Redaction(forms)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert redaction.longest == max(len(f) for f in forms)
    assert peak < 20 * total + (1 << 20), (held, peak, total)


@pytest.mark.parametrize("size", [2000, 16000])
def test_building_a_redaction_compiles_only_the_first_bytes_of_long_forms(size: int,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A redaction is built on the event loop, on a credential's first answer after a vault change. A trie regex
    of every whole form (`compile_longest`) has `re` compile some 110 KB for a 16,000-byte secret, at some
    microseconds a byte. Counted, not timed: what is compiled, `re` patterns and Hyperscan literals, holds at
    most FRAGMENT bytes of each form (escaped, and in a trie), whatever the secret's length."""
    forms = redaction_forms(secret_values(long_secret(size, size), "bearer"))
    patterns: list[str | bytes] = []
    literals: list[bytes] = []
    compile_pattern, load_literals = re.compile, LiteralScanner._load

    def counted_compile(pattern: Any, flags: int = 0) -> Any:
        patterns.append(pattern)
        return compile_pattern(pattern, flags)

    def counted_load(scanner: LiteralScanner, expressions: list[bytes], **options: Any) -> None:
        literals.extend(expressions)
        load_literals(scanner, expressions, **options)

    monkeypatch.setattr(re, "compile", counted_compile)
    monkeypatch.setattr(LiteralScanner, "_load", counted_load)
    redaction = Redaction(forms)
    assert redaction.longest > FRAGMENT  # the long forms' case
    # Escaping at most doubles a byte (`\-`), and the trie's groups add less than that: 263 bytes here.
    assert 0 < sum(map(len, patterns)) <= 4 * FRAGMENT * len(forms), [len(p) for p in patterns]
    assert literals and max(map(len, literals)) <= FRAGMENT, sorted(map(len, literals))[-3:]


def test_streaming_through_a_long_secret_costs_work_independent_of_its_length() -> None:
    """A 64 KiB chunk ending in a byte of a form used to try every tail length up to the longest form
    (21 KB for a 16,000-byte secret), each a fresh slice hashed: 0.1 s a chunk, 2 s a MiB. Counted, not timed:
    the lines of aegisd's code run per chunk (about 340) are the same for a 16,000-byte secret as for a 100-byte
    one, where trying every tail length is a line or two for each byte of the longest form, every chunk."""
    chunk = (b'{"text": "lorem ipsum dolor sit amet"}, ' * 1600)[: 64 * 1024 - 1] + b"a"
    lines = {}
    for size in (100, 16000):
        redaction = Redaction(redaction_forms(secret_values(long_secret(size, 1), "bearer")))
        assert redaction.longest > FRAGMENT  # a long form, held back past its first FRAGMENT bytes too
        with counted(budget=32 * 2000) as work:
            out = streamed(redaction, chunk * 32, len(chunk))
        assert out == chunk * 32
        assert work.regex_calls == []  # every chunk proven clean by Hyperscan: no regex search ran
        lines[size] = work.lines
    assert lines[16000] <= lines[100] + 32 * 10, lines


def test_long_secrets_are_redacted_whatever_the_chunking() -> None:
    rng = random.Random(5)
    secret = long_secret(16000, 2)
    redaction = Redaction(redaction_forms(secret_values(secret, "bearer")))
    for _ in range(8):
        # An echo, a near miss (most of the secret, then something else), and a tail that is a prefix.
        body = (b"x" * rng.randrange(50) + secret[: rng.randrange(8, 16000)] + b"--" + secret + b"'}\n"
                + secret[: rng.randrange(1, 16000)])
        whole, count = redaction.redact_all(body)
        assert count == 1 and whole.count(REDACTED) == 1 and secret not in whole
        for chunk in (7 + rng.randrange(100), 1000 + rng.randrange(5000), 70000):
            assert streamed(redaction, body, chunk) == whole


def test_matches_equal_the_trie_regex_of_the_whole_forms() -> None:
    """Leftmost, then longest at that start: what `compile_longest` (used before) chooses, for secrets
    short and long (forms longer than the 64 bytes the search looks for first), split anywhere."""
    rng = random.Random(11)
    for trial in range(300):
        secret = bytes(rng.choice(b"ab+/=%-_:\"") for _ in range(rng.choice([8, 9, 13, 40, 64, 65, 200])))
        forms = redaction_forms(secret_values(secret, "bearer"))
        redaction, reference = Redaction(forms), compile_longest(forms)
        ordered = sorted(forms)
        parts = []
        for _ in range(rng.randrange(6)):
            parts.append(bytes(rng.choice(b"ab+/=%-_ ") for _ in range(rng.randrange(12))))
            form = rng.choice(ordered)
            parts.append(form if rng.random() < 0.6 else form[: rng.randrange(1, len(form))])
        body = b"".join(parts)
        expected = reference.subn(REDACTED, body)
        assert redaction.redact_all(body) == expected, (trial, secret, body)
        assert streamed(redaction, body, 1 + rng.randrange(30)) == expected[0], (trial, secret, body)
