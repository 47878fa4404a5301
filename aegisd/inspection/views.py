"""Decoded views of outbound data, so a secret hidden behind a common encoding is still seen.

Percent-encoding and JSON's `\\u00XX` / `\\/` escapes can be applied to any subset of a secret's
characters, which no finite list of encoded forms covers; undoing them covers every mix. Each view
is built only when its escape occurs, so clean bodies pay an `in` test or two. Only escapes of
ASCII characters are undone (API keys are ASCII): a body of `\\u`-escaped CJK text costs nothing.
The standard escapes (`\\"`, `\\\\`, `\\n`) are covered by the JSON forms in secret_forms.py.
Inspector.scan_each relies on every decoding here being local (no escape holds a newline or NUL)
and on neither decoding removing the other's escapes (`%`, `\\u00`, `\\/`).
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

_ASCII_ESCAPE = re.compile(rb"\\u00([0-7][0-9a-fA-F])")
_ASCII = {f"{code:02x}".encode(): bytes([code]) for code in range(128)}
# Whether _json_escapes would count anything: one pass, where its two counts each take a slower one.
_ESCAPE = re.compile(rb"\\(?:u00|/)")


def views(data: bytes) -> list[bytes]:
    """`data`, its percent-decoded and JSON-unescaped forms, and a second layer where the first made one
    (JSON inside a form field, JSON-escaped percent signs, a doubly percent-encoded value)."""
    found = [data]
    percent = b"%" in data
    if not percent and b"\\" not in data:
        return found  # nothing to undo: the usual path, query and headers
    pct = unquote_to_bytes(data) if percent else data
    js = json_unescape(data) if _ESCAPE.search(data) else data
    for view in (pct, js):
        if view != data:
            found.append(view)
    if pct != data:
        if b"%25" in data:
            found.append(unquote_to_bytes(pct))
        if _json_escapes(pct) > _json_escapes(data):
            found.append(json_unescape(pct))
    if js != data and js.count(b"%") > data.count(b"%"):
        found.append(unquote_to_bytes(js))
    return found


def json_unescape(data: bytes) -> bytes:
    """Undo JSON `\\/` and `\\u00XX` escapes wherever they appear (the data need not be valid JSON)."""
    return _ASCII_ESCAPE.sub(lambda m: _ASCII[m.group(1).lower()], data.replace(b"\\/", b"/"))


def _json_escapes(view: bytes) -> int:
    return view.count(b"\\u00") + view.count(b"\\/")
