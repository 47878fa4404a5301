"""How the MCP bridge turns an upstream's body into text for the model."""

from __future__ import annotations

import base64
import bz2

import pytest

from aegisctl.mcp.results import body_text


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
