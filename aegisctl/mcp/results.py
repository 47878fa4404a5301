"""Tool results as a model reads them: JSON text plus the same value as structured content.

Refusals and bridge failures are tool errors (`isError`) whose text starts with a stable code,
e.g. `not_granted: agent 'bot' has no grant for service 'stripe'`, so a model can tell "not
allowed" from "upstream down". An upstream's own 4xx/5xx is not an error: it is the answer.
"""

from __future__ import annotations

import base64
import codecs
import json
import re
from typing import Any

from mcp.types import CallToolResult, TextContent

from aegisctl.mcp.gate_client import BridgeError, GateResponse, Refusal, decodable

# Headers that describe the bytes on the wire, not the (decompressed, maybe truncated) body shown. Content-Encoding
# stays when the body shown is still encoded (GateResponse.encoded): it is then what the body is.
WIRE_HEADERS = frozenset({"content-length", "content-encoding", "transfer-encoding"})
BINARY_TYPES = ("image/", "audio/", "video/", "font/", "application/octet-stream", "application/zip",
                "application/gzip", "application/pdf", "application/wasm")


# Characters a model (or the terminal or UI showing its context) may act on without their being visible:
# controls (C0, DEL, C1), format characters (bidi overrides and isolates, zero-width characters, the
# invisible tag characters), and the line and paragraph separators: Unicode's Cc, Cf, Zl and Zp.
# tests/unit/test_mcp_invisible.py checks this list against the Unicode database.
INVISIBLE = re.compile("[\x00-\x1f\x7f-\x9f\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e"
                       "\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd"
                       "\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001"
                       "\U000e0020-\U000e007f]")


# Code points that are not Unicode scalar values: a lone one is no valid text, and the MCP SDK cannot serialise a
# result holding one (over stdio that ends the whole bridge). aiohttp makes one of each header byte that is not
# UTF-8 (surrogateescape), JSON may spell one (`"\\ud800"`), and some codecs decode to them.
SURROGATE = re.compile("[\ud800-\udfff]")

# The charsets a body is decoded in: the text encodings of the WHATWG Encoding Standard (what browsers decode),
# ASCII, UTF-32 and a few DOS and Windows code pages, by Python's canonical codec names. Every one maps bytes to
# characters and nothing else. Python's registry also holds codecs that are no charset at all (bz2, zlib and
# hex, which would decompress or transform), codecs that yield lone surrogates (utf-7, unicode_escape,
# raw_unicode_escape) and codecs whose failure is no UnicodeDecodeError (punycode, idna): none is named here.
TEXT_CHARSETS = frozenset({
    "ascii", "utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be",
    *(f"iso8859-{n}" for n in (*range(1, 12), 13, 14, 15, 16)), *(f"cp{n}" for n in range(1250, 1259)),
    "cp437", "cp850", "cp866", "cp874", "tis-620", "koi8-r", "koi8-u", "mac-roman", "mac-cyrillic",
    "gbk", "gb2312", "gb18030", "big5", "big5hkscs", "euc_jp", "iso2022_jp", "shift_jis", "cp932", "euc_kr", "cp949"})


def ok(value: dict[str, Any]) -> CallToolResult:
    """The value as JSON text in which invisible characters are escapes (`\\u202e`): the same JSON value."""
    value = valid_unicode(value)
    text = escape_invisible(json.dumps(value, ensure_ascii=False))
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=value)


def escape_invisible(text: str) -> str:
    """Each INVISIBLE character as a JSON escape, `\\uXXXX` (a surrogate pair past U+FFFF), readable as data."""
    return INVISIBLE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    point = ord(match.group())
    if point > 0xFFFF:
        point -= 0x10000
        return f"\\u{0xD800 + (point >> 10):04x}\\u{0xDC00 + (point & 0x3FF):04x}"
    return f"\\u{point:04x}"


