"""The streaming redactor and the response decoder: any chunking gives the whole-body result."""

from __future__ import annotations

import base64
import gzip
import random
import re
import zlib
from urllib.parse import quote

import pytest

from aegisd.inspection import REDACTED, Redaction
from aegisd.inspection.decompress import STEP, DecodeError, StreamDecoder
from aegisd.inspection.literal_matcher import compile_longest
from aegisd.inspection.secret_forms import redaction_forms

SECRET = b"sk-live/Secret+value=42xyz"
FORMS = redaction_forms([SECRET])
REDACTION = Redaction(FORMS)


def split(data: bytes, rng: random.Random) -> list[bytes]:
    """`data` cut at random points, including empty and single-byte pieces."""
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(0, 12)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def stream(redaction: Redaction, chunks: list[bytes]) -> tuple[bytes, int]:
    redactor = redaction.stream()
    out = b"".join(redactor.feed(c) for c in chunks) + redactor.finish()
    return out, redactor.replaced


def test_forms_cover_raw_url_and_base64() -> None:
    assert SECRET in FORMS and quote(SECRET, safe="").encode() in FORMS
    assert base64.b64encode(SECRET) in FORMS and base64.urlsafe_b64encode(SECRET).rstrip(b"=") in FORMS


def test_random_splits_never_leak_and_match_the_whole_body_result() -> None:
    rng = random.Random(42)
    filler = b"abcdefghijklmnop0123456789 \n:{}\"=+/%-_SsKk"
    forms = sorted(FORMS)
    for _ in range(1500):
        parts = []
        for _ in range(rng.randrange(0, 6)):
            parts.append(bytes(rng.choice(filler) for _ in range(rng.randrange(0, 30))))
            form = rng.choice(forms)
            parts.append(form if rng.random() < 0.8 else form[: rng.randrange(1, len(form))])  # or a near miss
        body = b"".join(parts)
        expected, count = REDACTION.redact_all(body)
        out, replaced = stream(REDACTION, split(body, rng))
        assert out == expected, body
        assert replaced == count
        for form in FORMS:
            assert form not in out
        if count == 0:
            assert out == body


def test_base64_embedded_in_a_longer_blob_is_redacted() -> None:
    rng = random.Random(8)
    for before in range(6):
        blob = base64.b64encode(rng.randbytes(before) + SECRET + rng.randbytes(4))
        out, count = stream(REDACTION, split(blob, rng))
        assert count >= 1 and REDACTED in out
        assert not any(f in out for f in FORMS)


def test_hold_back_is_bounded_and_plain_text_flows_at_once() -> None:
    redactor = REDACTION.stream()
    event = b"data: {\"token\": \"hello\"}\n\n"
    assert redactor.feed(event) == event  # nothing that could start a form: released whole
    rng = random.Random(4)
    fed = emitted = 0
    for _ in range(300):
        chunk = bytes(rng.choice(b"sk-live/Secret+value=42") for _ in range(rng.randrange(1, 50)))
        fed += len(chunk)
        emitted += len(redactor.feed(chunk))
        assert fed - emitted <= REDACTION.longest - 1
    assert redactor.replaced == 0  # so every byte fed is either emitted or among the held ones


def test_a_form_split_in_two_is_held_then_redacted() -> None:
    redactor = REDACTION.stream()
    first = redactor.feed(b"event: message\ndata: first\n\ndata: " + SECRET[:10])
    assert first == b"event: message\ndata: first\n\ndata: "  # the half secret is held back
    second = redactor.feed(SECRET[10:] + b"\n\n")
    assert second == REDACTED + b"\n\n" and redactor.finish() == b"" and redactor.replaced == 1


def test_at_the_end_a_held_prefix_is_released_as_it_was() -> None:
    redactor = REDACTION.stream()
    assert redactor.feed(b"ok " + SECRET[:-1]) == b"ok "
    assert redactor.finish() == SECRET[:-1] and redactor.replaced == 0


def test_longest_form_wins_at_the_same_start() -> None:
    redaction = Redaction([b"abcdefgh", b"abcdefghijkl"])
    redactor = redaction.stream()
    assert redactor.feed(b"xx abcdefgh") == b"xx "  # may still grow into the longer form
    assert redactor.feed(b"ijkl yy") == REDACTED + b" yy"
    assert stream(redaction, [b"abcdefgh", b"ijk"]) == (REDACTED + b"ijk", 1)


def test_redaction_needs_a_form() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Redaction([])


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw-deflate"])
def test_stream_decoder_reassembles_any_split(encoding: str) -> None:
    rng = random.Random(6)
    body = b"".join(rng.randbytes(50) + b"A" * 300 for _ in range(200))
    if encoding == "gzip":
        data = gzip.compress(body[:30000]) + gzip.compress(body[30000:])  # two members
    elif encoding == "deflate":
        data = zlib.compress(body)
    else:
        packer = zlib.compressobj(wbits=-15)
        data = packer.compress(body) + packer.flush()
    for _ in range(20):
        decoder = StreamDecoder("gzip" if encoding == "gzip" else "deflate")
        out = b"".join(piece for chunk in split(data, rng) for piece in decoder.feed(chunk)) + decoder.finish()
        assert out == body


def test_stream_decoder_bounds_each_piece_and_refuses_garbage() -> None:
    decoder = StreamDecoder("gzip")
    pieces = list(decoder.feed(gzip.compress(b"\0" * (20 * STEP))))
    assert sum(map(len, pieces)) == 20 * STEP and max(map(len, pieces)) <= STEP
    with pytest.raises(DecodeError):
        list(StreamDecoder("gzip").feed(b"\x1f\x8b\x08\x00garbage-garbage"))
    truncated = StreamDecoder("gzip")
    list(truncated.feed(gzip.compress(b"x" * 1000)[:-8]))
    with pytest.raises(DecodeError):
        truncated.finish()


def test_longest_trie_replaces_like_a_longest_first_alternation() -> None:
    rng = random.Random(12)
    for _ in range(400):
        words = sorted({bytes(rng.choice(b"ab/") for _ in range(rng.randrange(1, 7))) for _ in range(6)},
                       key=lambda w: (-len(w), w))
        data = bytes(rng.choice(b"ab/x") for _ in range(rng.randrange(0, 60)))
        flat = re.compile(b"|".join(re.escape(w) for w in words))
        assert compile_longest(words).sub(b"#", data) == flat.sub(b"#", data), (words, data)
    with pytest.raises(ValueError, match="at least one"):
        compile_longest([])
