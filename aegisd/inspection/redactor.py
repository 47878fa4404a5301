"""Replace a secret's forms with `[REDACTED]` in a stream, without buffering the stream.

Two stages, chained: what the first releases is what the second reads.

1. Raw: the forms exactly as given (secret_forms: raw, URL-encoded, `json.dumps`'d, base64) are replaced
   where their bytes occur. This alone catches an echo whatever surrounds it, text that only looks like
   an escape included (`C:\\u00` right before a hex key), and a secret that holds `\\/` or `\\u0041` itself.
2. JSON view: the same forms are matched in a view of the data with every JSON string escape undone
   (`\\"`, `\\\\`, `\\/`, `\\b`, `\\f`, `\\n`, `\\r`, `\\t`, `\\uXXXX` in either hex case, a surrogate pair as
   one character; a lone surrogate is left as it is), and each match replaces the escaped bytes it came
   from. Serialisers escape what they like one character at a time (PHP's json_encode writes `\\/` for
   every `/`, .NET's System.Text.Json `\\u0022` for `"` and `\\u002B` for `+`, Rails `\\u003c`), so no list
   of whole escaped forms covers an echo: a form of n escapable bytes has at least 2^n spellings. Undoing
   the escapes first leaves one spelling to find, whatever the mix. Escapes are read left to right, so
   `\\\\u0041` is an escaped backslash and then the text `u0041`, as a JSON parser reads it.

An escape decodes to 1 to 4 bytes, so a view offset maps back through a table of the escapes; a match
that begins or ends inside a character an escape decoded to covers the whole escape (a little more is
replaced, never less), and the next match is looked for after that escape.

At the end of each chunk a stage holds back a tail that could still grow into a form and, in the second, an
escape the chunk's end cut off (`\\`, `\\u00`, a high surrogate that may be waiting for its low half: up to
`\\uD83D\\uDE0`). Which tail must not depend on what the secrets say: a tail held because it began a form,
and released when the next chunk showed it did not, told an upstream and its agent every secret of the
redaction's group, a guessed byte at a time (found at the 29th stop: a guess per chunk, and whether the gate's
answer cut the chunk before the guess). So the tail held is the run of bytes after the chunk's last whitespace
byte (of those no form holds), at most `Forms.hold_max`: one less than a power of two past the longest form, so only
a bucket of the forms' length shows. Any form the chunk's end cuts off begins inside that run. The first stage
holds at most `Forms.hold_max` bytes, the second that many bytes of the view, each from at most 6 escaped bytes
(`\\u0041`), plus 11 bytes; a chunk ending in a newline, as an SSE event or an NDJSON line does, is released
whole at once, and text cut mid-word waits for the next chunk. Matches are leftmost, and longest among forms
starting at the same byte, exactly
as `Redaction.redact_all` on the whole body would choose them, whatever the chunk boundaries: each stage's
input is cut only where a match, or a held tail, begins, which is never inside an escape, and escapes are
read the same way from there as from the start.

The usual chunk holds no form and no escape that could be part of one. One Hyperscan scan (a SIMD pass,
some 20 µs for 64 KiB) for the forms proves the first half of that, and a look for a backslash the second
(when there is one, as in JSON with `\\n` in it, a second scan for the escapes that decode to a byte some
form holds): the second stage reads what the first released, where every form is already replaced, so
only such an escape can make a new match (or a `[REDACTED]` next to text, for a secret with `[` or `]`
at an edge, which is always searched). Such a chunk costs that and a look at its tail; a chunk
where a scan finds something is searched with the regex (a byte at a time, about 0.5 ms for 64 KiB), in
the second stage through its view.

Memory and time are linear in the forms' length, for secrets of up to the vault's 16 KiB too. Up to
FRAGMENT (64) bytes of each form are handled whole: one trie regex finds the forms. Past that it would
grow with the square of the length (`re` compiles a 16,000-byte secret's forms, some 110 KB, at some
microseconds a byte, 0.2 s in the worker thread where a redaction is built on first use, holding the GIL
all along): a long form is found by a regex over its first FRAGMENT bytes and confirmed where they occur.

A held tail is searched again, its view rebuilt, with what comes after it. With a long secret in the group
that tail can be tens of KB of the view, so a stage holding a tail does not take up chunks much smaller than
it one by one (found at the 29th stop: an upstream trickling 18-byte chunks of escapes cost 30 ms of the
event loop each, with a 16 KiB secret in the group): it waits until what came since is an eighth of the
tail, or holds one of the bytes that end a held run, or the body ends. So each byte costs a bounded amount
of work whatever the chunks, and what waits depends only on lengths and on those bytes, never on the
secrets' content.
"""