def valid_unicode(value: Any) -> Any:
    """`value` with every lone surrogate in its strings (dictionary keys too) replaced by U+FFFD, so that the
    result can be serialised whatever an upstream, the gate or a caller put in it. Everything else as it was."""
    if isinstance(value, str):
        return SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {valid_unicode(key): valid_unicode(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [valid_unicode(item) for item in value]
    return value


def header_text(field: str) -> str:
    """A response header's value as text: its bytes as UTF-8, each byte sequence that is not UTF-8 as U+FFFD.

    aiohttp decodes header bytes as UTF-8 with `surrogateescape`, so a byte that is not UTF-8 (`\\xff`, or
    Latin-1 text) arrives as a lone surrogate; encoding back gives the bytes the upstream sent."""
    try:
        return field.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate surrogateescape did not make
        return str(valid_unicode(field))


def error(code: str, message: str, **details: Any) -> CallToolResult:
    message, details = valid_unicode(message), valid_unicode(details)
    text = f"{code}: {escape_invisible(message)}"
    if details.get("retry_after"):
        text += f" (retry after {details['retry_after']} s)"
    value = {"error": {"code": code, "message": message, **details}}
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=value, is_error=True)


def bridge_error(exc: BridgeError) -> CallToolResult:
    return error(exc.code, exc.message)


def refusal(r: Refusal) -> CallToolResult:
    details: dict[str, Any] = {"status": r.status, "request_id": r.request_id}
    if r.retry_after is not None:
        details["retry_after"] = r.retry_after
    return error(r.code, r.message, **details)


def proxied(reply: GateResponse, limit: int) -> CallToolResult:
    """The upstream's answer as the gate relayed it: status, headers, body (text or base64). A body still in a
    content coding (one the bridge does not decode, or gzip/deflate data that does not decode) is base64 with its
    Content-Encoding header and a note: shown as text, compressed bytes would pass for the answer itself."""
    headers: dict[str, str] = {}
    spelled: dict[str, str] = {}  # lower-case name -> its first spelling: `X-Dup` and `x-dup` are one header
    for raw_name, raw_field in reply.headers.items():
        name, field = header_text(raw_name), header_text(raw_field)
        if name.lower() in WIRE_HEADERS and not (reply.encoded and name.lower() == "content-encoding"):
            continue
        first = spelled.setdefault(name.lower(), name)
        headers[first] = f"{headers[first]}, {field}" if first in headers else field
    if reply.encoded:
        text, encoding = _base64(reply.body)
    else:
        text, encoding = body_text(reply.body, reply.charset, reply.content_type, reply.truncated)
    value: dict[str, Any] = {"status": reply.status, "headers": headers, "body": text, "body_encoding": encoding,
                             "truncated": reply.truncated, "request_id": reply.request_id}
    notes: list[str] = []
    if reply.encoded:
        coding = header_text(reply.encoded)
        notes.append(f"the body is as received, in Content-Encoding {coding!r}, not decoded: "
                     + ("it is not valid data in that coding, or ends inside it" if decodable(reply.encoded) else
                        "the bridge decodes gzip or deflate only; ask with Accept-Encoding: gzip, or identity"))
    if reply.truncated:  # fewer than `limit` when its compressed form ran past the bridge's bound on that
        notes.append(f"the body was cut after its first {len(reply.body)} bytes to spare your context; ask the API "
                     "for less (a page, a range, a filter, fewer fields)")
    if notes:
        value["note"] = "; ".join(notes)
    return ok(value)


def body_text(data: bytes, charset: str | None, content_type: str, truncated: bool) -> tuple[str, str]:
    """(text, "text") when the body decodes in its charset (UTF-8 by default, and for a charset not in
    TEXT_CHARSETS) into valid Unicode, else (base64, "base64"). A body that does not decode is still an answer,
    with its status and headers: any failure of the decoder falls back to base64, never to an error."""
    if content_type.startswith(BINARY_TYPES):
        return _base64(data)
    decoder = codecs.getincrementaldecoder(_text_encoding(charset))("strict")
    try:
        # A truncated body may end inside a multi-byte character: drop that partial character only.
        text = decoder.decode(data, final=not truncated)
    except ValueError:  # UnicodeDecodeError, and any other UnicodeError a decoder raises
        return _base64(data)
    if SURROGATE.search(text):
        return _base64(data)
    return text, "text"


def _base64(data: bytes) -> tuple[str, str]:
    return base64.b64encode(data).decode("ascii"), "base64"


def _text_encoding(charset: str | None) -> str:
    """The upstream's charset if it is one of TEXT_CHARSETS, else UTF-8 (for a name Python knows no codec by, and for
    one it cannot even look up: an RFC 2231 `charset*=utf-8''utf%008` reaches here as 'utf\\x008', a NUL that
    makes codecs.lookup raise ValueError; a lone surrogate in it, UnicodeEncodeError, a ValueError too)."""
    try:
        name = codecs.lookup(charset or "utf-8").name
    except (LookupError, ValueError):
        return "utf-8"
    return name if name in TEXT_CHARSETS else "utf-8"
