"""Decoded views of outbound data, so a secret hidden behind a common encoding is still seen.

Percent-encoding (`%XX`) and JSON's string escapes (`\\"`, `\\\\`, `\\/`, `\\b`, `\\f`, `\\n`, `\\r`, `\\t`,
`\\uXXXX`) can be applied to any subset of a secret's characters, in any mix and nested (JSON inside a form field
or inside a JSON string, a JSON-escaped `%`, a doubly percent-encoded value), which no finite list of encoded forms
covers. So `views` undoes both kinds together: one pass (`decode`) undoes every escape of either kind in the data,
and the next pass undoes those in the result, as long as it holds one and at most MAX_LAYERS times. Any mix is
one layer; each level of nesting is one more.

JSON escapes are read as a JSON parser reads them, left to right: `\\\\u0041` is an escaped backslash and then the
text `u0041` (which the next layer reads as `A`). `\\uXXXX` becomes the character's UTF-8 bytes, in either hex
case, and a surrogate pair (`\\ud83d\\ude00`) one character; a lone surrogate, and a backslash that starts no
escape, are left as they are.

What a pass can skip, since it runs on every inspected body (Escapes, escapes_for):
- the escapes that spell no character any vault secret holds: `\\"` and those of control characters unless a
  secret holds `"`, a backslash (whose JSON-in-JSON spelling needs `\\\\` undone, and so `\\"`) or a control
  character, `\\uXXXX` of non-ASCII characters unless one holds such a character (a body of `\\u`-escaped CJK
  text). `%XX`, `\\\\`, `\\/` and `\\u00XX` of ASCII characters are always undone.
- data whose only escapes are the two-character ones for `"` and control characters (`\\"`, `\\n`, `\\t`, ...:
  the usual JSON body), which is not decoded at all: a secret can be written in it only as its json.dumps form,
  which is searched for as it is (secret_forms.json_forms), and a key format right after such an escape counts
  as standing alone (key_formats). Data holding another escape that counts (`%XX`, `\\/`, `\\u00XX` of an ASCII
  character, any `\\uXXXX` when non-ASCII ones count, `\\\\` when `\\"` does: JSON inside a JSON string) has every
  escape of the kinds above undone, those included: a secret can then mix spellings (`\\"` for one quote,
  `\\u0022` or `%22` for the next).

Clean data (no `%` and no backslash: the usual path, query and headers) costs two `in` tests, and data whose
backslashes start only those two-character escapes a regex search for the others.

Inspector.scan_each relies on decoding being local and all or nothing: no escape holds a newline or a NUL, and
whether data is decoded depends on what it holds, so a layer of a joined text is that layer of each part, joined,
wherever the part has that layer itself (a part with no escape of its own that makes a view has none).

Cost: a pass is a few C-speed passes over the data plus, where escapes are few, a Python step per escape, and
a regex split and a join where it holds `\\uXXXX` escapes of non-ASCII characters to undo (a Python object each:
slow_to_decode). Data longer than CHUNK
is searched and decoded a chunk at a time, so what a pass allocates stays within a small multiple of the data (the
Python objects a regex substitution, a split or unquote_to_bytes makes per escape or piece exist for one chunk at
a time: 10 MiB of `%41` took 700 MiB at once), and so does each call that holds the GIL (large bodies are inspected
in a worker thread, which must leave the event loop its turn).
"""

from __future__ import annotations

import binascii
import io
import re
from collections.abc import Iterable, Iterator
from urllib.parse import unquote_to_bytes