from __future__ import annotations

import bisect
import itertools
import re
import sys
from collections.abc import Callable, Iterable

from aegisd.inspection.literal_matcher import (
    FRAGMENT,
    LiteralScanner,
    compile_literals,
    compile_longest,
    stop_scan,
)

REDACTED = b"[REDACTED]"
# Bytes that end a held tail unless some form holds one: what separates words, lines and SSE events.
HOLD_STOPS = b" \t\n\r\x0b\x0c"
HOLDS_SLICE = 64 * 1024  # Redaction.holds undoes escapes this much at a time
WAIT_RATIO = 8  # a stage takes up what came since once it is this fraction of its held tail (or holds a stop)

# One JSON string escape, read left to right (`\\` first consumes both backslashes): a surrogate pair as one
# token, any other `\uXXXX` but a lone surrogate, and the two-byte escapes. The group, all of it but the
# backslash (so that `re` looks for the backslash first, a third faster), makes `split` return each escape
# between the text around it.
_ESCAPE = re.compile(rb'\\(u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}'
                     rb'|u(?![dD][89a-fA-F])[0-9a-fA-F]{4}|["\\/bfnrt])')
_SHORT = {b'"': b'"', b"\\": b"\\", b"/": b"/", b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t"}
# The escapes of ASCII characters, every spelling, looked up rather than parsed: they are nearly all of them.
_ASCII = {b"u00%s" % spelling: bytes([code]) for code in range(128)
          for spelling in {b"%02x" % code, b"%02X" % code, b"%x%X" % (code >> 4, code & 15),
                           b"%X%x" % (code >> 4, code & 15)}}
_DECODED = _SHORT | _ASCII
# The start of an escape cut off by the end of a chunk (up to 11 bytes), or a whole high surrogate that may
# yet be the first half of a pair: held back until the next chunk completes or ends it.
_UNFINISHED = re.compile(rb"(?:\\u[dD][89abAB][0-9a-fA-F]{2})?\\(?:u[0-9a-fA-F]{0,3})?\Z"
                         rb"|\\u[dD][89abAB][0-9a-fA-F]{2}\Z")
_HIGH_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}")
_LOW_SURROGATE = re.compile(rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}")
_LONGEST_UNFINISHED = 11
_LONGEST_ESCAPE = 12


def _decode(escape: bytes) -> bytes:
    """The UTF-8 bytes of one escape `_ESCAPE` matched, without its backslash."""
    found = _DECODED.get(escape)
    if found is not None:
        return found
    if len(escape) == 5:
        return chr(int(escape[1:], 16)).encode()
    high, low = int(escape[1:5], 16), int(escape[7:], 16)
    return chr(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00)).encode()


def _decode_all(escapes: list[bytes]) -> list[bytes]:
    try:  # nearly always: every escape is a short or an ASCII one, looked up in C
        return list(map(_DECODED.__getitem__, escapes))
    except KeyError:
        return [_decode(escape) for escape in escapes]


