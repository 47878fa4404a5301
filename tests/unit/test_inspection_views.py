"""Decoded views: any mix of percent and JSON escapes in a secret is undone, nested ones layer by layer.

Found by a cold review: a second decoding layer was built only where decoding one kind of escape made the
other kind, so `%73\\u006b-live-...` (or the two kinds alternating) passed inspection.
"""

from __future__ import annotations

import random
import re

import pytest

from aegisd.inspection import VAULT_SECRET, Inspector, SecretSource, views

SECRET = b"sk-live-vault-SECRET-a1b2c3d4e5"
_REFERENCE = re.compile(rb"%([0-9A-Fa-f]{2})|\\u00([0-7][0-9A-Fa-f])|\\/")


def reference_decode(data: bytes) -> bytes:
    """One left-to-right pass: each `%XX`, ASCII `\\u00XX` and `\\/` undone, what it makes left alone."""
    return _REFERENCE.sub(lambda m: bytes([int(m[1] or m[2], 16)]) if m[1] or m[2] else b"/", data)


def _escape(rng: random.Random, byte: int) -> bytes:
    roll = rng.random()
    if roll < 0.3:
        return b"%%%02X" % byte if rng.random() < 0.5 else b"%%%02x" % byte
    if roll < 0.6:
        return b"\\u%04x" % byte if rng.random() < 0.5 else b"\\u%04X" % byte
    if byte == ord("/") and roll < 0.8:
        return b"\\/"
    return bytes([byte])


def _mixed(rng: random.Random, text: bytes) -> bytes:
    return b"".join(_escape(rng, byte) for byte in text)


@pytest.mark.parametrize("one_by_one_max", [views.ONE_BY_ONE_MAX, 0])
def test_decode_is_one_pass_of_every_escape(monkeypatch: pytest.MonkeyPatch, one_by_one_max: int) -> None:
    """Whichever way a pass decodes (one escape at a time, or all in C through quoted-printable)."""
    monkeypatch.setattr(views, "ONE_BY_ONE_MAX", one_by_one_max)
    rng = random.Random(11)
    pieces = [b"%", b"%4", b"%41", b"%3d", b"%3D", b"%25", b"%5C", b"%5c", b"=", b"==", b"=41", b"=\r\n", b"\r", b"\n",
              b"\\", b"\\u00", b"\\u0041", b"\\u0025", b"\\u005c", b"\\u003D", b"\\u00e9", b"\\u4e2d", b"\\/", b"\\\\/",
              b"u", b"0", b"4", b"1", b"x", b" ", b"_", b"\0", b"\xff"]
    samples = [b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 60))) for _ in range(4000)]
    samples += [rng.randbytes(rng.randrange(0, 40)) for _ in range(1000)]
    assert [views.decode(s) for s in samples] == [reference_decode(s) for s in samples]
    assert [views.has_escape(s) for s in samples] == [reference_decode(s) != s for s in samples]


def test_views_layer_until_nothing_is_left_to_undo() -> None:
    nested = b"%255Cu0025" + b"73"  # percent-encoded twice, a JSON escape of a percent escape
    assert list(views.views(nested)) == [nested, b"%5Cu002573", b"\\u002573", b"%73", b"s"]
    too_deep = b"%" + b"25" * 5 + b"73"  # "s" percent-encoded six times
    assert len(list(views.views(too_deep))) == views.MAX_LAYERS + 1


def test_clean_data_is_not_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pass(_data: bytes) -> bytes:
        raise AssertionError("a decoding pass over clean data")

    monkeypatch.setattr(views, "decode", no_pass)
    assert list(views.views(b"/v1/items?page=2&sort=created\nAccept: application/json")) == [
        b"/v1/items?page=2&sort=created\nAccept: application/json"]


def test_any_mix_of_escapes_in_a_secret_is_found() -> None:
    inspector = Inspector([SecretSource("c1", (SECRET,))])
    rng = random.Random(12)
    for _ in range(300):
        mixed = _mixed(rng, SECRET)
        wrapped = rng.choice([mixed, _mixed(rng, mixed), mixed.replace(b"%", b"%25"), mixed.replace(b"%", b"\\u0025"),
                              mixed.replace(b"\\", b"%5C")])
        assert inspector.scan(b'{"note": "' + wrapped + b'"}') == {VAULT_SECRET}, wrapped
    for mixed in (b"%73\\u006b-live-vault-SECRET-a1b2c3d4e5", b"\\u0073%6b-live-vault-SECRET-a1b2c3d4e5"):
        assert inspector.scan(mixed) == {VAULT_SECRET}, mixed


def test_a_secret_that_holds_an_escape_itself_is_found_with_other_characters_escaped() -> None:
    """Decoded, such a request no longer shows the secret as stored, so the secret is searched for decoded too."""
    secret = b"pass%41word\\u0042-Zq8vLw2m"
    inspector = Inspector([SecretSource("c1", (secret,))])
    assert inspector.scan(secret) == {VAULT_SECRET}
    assert inspector.scan(b"\\u0070ass%41word\\u0042-Zq8vLw2m") == {VAULT_SECRET}
    assert inspector.scan(b"%70ass%41word\\u0042-Zq8vLw2m") == {VAULT_SECRET}


@pytest.mark.parametrize("chunk", [7, 8, 64])
def test_decoding_a_chunk_at_a_time_splits_no_escape(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """Long data is decoded a piece at a time (views.CHUNK); no escape may be cut between two pieces."""
    monkeypatch.setattr(views, "CHUNK", chunk)
    rng = random.Random(13)
    pieces = [b"%41", b"%4", b"%", b"\\u0041", b"\\u00", b"\\", b"\\/", b"/", b"=", b"x", b"41", b"u0041"]
    samples = [b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 120))) for _ in range(3000)]
    assert [views.decode(s) for s in samples] == [reference_decode(s) for s in samples]
    assert sum(len(s) > 3 * chunk for s in samples) > 1000