# Levels of nesting undone: a secret JSON-escaped inside a form field that was percent-encoded twice is 3.
MAX_LAYERS = 4
# Whether there is anything to undo. These look for a literal, which `re` skips to, rather than for either
# `%` or `\`, which it tries at every byte: ten times as long on 64 KiB of JSON.
_PERCENT_ESCAPE = re.compile(rb"%[0-9A-Fa-f]{2}")
_PAIR = rb"u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"  # a surrogate pair, one character
_WIDE = rb"u(?!00[0-7])(?![dD][89a-fA-F])[0-9a-fA-F]{4}"  # a non-ASCII character's, but a lone surrogate's
_LONGEST_ESCAPE = 12  # a surrogate pair
_LONGEST_TRIGGER = 6  # `\uXXXX`, of the escapes whose presence makes data worth decoding
_SHORT = {b'"': b'"', b"\\": b"\\", b"/": b"/", b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t"}
# The escapes of ASCII characters and the two-character ones, every spelling, looked up rather than parsed.
_DECODED = {b"\\" + escape: byte for escape, byte in _SHORT.items()} | {
    b"\\u00%s" % spelling: bytes([code]) for code in range(128)
    for spelling in {b"%02x" % code, b"%02X" % code, b"%x%X" % (code >> 4, code & 15),
                     b"%X%x" % (code >> 4, code & 15)}}
# A control character's escape (`\n`) and that character as quoted-printable (`=0A`).
_CONTROL_QP = tuple((b"\\" + letter, b"=%02X" % _SHORT[letter][0]) for letter in (b"b", b"f", b"n", b"r", b"t"))
# Bytes a secret may hold without needing `Escapes.quotes` or `wide`: printable ASCII but `"` and `\`, and DEL.
# A secret holding a backslash needs `\\` to count: sent as JSON inside a JSON string (a tool call's
# `arguments`), `abc\def` is `abc\\\\def`, whose only escapes are `\\` and `\"`.
_PLAIN = bytes(range(0x20, 0x80)).replace(b'"', b"").replace(b"\\", b"")


class Escapes:
    """The JSON escapes a pass undoes: always `\\\\`, `\\/` and `\\u00XX` of ASCII characters; with `quotes` also
    `\\"` and the two-character ones of control characters (`\\b`, `\\f`, `\\n`, `\\r`, `\\t`); with `wide` also
    `\\uXXXX` of non-ASCII characters and surrogate pairs. A secret can be spelt with those only if it holds `"`
    or a control character (or a backslash: `\\\\` then counts, see _PLAIN), or a non-ASCII character:
    `escapes_for` leaves out what no secret needs, which a body full of `\\n` and `\\"`, or of `\\u`-escaped CJK
    text, would otherwise spend a pass undoing for nothing.

    `trigger`: what makes data worth decoding besides a `%XX` (see the module docstring). `escape`: one escape
    it undoes, matched where a backslash starts one (from the left, `\\\\` first takes both backslashes).
    `rest`: those but `\\/` and `\\"` (see _json_and_percent), as one group for `split`. `controls`: the
    control characters' escapes it undoes, each with its quoted-printable spelling (see _quoted_printable)."""

    __slots__ = ("controls", "escape", "quotes", "rest", "trigger", "wide", "wide_escape")

    def __init__(self, *, quotes: bool, wide: bool) -> None:
        self.quotes, self.wide = quotes, wide
        triggers = [rb"/", *([rb"\\"] if quotes else []), rb"u[0-9A-Fa-f]{4}" if wide else rb"u00[0-7][0-9A-Fa-f]"]
        self.trigger = re.compile(rb"\\(?:" + rb"|".join(triggers) + rb")")
        controls = b"bfnrt" if quotes else b""
        others = [*((_PAIR, _WIDE) if wide else ()), rb"u00[0-7][0-9A-Fa-f]"]
        self.escape = re.compile(rb"\\(?:" + rb"|".join([rb'[\\/"' + controls + rb"]" if quotes else rb"[\\/]",
                                                          *others]) + rb")")
        self.rest = re.compile(rb"(\\(?:" + rb"|".join([rb"[\\" + controls + rb"]", *others]) + rb"))")
        self.controls = _CONTROL_QP if quotes else ()
        self.wide_escape = re.compile(rb"(\\(?:" + _PAIR + rb"|" + _WIDE + rb"))") if wide else None

    def __repr__(self) -> str:
        return f"Escapes(quotes={self.quotes}, wide={self.wide})"


_KINDS = {(quotes, wide): Escapes(quotes=quotes, wide=wide) for quotes in (False, True) for wide in (False, True)}
EVERY = _KINDS[True, True]  # every JSON string escape


def escapes_for(secrets: Iterable[bytes]) -> Escapes:
    """The escapes a request's decoding must undo for these secrets to be found however they are spelt."""
    quotes = wide = False
    for secret in secrets:
        unusual = secret.translate(None, _PLAIN)  # in C: what is left is `"`, control and non-ASCII bytes
        if unusual:
            wide = wide or max(unusual) >= 0x80
            quotes = quotes or min(unusual) < 0x80
    return _KINDS[quotes, wide]


# Up to this many escapes (of each kind: JSON, percent) are undone one by one (a regex split, unquote_to_bytes);
# past it every escape is rewritten as quoted-printable's `=XX` and binascii.a2b_qp undoes them all in C. Each
# `=` first becomes `=3D` and each `%` that starts no escape `=25`, so that every `=` a2b_qp sees starts an escape
# (none is a soft line break); the remaining `%` all start one and become `=` by a plain replace.
ONE_BY_ONE_MAX = 32
# Longer data is decoded a piece of about this size at a time.
CHUNK = 64 * 1024
_BARE_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
# A `\u00` that starts no ASCII escape is spelled `\=7500` (which a2b_qp turns back into `\u00`), so that
# the others can all be replaced in C: escapes in the data cost a regex substitution only where they are not.
_NOT_ASCII_ESCAPE = re.compile(rb"\\u00(?![0-7][0-9A-Fa-f])")
_SLASH_ESCAPE = re.compile(rb"\\/")  # also json_unescape's
_ASCII_ESCAPE = re.compile(rb"\\u00([0-7][0-9a-fA-F])")
_ASCII = {f"{code:02x}".encode(): bytes([code]) for code in range(128)}


# `\\uXXXX` of non-ASCII characters are undone a Python step each (_wide_all: about 0.4 µs each, 10 ms for the
# 43,000 in 256 KiB of `\\u4e2d`), where every other escape is undone in C once many. Data that may hold more than
# this many when decoded (each `\\u` or `%` of it one at most, in each layer) is slow to decode (the gate inspects
# such a body in a worker thread, however small).
WIDE_ESCAPES_MAX = 4096


def slow_to_decode(data: bytes, escapes: Escapes) -> bool:
    """Whether decoding `data` may undo more than WIDE_ESCAPES_MAX `\\uXXXX` of non-ASCII characters."""
    return escapes.wide and data.count(b"\\u") + data.count(b"%") > WIDE_ESCAPES_MAX


def views(data: bytes, escapes: Escapes = EVERY) -> Iterator[bytes]:
    """`data`, then each layer of it decoded (percent and JSON escapes undone together), while the layer
    before held an escape and at most MAX_LAYERS of them."""
    yield data
    if b"%" not in data and b"\\" not in data:
        return  # nothing to undo: the usual path, query and headers
    view = data
    for _ in range(MAX_LAYERS):
        decoded = decode(view, escapes)
        if decoded is view:
            return
        yield decoded
        view = decoded


def has_escape(data: bytes, escapes: Escapes = EVERY) -> bool:
    """Whether `decode` changes `data`."""
    return _worth_decoding(data, escapes) and bool(
        (b"%" in data and _PERCENT_ESCAPE.search(data)) or (b"\\" in data and escapes.escape.search(data)))


def decode(data: bytes, escapes: Escapes = EVERY) -> bytes:
    """Every `%XX` and JSON string escape (of the kinds `escapes` names) in `data` undone in one left-to-right
    pass, what an escape decodes to not decoded again, when `data` holds a `%XX` or an `escapes.trigger` (module
    docstring); `data` itself when it does not, or holds no escape."""
    if not _worth_decoding(data, escapes):
        return data
    if len(data) <= CHUNK:
        return _decode(data, escapes)
    # Written out as decoded, from the first piece that changes: a list of the pieces and their join would hold
    # the result twice (getvalue hands over the buffer itself).
    out: io.BytesIO | None = None
    for start, end in _chunks(data):
        piece = data[start:end]
        decoded = _decode(piece, escapes)
        if out is None:
            if decoded is piece:
                continue
            out = io.BytesIO()
            out.write(memoryview(data)[:start])
        out.write(decoded)
    return data if out is None else out.getvalue()


def _worth_decoding(data: bytes, escapes: Escapes) -> bool:
    """Whether `data` holds a `%XX` or an `escapes.trigger`: looked for a CHUNK at a time (and the few bytes after,
    which hold the rest of one that starts in it), so that no `re` call holds the GIL for a whole large body."""
    percent, backslash = b"%" in data, b"\\" in data
    for start in range(0, len(data), CHUNK):
        end = start + CHUNK + _LONGEST_TRIGGER - 1
        if ((percent and _PERCENT_ESCAPE.search(data, start, end))
                or (backslash and escapes.trigger.search(data, start, end))):
            return True
    return False


def _chunks(data: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) of consecutive pieces of about CHUNK bytes that split no escape: a piece ends where CHUNK
    would have it or, when an escape runs across that, where the escape starts (or ends, if it starts the piece)."""
    start, size = 0, len(data)
    while start < size:
        end = start + CHUNK
        if end >= size:
            end = size
        else:
            across = _escape_across(data, start, end)
            if across is not None:
                end = across[0] if across[0] > start else across[1]
        yield start, end
        start = end


def _escape_across(data: bytes, start: int, end: int) -> tuple[int, int] | None:
    """(start, end) of the escape that begins before `end` and ends after it, reading from `start` (where no
    escape is cut), if there is one. A `%XX` starts at most 2 bytes before, a JSON escape at most 11: each
    backslash there is read as a pass reads it, an odd one in a run being the second of a `\\\\`. Every kind
    of escape counts, so a cut is never inside one whichever kinds a pass undoes."""
    at = data.find(b"%", max(start, end - 2), end)
    while at >= 0:
        if _PERCENT_ESCAPE.match(data, at):
            return at, at + 3
        at = data.find(b"%", at + 1, end)
    at = data.find(b"\\", max(start, end - _LONGEST_ESCAPE + 1), end)
    if at >= 0 and backslashes_before(data, start, at) % 2:
        at = data.find(b"\\", at + 1, end)  # the second of a `\\`, which ends by `end`
    while at >= 0:  # here a backslash where an escape may start
        escape = EVERY.escape.match(data, at)
        if escape is not None and escape.end() > end:
            return at, escape.end()
        at = data.find(b"\\", escape.end() if escape is not None else at + 1, end)
    return None


def backslashes_before(data: bytes, start: int, at: int) -> int:
    """How many backslashes come right before `at`, counting from `start`: a look at a few bytes, and at a
    doubling stretch of the run for a long one (each stretch stripped in C)."""
    count, step = 0, 16
    while True:
        low = max(start, at - count - step)
        stretch = data[low:at - count]
        kept = len(stretch.rstrip(b"\\"))
        count += len(stretch) - kept
        if kept or low == start:
            return count
        step *= 2


def _decode(data: bytes, escapes: Escapes) -> bytes:
    percent = b"%" in data and _PERCENT_ESCAPE.search(data) is not None
    if b"\\" in data and escapes.escape.search(data) is not None:
        return _json_and_percent(data, escapes, percent=percent)
    if percent:
        return unquote_to_bytes(data) if data.count(b"%") <= ONE_BY_ONE_MAX else _quoted_printable(data, escapes)
    return data


def _json_and_percent(data: bytes, escapes: Escapes, *, percent: bool) -> bytes:
    """`_decode` for data with a JSON escape to undo. `\\/` (and `\\"`) first, by dropping the backslash in C: they
    stand for the character after it, so where that takes the second backslash of a `\\\\` (in `\\\\/`), the
    backslash left before the `/` reads as that `\\\\` undone, which is what it was; no escape makes or ends one,
    and the rest (`Escapes.rest`) leave them alone. Then, when the other escapes are few, one by one (and a
    percent escape, which holds no backslash, in the text between them), else all in C through quoted-printable."""
    data = _SLASH_ESCAPE.sub(b"/", data)  # a substitution: a replace makes two passes, and `\\/` are few
    if escapes.quotes and b'\\"' in data:
        data = data.replace(b'\\"', b'"')  # a replace: `\"` are many, each a Python step in a substitution
    parts = escapes.rest.split(data, ONE_BY_ONE_MAX + 1) if b"\\" in data else [data]
    if len(parts) > 2 * ONE_BY_ONE_MAX + 1 or (percent and data.count(b"%") > ONE_BY_ONE_MAX):
        return _quoted_printable(data, escapes)
    if percent:
        parts[0::2] = [unquote_to_bytes(text) if b"%" in text else text for text in parts[0::2]]
    parts[1::2] = map(_json_decoded, parts[1::2])
    return b"".join(parts)


def _json_decoded(escape: bytes) -> bytes:
    found = _DECODED.get(escape)
    return found if found is not None else binascii.unhexlify(escape.replace(b"\\u", b"")).decode("utf-16-be").encode()


def _quoted_printable(data: bytes, escapes: Escapes) -> bytes:
    """`decode`'s pass where escapes are many: each rewritten as `=XX` (a non-ASCII character's `\\uXXXX` as its
    UTF-8 bytes, which a2b_qp keeps as they are) and undone by binascii in C; `\\/` and `\\"` already are."""
    qp = data.replace(b"=", b"=3D") if b"=" in data else data
    if b"%" in qp:
        qp = _BARE_PERCENT.sub(b"=25", qp).replace(b"%", b"=")
    if b"\\" not in qp:
        return binascii.a2b_qp(qp)
    if b"\\\\" in qp:
        # Replaced left to right, a run of backslashes pairs up from its start as a parser reads it: every
        # backslash left then starts an escape (or is one that starts none), as `\n` after `\\` does not.
        qp = qp.replace(b"\\\\", b"=5C")
    for escape, spelling in escapes.controls:  # in C: a split made a Python object per escape
        if escape in qp:
            qp = qp.replace(escape, spelling)
    if b"\\u" in qp:
        if escapes.wide_escape is not None:
            qp = _wide_all(qp, escapes.wide_escape)
        if b"\\u00" in qp:
            qp = _NOT_ASCII_ESCAPE.sub(rb"\\=7500", qp).replace(b"\\u00", b"=")
    return binascii.a2b_qp(qp)


def _wide_all(data: bytes, wide_escape: re.Pattern[bytes]) -> bytes:
    """Every `\\uXXXX` of a non-ASCII character and surrogate pair in `data` (whose backslashes all start an
    escape) as its character's UTF-8 bytes: one split, their hex digits read as UTF-16 in C (a pair makes one
    character), one join."""
    parts = wide_escape.split(data)  # text, escape, text, ..., text
    if len(parts) == 1:
        return data
    text = binascii.unhexlify(b"".join(parts[1::2]).replace(b"\\u", b"")).decode("utf-16-be")
    parts[1::2] = map(str.encode, text)  # one character per escape
    return b"".join(parts)


def json_unescape(data: bytes) -> bytes:
    """Undo JSON `\\/` and `\\u00XX` escapes wherever they appear (the data need not be valid JSON)."""
    return _ASCII_ESCAPE.sub(lambda m: _ASCII[m.group(1).lower()], _SLASH_ESCAPE.sub(b"/", data))