class JsonView:
    """`data` with its JSON string escapes undone (`text`), and the way back to `data`'s offsets.

    The table of escapes (where each starts and ends, in `data` and in `text`) is built only when an
    offset other than the two ends is asked for: a view in which no form occurs costs a regex split and
    a join.
    """

    __slots__ = ("_decoded", "_mapped", "_parts", "_raw_ends", "_raw_starts", "_size", "_view_ends",
                 "_view_starts", "text")

    def __init__(self, data: bytes) -> None:
        self._parts = _ESCAPE.split(data)  # text, escape (without its backslash), text, ..., text
        self._size = len(data)
        self._decoded = _decode_all(self._parts[1::2])
        joined = self._parts.copy()
        joined[1::2] = self._decoded
        self.text = b"".join(joined)
        self._mapped = False
        self._view_starts: list[int] = []
        self._view_ends: list[int] = []
        self._raw_starts: list[int] = []
        self._raw_ends: list[int] = []

    def _escape_at(self, at: int) -> int:
        """Index of the last escape starting at or before view offset `at`, -1 if none (builds the table)."""
        if not self._mapped:
            self._mapped = True
            parts = self._parts
            texts = list(map(len, parts[0::2]))
            raw = [len(escape) + 1 for escape in parts[1::2]]
            view = list(map(len, self._decoded))
            # Escape i comes after text pieces 0..i and escapes 0..i-1.
            before = list(itertools.accumulate(texts[:-1]))
            self._raw_starts = [t + e for t, e in zip(before, itertools.accumulate(raw, initial=0), strict=False)]
            self._raw_ends = [s + n for s, n in zip(self._raw_starts, raw, strict=True)]
            self._view_starts = [t + e for t, e in zip(before, itertools.accumulate(view, initial=0), strict=False)]
            self._view_ends = [s + n for s, n in zip(self._view_starts, view, strict=True)]
        return bisect.bisect_right(self._view_starts, at) - 1

    def _in_last_text(self, at: int) -> bool:
        """Whether view offset `at` is in the text after the last escape (a held tail, usually): mapped
        without building the table."""
        return len(self.text) - at <= len(self._parts[-1])

    def start(self, at: int) -> int:
        """The offset in `data` where a match starting at view offset `at` starts: inside an escape's
        character, the escape's start."""
        return self._raw(at, ending=False)

    def end(self, at: int) -> int:
        """The offset in `data` where a match ending at view offset `at` ends: inside an escape's
        character, the escape's end."""
        return self._raw(at, ending=True)

    def _raw(self, at: int, *, ending: bool) -> int:
        """`start` and `end`, which differ only at an escape's own character: one maps it to the escape's
        first byte, the other past its last (and an end right at an escape to the escape's start)."""
        if at == 0 or self._in_last_text(at):
            return 0 if at == 0 else self._size - (len(self.text) - at)
        i = self._escape_at(at)
        if i < 0:
            return at
        if at >= self._view_ends[i]:
            return at - self._view_ends[i] + self._raw_ends[i]
        if not ending or at == self._view_starts[i]:
            return self._raw_starts[i]
        return self._raw_ends[i]

    def after(self, at: int) -> int:
        """View offset `at`, or the end of the escape's character it falls inside."""
        if at == 0 or self._in_last_text(at):
            return at
        i = self._escape_at(at)
        return self._view_ends[i] if i >= 0 and self._view_starts[i] < at < self._view_ends[i] else at


def json_unescaped(data: bytes) -> bytes:
    """`data` as the view reads it."""
    return JsonView(data).text if b"\\" in data else data


def _unspanned(data: bytes, at: int) -> int:
    """A place at or before `at` that no escape spans, so that JsonView reads data[place:] as it reads that part of
    data: `at` when no escape starts in the 11 bytes before it, else the start of the one holding the last
    backslash there; 0 for `at` <= 0."""
    if at <= 0:
        return 0
    last = data.rfind(b"\\", max(0, at - _LONGEST_ESCAPE + 1), at)
    return at if last < 0 else _token_start(data, last)


def _token_start(data: bytes, at: int) -> int:
    """Where the escape (or lone backslash) that holds the backslash at `at` starts, read as JsonView reads data:
    a run of backslashes pairs up from its first, and a low surrogate's escape right after a high one's is the
    second half of one pair."""
    low = max(0, at - 4096)  # the run's start found in C, from a window unless the run is longer than it
    window = data[low:at].rstrip(b"\\")
    run = low + len(window) if window or low == 0 else len(data[:at].rstrip(b"\\"))
    if (at - run) % 2:
        return at - 1
    if (run == at and at >= 6 and _LOW_SURROGATE.match(data, at) and _HIGH_SURROGATE.match(data, at - 6)
            and _token_start(data, at - 6) == at - 6):
        return at - 6
    return at


