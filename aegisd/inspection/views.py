"""Decoded views of outbound data, so a secret hidden behind a common encoding is still seen.

Percent-encoding (`%XX`) and JSON's `\\u00XX` / `\\/` escapes can be applied to any subset of a secret's
characters, in any mix and nested (JSON inside a form field, a JSON-escaped `%`, a doubly percent-encoded
value), which no finite list of encoded forms covers. So `views` undoes both kinds together: one pass
(`decode`) undoes every escape of either kind in the data, and the next pass undoes those in the result,
as long as it holds one and at most MAX_LAYERS times. Any mix is one layer; each level of nesting is one more.

Clean data (no `%` and no backslash: the usual path, query and headers) costs two `in` tests. Only escapes
of ASCII characters are undone (API keys are ASCII): a body of `\\u`-escaped CJK text costs nothing. The
standard escapes (`\\"`, `\\\\`, `\\n`) are covered by the JSON forms in secret_forms.py.

Inspector.scan_each relies on decoding being local: no escape holds a newline or a NUL, so decoding a
joined text decodes each part alone.

Cost: a pass is a few C-speed passes over the data plus, where escapes are few, a Python step per escape.
Data longer than CHUNK is decoded a chunk at a time, so what a pass allocates stays within a small
multiple of the data (the Python objects a regex substitution or unquote_to_bytes makes per escape or
piece exist for one chunk at a time: 10 MiB of `%41` took 700 MiB at once), and so does each call that
holds the GIL (large bodies are inspected in a worker thread, which must leave the event loop its turn).
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterator
from urllib.parse import unquote_to_bytes

# Levels of nesting undone: a secret JSON-escaped inside a form field that was percent-encoded twice is 3.
MAX_LAYERS = 4
# Whether there is anything to undo. These look for a literal, which `re` skips to, rather than for either
# `%` or `\`, which it tries at every byte: ten times as long on 64 KiB of JSON.
_PERCENT_ESCAPE = re.compile(rb"%[0-9A-Fa-f]{2}")
_JSON_ESCAPE = re.compile(rb"\\(?:u00[0-7][0-9A-Fa-f]|/)")
_SLASH_ESCAPE = re.compile(rb"\\/")
_ASCII_ESCAPE = re.compile(rb"\\u00([0-7][0-9a-fA-F])")
_ASCII = {f"{code:02x}".encode(): bytes([code]) for code in range(128)}
# Up to this many escapes of one kind are undone one by one (Python's unquote_to_bytes, a regex callback);
# past it, or where both kinds occur, every escape is rewritten as quoted-printable's `=XX` and
# binascii.a2b_qp undoes them all in C. Each `=` first becomes `=3D` and each `%` that starts no escape
# `=25`, so that every `=` a2b_qp sees starts an escape (none is a soft line break); the remaining `%` all
# start one and become `=` by a plain replace.
ONE_BY_ONE_MAX = 32
# Longer data is decoded a piece of about this size at a time.
CHUNK = 64 * 1024
_BARE_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
# A `\u00` that starts no ASCII escape is spelled `\=7500` (which a2b_qp turns back into `\u00`), so that
# the others can all be replaced in C: escapes in the data cost a regex substitution only where they are not.
_NOT_ASCII_ESCAPE = re.compile(rb"\\u00(?![0-7][0-9A-Fa-f])")


def views(data: bytes) -> Iterator[bytes]:
    """`data`, then each layer of it decoded (percent and JSON escapes undone together), while the layer
    before held an escape and at most MAX_LAYERS of them."""
    yield data
    if b"%" not in data and b"\\" not in data:
        return  # nothing to undo: the usual path, query and headers
    view = data
    for _ in range(MAX_LAYERS):
        decoded = decode(view)
        if decoded is view:
            return
        yield decoded
        view = decoded


def has_escape(data: bytes) -> bool:
    """Whether `data` holds a `%XX`, an ASCII `\\u00XX` or a `\\/`."""
    return bool((b"%" in data and _PERCENT_ESCAPE.search(data)) or (b"\\" in data and _JSON_ESCAPE.search(data)))


def decode(data: bytes) -> bytes:
    """Every `%XX`, ASCII `\\u00XX` and `\\/` in `data` undone in one left-to-right pass: what an escape
    decodes to is not decoded again. `data` itself when it holds none."""
    if len(data) <= CHUNK:
        return _decode(data)
    pieces, changed = [], False
    for start, end in _chunks(data):
        piece = data[start:end]
        decoded = _decode(piece)
        changed = changed or decoded is not piece
        pieces.append(decoded)
    return b"".join(pieces) if changed else data


def _chunks(data: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) of consecutive pieces of about CHUNK bytes that split no escape: an escape is at most 6
    bytes and starts with the only `%` or backslash in it, so a piece ends 5 bytes earlier than CHUNK would
    have it or at the first escape that could start in those 5."""
    start, size = 0, len(data)
    while start < size:
        end = start + CHUNK
        if end >= size:
            end = size
        else:
            tail = [at for at in (data.find(b"%", end - 5, end), data.find(b"\\", end - 5, end)) if at >= 0]
            if tail:
                end = min(tail)
        yield start, end
        start = end


def _decode(data: bytes) -> bytes:
    percent = b"%" in data and _PERCENT_ESCAPE.search(data) is not None
    ascii_escape = False
    if b"\\" in data and _JSON_ESCAPE.search(data):
        data = _SLASH_ESCAPE.sub(b"/", data)  # first: a `\/` is part of no other escape and makes none
        ascii_escape = _ASCII_ESCAPE.search(data) is not None
    if percent and ascii_escape:
        return _quoted_printable(data)
    if percent:
        return unquote_to_bytes(data) if data.count(b"%") <= ONE_BY_ONE_MAX else _quoted_printable(data)
    if ascii_escape:
        if data.count(b"\\u00") <= ONE_BY_ONE_MAX:
            return _ASCII_ESCAPE.sub(lambda m: _ASCII[m.group(1).lower()], data)
        return _quoted_printable(data)
    return data


def _quoted_printable(data: bytes) -> bytes:
    """`decode` for data without `\\/`: each escape rewritten as `=XX` and undone by binascii in C."""
    qp = data.replace(b"=", b"=3D") if b"=" in data else data
    if b"%" in qp:
        qp = _BARE_PERCENT.sub(b"=25", qp).replace(b"%", b"=")
    if b"\\u00" in qp:
        qp = _NOT_ASCII_ESCAPE.sub(rb"\\=7500", qp).replace(b"\\u00", b"=")
    return binascii.a2b_qp(qp)


def json_unescape(data: bytes) -> bytes:
    """Undo JSON `\\/` and `\\u00XX` escapes wherever they appear (the data need not be valid JSON)."""
    return _ASCII_ESCAPE.sub(lambda m: _ASCII[m.group(1).lower()], _SLASH_ESCAPE.sub(b"/", data))
