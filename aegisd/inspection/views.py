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
# These look for a literal with `re`, which skips to its first byte, rather than with `in`, `count` or
# `replace`, whose filter lets through most letters of JSON text: two to three times faster on 64 KiB.
_SLASH_ESCAPE = re.compile(rb"\\/")
_PERCENT_ESCAPE = re.compile(rb"%25")
_JSON_PERCENT = re.compile(rb"\\u0025")
# Percent-decoding never removes a `\u00` or `\/` (none of their bytes is `%`, and neither `0` follows a
# `%` or `%X`), so it adds one exactly where one is spelled with a percent-escaped byte: `%5C` (\), `%75` (u),
# `%30` (0) or `%2F` (/). _SPELLED matches such a spelling, _ESCAPED_BYTE the escapes it must contain;
# a spelling is at most 12 bytes (`%5C%75%30%30`), so it lies within 9 bytes before and 12 after one.
_ESCAPED_BYTE = re.compile(rb"%(?:5[cC]|75|30|2[fF])")
_SPELLED = re.compile(rb"%5[cC](?:(?:u|%75)(?:0|%30)(?:0|%30)|/|%2[fF])"
                      rb"|\\(?:%75(?:0|%30)(?:0|%30)|%2[fF]|u(?:%30(?:0|%30)|0%30))")
# Past this many escaped bytes (a body crafted full of `%2F`), counting the escapes in both is cheaper.
SPELLED_CHECKS_MAX = 64


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
        if _PERCENT_ESCAPE.search(data):
            found.append(unquote_to_bytes(pct))
        if _percent_made_escapes(data, pct):
            found.append(json_unescape(pct))
    if js != data and _JSON_PERCENT.search(data):  # js has more `%`: json_unescape makes them of `\u0025` only
        found.append(unquote_to_bytes(js))
    return found


def json_unescape(data: bytes) -> bytes:
    """Undo JSON `\\/` and `\\u00XX` escapes wherever they appear (the data need not be valid JSON)."""
    return _ASCII_ESCAPE.sub(lambda m: _ASCII[m.group(1).lower()], _SLASH_ESCAPE.sub(b"/", data))


def _percent_made_escapes(data: bytes, pct: bytes) -> bool:
    """Whether `pct`, percent-decoded `data`, holds more `\\u00` and `\\/` escapes than `data` does: looked
    for around the few escaped bytes that can spell one, since counting them takes two slow passes each."""
    for checked, escaped in enumerate(_ESCAPED_BYTE.finditer(data)):
        if checked == SPELLED_CHECKS_MAX:
            return _json_escapes(pct) > _json_escapes(data)
        at = escaped.start()
        if _SPELLED.search(data, max(0, at - 9), at + 12):
            return True
    return False


def _json_escapes(view: bytes) -> int:
    return view.count(b"\\u00") + view.count(b"\\/")