def unfinished_escape(data: bytes) -> int:
    """The length of the start of an escape, or a high surrogate, that ends `data` and could still grow
    into an escape the view undoes; 0 if none."""
    at = data.find(b"\\", max(0, len(data) - _LONGEST_UNFINISHED))
    while at >= 0:
        if _UNFINISHED.match(data, at) and _starts_escape(data, at):
            return len(data) - at
        at = data.find(b"\\", at + 1)
    return 0


def _starts_escape(data: bytes, at: int) -> bool:
    """Whether the backslash at `at` starts an escape: an odd one in a run of them is the second of `\\\\`.
    `data` begins where an escape could (a stream's start, or where a held tail was cut)."""
    run = at
    while run > 0 and data[run - 1] == 0x5C:
        run -= 1
    return (at - run) % 2 == 0


def _touches_marker(form: bytes) -> bool:
    """Whether `form` can occur in text across a `[REDACTED]` put in by the first stage."""
    return (REDACTED in form or form in REDACTED
            or any(form.startswith(REDACTED[i:]) or form.endswith(REDACTED[:i]) for i in range(1, len(REDACTED))))


class Forms:
    """The forms, compiled to search for: leftmost and longest, the tail to hold back, a prefilter."""

    def __init__(self, forms: Iterable[bytes]) -> None:
        ordered = sorted({f for f in forms if f}, key=lambda f: (-len(f), f))
        if not ordered:
            raise ValueError("a redaction needs at least one form")
        self.longest = len(ordered[0])
        self._forms = tuple(ordered)
        # Matches wherever a form may begin: the leftmost, longest form itself when every form is short (the
        # usual case); else where one's first FRAGMENT bytes occur, for `search` to confirm. No match: no form.
        self.exact = self.longest <= FRAGMENT
        pattern = compile_longest(ordered) if self.exact else compile_literals(f[:FRAGMENT] for f in ordered)
        assert pattern is not None
        self.pattern: re.Pattern[bytes] = pattern
        self.form_bytes = frozenset(b for f in ordered for b in f)
        # The held tail (see the module docstring): the run after the last of these bytes, at most hold_max long.
        self.hold_stops = tuple(bytes([b]) for b in HOLD_STOPS if b not in self.form_bytes)
        self.hold_max = max(FRAGMENT, 1 << (self.longest - 1).bit_length()) - 1
        # Proves a chunk clean (about 1 ms to compile). Hyperscan's Python binding takes no NUL in a literal,
        # which only a binary secret's raw form holds: such a redaction searches every chunk with the regex.
        literals = {f[:FRAGMENT] for f in ordered}
        self._scanner = None if any(b"\0" in f for f in literals) else LiteralScanner(sorted(literals))
        # Whether a form can straddle a `[REDACTED]` (a secret with `[` or `]` at an edge, or in it): then the
        # view is searched even where no escape could have changed it.
        self.touches_marker = any(_touches_marker(f) for f in ordered)

    def clean(self, data: bytes) -> bool:
        """Whether `data` holds no form (nor a long form's first FRAGMENT bytes); False if unsure."""
        return self._scanner is not None and self._scanner.scan(data, stop_scan)

    def search(self, data: bytes, pos: int = 0, endpos: int = sys.maxsize) -> tuple[int, int] | None:
        """(start, end) of the leftmost form within data[pos:endpos], the longest one starting there; or None."""
        found = self.pattern.search(data, pos, endpos)
        if found is None:
            return None
        return (found.start(), found.end()) if self.exact else self.confirm(data, found.start(), endpos)

    def confirm(self, data: bytes, at: int, endpos: int) -> tuple[int, int] | None:
        """The leftmost, longest form from `at` on, where the first FRAGMENT bytes of one occur at `at`."""
        while True:
            for form in self._forms:  # longest first
                if data.startswith(form, at, endpos):
                    return at, at + len(form)
            found = self.pattern.search(data, at + 1, endpos)  # a form's first bytes without the rest of it
            if found is None:
                return None
            at = found.start()

    def pending(self, data: bytes, start: int) -> int:
        """How many bytes at the end of data[start:] to hold back: the run after its last stop byte, at most
        hold_max. Every proper prefix of a form that ends the data lies inside it; what it holds besides does not
        depend on the forms, only on which whitespace bytes they hold and on a bucket of their length."""
        low = max(start, len(data) - self.hold_max)
        if low >= len(data):
            return 0
        tail = data[low:]
        return len(tail) - 1 - max((tail.rfind(stop) for stop in self.hold_stops), default=-1)


