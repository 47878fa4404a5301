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

from aegisctl.mcp.gate_client import BridgeError, GateResponse, Refusal

# Headers that describe the bytes on the wire, not the (decompressed, maybe truncated) body shown.
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


def ok(value: dict[str, Any]) -> CallToolResult:
    """The value as JSON text in which invisible characters are escapes (`\\u202e`): the same JSON value."""
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


def error(code: str, message: str, **details: Any) -> CallToolResult:
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
    """The upstream's answer as the gate relayed it: status, headers, body (text or base64)."""
    headers: dict[str, str] = {}
    for name, field in reply.headers.items():
        if name.lower() not in WIRE_HEADERS:
            headers[name] = f"{headers[name]}, {field}" if name in headers else field
    text, encoding = body_text(reply.body, reply.charset, reply.content_type, reply.truncated)
    value: dict[str, Any] = {"status": reply.status, "headers": headers, "body": text, "body_encoding": encoding,
                             "truncated": reply.truncated, "request_id": reply.request_id}
    if reply.truncated:
        value["note"] = (f"the body was cut after its first {limit} bytes to spare your context; ask the API "
                         "for less (a page, a range, a filter, fewer fields)")
    return ok(value)


def body_text(data: bytes, charset: str | None, content_type: str, truncated: bool) -> tuple[str, str]:
    """(text, "text") when the body decodes in its charset (UTF-8 by default), else (base64, "base64")."""
    if content_type.startswith(BINARY_TYPES):
        return base64.b64encode(data).decode("ascii"), "base64"
    decoder = codecs.getincrementaldecoder(_text_encoding(charset))("strict")
    try:
        # A truncated body may end inside a multi-byte character: drop that partial character only.
        return decoder.decode(data, final=not truncated), "text"
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), "base64"


def _text_encoding(charset: str | None) -> str:
    """The upstream's charset if it names a text encoding, else UTF-8. Python's codec registry also holds
    bz2, zlib, hex and base64 under such names: a body would be decompressed without bound, or not become text."""
    try:
        info = codecs.lookup(charset or "utf-8")
    except LookupError:
        return "utf-8"
    return info.name if getattr(info, "_is_text_encoding", False) else "utf-8"
