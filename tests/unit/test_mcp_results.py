"""How the MCP bridge turns an upstream's body into text for the model."""

from __future__ import annotations

import base64
import bz2
import json

import pytest

from aegisctl.mcp.results import SURROGATE, body_text, error, header_text, ok


@pytest.mark.parametrize("charset", ["bz2", "zlib_codec", "hex", "base64", "rot13", "no-such-charset"])
def test_a_charset_that_is_no_text_encoding_is_read_as_utf8(charset: str) -> None:
    """Python's codec registry answers to bz2, zlib, hex and base64 too: an upstream naming one must not make
    the bridge decompress a body without bound, or hand back bytes where text belongs."""
    bomb = bz2.compress(b"a" * 5_000_000)
    text, encoding = body_text(bomb, charset, "text/plain", truncated=False)
    assert encoding == "base64" and base64.b64decode(text) == bomb  # not UTF-8 either: as bytes, undecompressed
    assert body_text(b"414243", charset, "text/plain", truncated=False) == ("414243", "text")


def test_a_text_charset_is_still_honoured() -> None:
    assert body_text("héllo".encode("latin-1"), "ISO-8859-1", "text/plain", truncated=False) == ("héllo", "text")


@pytest.mark.parametrize(("charset", "body"), [
    ("utf-7", b"+2AA-"), ("unicode_escape", b"\\ud800"), ("raw_unicode_escape", b"\\udc80"),
    ("punycode", b"\xff-abc"), ("idna", b"xn--\xff")])
def test_a_codec_outside_the_charsets_is_not_used(charset: str, body: bytes) -> None:
    """utf-7 and the escape codecs decode to lone surrogates, which no tool result can carry; punycode and idna
    fail with a plain UnicodeError. The body is read as UTF-8 instead, else base64: an answer either way."""
    text, encoding = body_text(body, charset, "text/plain", truncated=False)
    assert (text, encoding) == ((body.decode(), "text") if body.isascii() else (base64.b64encode(body).decode(),
                                                                               "base64"))
    assert not SURROGATE.search(text)


@pytest.mark.parametrize("charset", ["utf-16-le", "utf-32-le", "utf-8"])
def test_a_lone_surrogate_in_a_text_charset_is_base64(charset: str) -> None:
    body = b"\x00\xd8a\x00" if charset == "utf-16-le" else b"\x00\xd8\x00\x00" if charset == "utf-32-le" \
        else b"\xed\xa0\x80"
    assert body_text(body, charset, "text/plain", truncated=False) == (base64.b64encode(body).decode(), "base64")


def test_header_bytes_that_are_not_utf8_become_replacement_characters() -> None:
    """aiohttp hands a header byte that is not UTF-8 over as a lone surrogate (surrogateescape)."""
    raw = b"caf\xff \xe9t\xc3\xa9"
    assert header_text(raw.decode("utf-8", "surrogateescape")) == "caf\ufffd \ufffdt\u00e9"
    assert header_text("a\ud800b") == "a\ufffdb"


def test_every_result_is_serialisable_whatever_its_strings_hold() -> None:
    """A lone surrogate anywhere (a key, a nested list, an error's message) would make the SDK's serialisation
    fail, and over stdio end the bridge: each becomes U+FFFD."""
    value = {"a\udcff": ["x\ud800", {"k": "\udfff"}], "n": 1}
    result = ok(value)
    assert result.structured_content == {"a\ufffd": ["x\ufffd", {"k": "\ufffd"}], "n": 1}
    assert json.loads(result.model_dump_json(by_alias=True))["structuredContent"] == result.structured_content
    failed = error("gate_error", "bad \udc80", request_id="r\ud800")
    assert failed.structured_content == {"error": {"code": "gate_error", "message": "bad \ufffd",
                                                   "request_id": "r\ufffd"}}
    failed.model_dump_json(by_alias=True)