def _relevant_escapes(form_bytes: frozenset[int]) -> list[bytes]:
    """The literal starts of every escape that decodes to a byte some form holds: an escape that does not
    cannot be part of a match in the view. Any `\\u` when a form holds a byte past ASCII."""
    if any(b >= 0x80 for b in form_bytes):
        return [b"\\u", *(b"\\" + e for e, d in _SHORT.items() if d[0] in form_bytes)]
    return sorted(b"\\" + e for e, d in _DECODED.items() if d[0] in form_bytes)


class Redaction:
    """The forms of one credential's injected secret, compiled for replacement (see the module docstring)."""

    def __init__(self, forms: Iterable[bytes]) -> None:
        self.forms = Forms(forms)
        self.longest = self.forms.longest
        relevant = _relevant_escapes(self.forms.form_bytes)
        self._escapes = LiteralScanner(relevant) if relevant else None

    def clean(self, data: bytes) -> bool:
        """Whether `redact_all(data)` would return `data` unchanged without looking further (False if unsure)."""
        return self.forms.clean(data) and self.view_unchanged(data)

    def view_unchanged(self, data: bytes) -> bool:
        """Whether no escape in `data` decodes to a byte of a form, so the second stage can find nothing
        in it that the first did not (it reads what the first released, where every form is replaced)."""
        if self.forms.touches_marker:
            return False
        return b"\\" not in data or self._escapes is None or self._escapes.scan(data, stop_scan)

    def holds(self, data: bytes) -> bool:
        """Whether `data` holds a form, as it is or with every JSON escape undone (what redact_all would replace).
        Its cost does not depend on what the secrets hold: the view is built whenever `data` holds a backslash
        (redact_all's shortcut skips it when no escape decodes to a byte of a form, which timed told which
        characters the secrets hold), and the regex runs only where the scan finds a form."""
        forms = self.forms
        if not forms.clean(data) and forms.search(data) is not None:
            return True
        if b"\\" not in data:
            return False
        # The view a slice at a time, each from and to a place no escape spans, overlapping by enough for any form:
        # one regex split and join of a whole MiB held the GIL for 90 ms, with no other connection served.
        overlap = 6 * forms.longest + _LONGEST_ESCAPE
        size = max(HOLDS_SLICE, 2 * overlap)
        start = 0
        while True:
            end = len(data) if len(data) - start <= size else _unspanned(data, start + size)
            view = json_unescaped(data[start:end])
            if not forms.clean(view) and forms.search(view) is not None:
                return True
            if end == len(data):
                return False
            start = _unspanned(data, end - overlap)

    def redact_all(self, data: bytes) -> tuple[bytes, int]:
        """Every form in `data` replaced, raw then in the view; returns the result and how many were replaced."""
        raw, first, _ = redact_raw(self.forms, data, final=True)
        out, second, _ = redact_view(self, raw, final=True)
        return out, first + second

    def stream(self) -> StreamRedactor:
        return StreamRedactor(self)


def redact_raw(forms: Forms, data: bytes, *, final: bool) -> tuple[bytes, int, bytes]:
    """The first stage: every form replaced where its bytes occur, in what is certain now. Returns the output,
    how many were replaced, and the tail to hold back (a proper prefix of a form; none when `final`)."""
    if forms.clean(data):  # the usual chunk
        hold_from = len(data) if final else len(data) - forms.pending(data, 0)
        return data[:hold_from], 0, data[hold_from:]
    if final and forms.exact:
        out, count = forms.pattern.subn(REDACTED, data)
        return out, count, b""
    pos = 0
    parts: list[bytes] = []
    while True:
        hold_from = len(data) if final else len(data) - forms.pending(data, pos)
        found = forms.search(data, pos, hold_from + forms.longest)
        if found is None or found[0] >= hold_from:
            break
        parts += (data[pos:found[0]], REDACTED)
        pos = found[1]
    parts.append(data[pos:hold_from])
    return b"".join(parts), len(parts) // 2, data[hold_from:]


def redact_view(redaction: Redaction, data: bytes, *, final: bool) -> tuple[bytes, int, bytes]:
    """The second stage on `data`: (what is settled, redacted; how many were replaced; the tail to hold).

    Not `final`, the tail is an escape cut off at the end and, before it, the longest view tail that is a
    proper prefix of a form; `final`, nothing is held.
    """
    forms = redaction.forms
    unfinished = 0 if final else unfinished_escape(data)
    whole = data[:len(data) - unfinished] if unfinished else data
    if redaction.view_unchanged(whole):
        # No match; the view's tail that could grow into a form is made of form bytes, which no escape here
        # decodes to, so it is the raw tail unless an escape's bytes are in that (then look through the view).
        tail = 0 if final else forms.pending(whole, 0)
        if not tail or whole.find(b"\\", max(0, len(whole) - tail - _LONGEST_ESCAPE + 1)) < 0:
            hold = len(whole) - tail
            return data[:hold], 0, data[hold:]
        # An escape near the end: the view's tail decides what is held, and nothing can match in the view, so
        # only the tail's view is built, from a place no escape spans, far enough back to hold hold_max bytes of
        # the view (found at the 29th stop: a chunk dense in escapes was viewed whole, 30 ms for 64 KiB of `\/`).
        start = _unspanned(whole, len(whole) - 6 * forms.hold_max - _LONGEST_ESCAPE)
        if start > 0:
            view = JsonView(whole[start:])
            hold = start + view.start(len(view.text) - forms.pending(view.text, 0))
            return data[:hold], 0, data[hold:]
    view = JsonView(whole)
    text = view.text
    out: list[bytes] = []
    pos = raw_pos = count = 0
    if forms.clean(text):
        hold = len(text) - (0 if final else forms.pending(text, 0))
    else:
        while True:
            hold = len(text) - (0 if final else forms.pending(text, pos))
            found = forms.search(text, pos, hold + forms.longest)
            if found is None or found[0] >= hold:
                break
            start, end = view.start(found[0]), view.end(found[1])
            out += (data[raw_pos:start], REDACTED)
            raw_pos, pos = end, view.after(found[1])  # the next match starts after this one's last escape
            count += 1
    raw_hold = view.start(hold)
    out.append(data[raw_pos:raw_hold])
    return b"".join(out), count, data[raw_hold:]


class _Stage:
    """One stage's state for one body: what it holds back between chunks, what came since and waits to be taken
    up with it (see the module docstring), and how many forms it replaced."""

    def __init__(self, redact: Callable[[bytes, bool], tuple[bytes, int, bytes]], stops: tuple[bytes, ...]) -> None:
        self._redact = redact
        self._stops = stops
        self._held = b""
        self._waiting: list[bytes] = []
        self._waiting_size = 0
        self.replaced = 0

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        if self._held:
            self._waiting.append(chunk)
            self._waiting_size += len(chunk)
            if self._waiting_size * WAIT_RATIO < len(self._held) and not any(s in chunk for s in self._stops):
                return b""
            data = b"".join((self._held, *self._waiting))
            self._waiting, self._waiting_size = [], 0
        else:
            data = chunk
        out, count, self._held = self._redact(data, False)
        self.replaced += count
        return out

    def finish(self) -> bytes:
        data = b"".join((self._held, *self._waiting))
        self._held, self._waiting, self._waiting_size = b"", [], 0
        out, count, _ = self._redact(data, True)
        self.replaced += count
        return out


class StreamRedactor:
    """One response body's redaction state: feed chunks in order, then finish once."""

    def __init__(self, redaction: Redaction) -> None:
        forms = redaction.forms
        self._raw = _Stage(lambda data, final: redact_raw(forms, data, final=final), forms.hold_stops)
        self._view = _Stage(lambda data, final: redact_view(redaction, data, final=final), forms.hold_stops)

    @property
    def replaced(self) -> int:
        """How many forms were replaced so far, by either stage."""
        return self._raw.replaced + self._view.replaced

    def feed(self, chunk: bytes) -> bytes:
        """The redacted output that is certain now; may be empty while a possible form is held."""
        return self._view.feed(self._raw.feed(chunk))

    def finish(self) -> bytes:
        """Everything still held, redacted: the stream has ended."""
        out = self._view.feed(self._raw.finish())
        return out + self._view.finish()
