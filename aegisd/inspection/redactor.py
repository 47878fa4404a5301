"""Replace a secret's forms with `[REDACTED]` in a stream, without buffering the stream.

At the end of each chunk the redactor holds back only the longest tail that could still grow
into a form (a proper prefix of one), so it never holds more than (longest form - 1) bytes, and
a chunk ending in ordinary text such as an SSE event's blank line is released whole at once.
Matches are leftmost, and longest among forms starting at the same byte, exactly as
`Redaction.redact_all` on the whole body would choose them, whatever the chunk boundaries.

Memory and time are linear in the forms' length, for secrets of up to the vault's 16 KiB too: a set
of every prefix of every form would be quadratic (a 16,000-byte secret's forms have some 10^9 bytes
of prefixes), and so would trying each tail length against it at the end of every chunk. Only
prefixes shorter than HEAD bytes are kept in a set; a longer tail must begin with a form's first HEAD
bytes, which `bytes.find` locates. Likewise forms are found by a regex over their first FRAGMENT
bytes and confirmed where those occur: `re` compiles a pattern at some microseconds a byte, 0.2 s for
a 16,000-byte secret's 110 KB of forms, on the event loop, where a redaction is built on first use.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from aegisd.inspection.literal_matcher import FRAGMENT, compile_literals

REDACTED = b"[REDACTED]"
# Tails shorter than this are looked up in a set of short prefixes; longer ones start where a form's first
# HEAD bytes occur. Every form is at least MIN_SECRET_LENGTH (8) bytes long.
HEAD = 8


class Redaction:
    """The forms of one credential's injected secret, compiled for replacement."""

    def __init__(self, forms: Iterable[bytes]) -> None:
        ordered = sorted({f for f in forms if f}, key=lambda f: (-len(f), f))
        if not ordered:
            raise ValueError("a redaction needs at least one form")
        self._forms = tuple(ordered)
        starts = compile_literals(f[:FRAGMENT] for f in ordered)  # where a form may begin
        assert starts is not None
        self._starts = starts
        self.longest = len(ordered[0])
        self._short = frozenset(f[:n] for f in ordered for n in range(1, min(HEAD, len(f))))
        prefixes: dict[bytes, list[bytes]] = {}
        for form in ordered:  # longest first, so within a head the longest form is tried first
            if len(form) > HEAD:  # only a form longer than HEAD has a proper prefix of HEAD bytes or more
                prefixes.setdefault(form[:HEAD], []).append(form)
        self._heads = tuple((head, tuple(forms)) for head, forms in prefixes.items())
        self._form_bytes = frozenset(b for f in ordered for b in f)

    def search(self, data: bytes, pos: int = 0, endpos: int = sys.maxsize) -> tuple[int, int] | None:
        """(start, end) of the leftmost form within data[pos:endpos], the longest one starting there; or None."""
        starts, forms = self._starts, self._forms
        while (found := starts.search(data, pos, endpos)) is not None:
            at = found.start()
            for form in forms:  # longest first
                if data.startswith(form, at, endpos):
                    return at, at + len(form)
            pos = at + 1  # a form's first bytes without the rest of it
        return None

    def redact_all(self, data: bytes) -> tuple[bytes, int]:
        """Every form in `data` replaced; returns the result and how many were replaced."""
        found = self.search(data)
        if found is None:
            return data, 0
        out: list[bytes] = []
        pos = 0
        while found is not None:
            out += (data[pos:found[0]], REDACTED)
            pos = found[1]
            found = self.search(data, pos)
        out.append(data[pos:])
        return b"".join(out), len(out) // 2

    def stream(self) -> StreamRedactor:
        return StreamRedactor(self)

    def pending(self, data: bytes, start: int) -> int:
        """Length of the longest suffix of data[start:] that is a proper prefix of some form."""
        size = len(data)
        if size <= start or data[-1] not in self._form_bytes:
            return 0
        best = 0
        if self._heads and size - start >= HEAD:
            view = memoryview(data)
            for head, forms in self._heads:
                # Where this head starts a tail longer than `best` and shorter than the head's longest form.
                low, end = max(start, size - len(forms[0]) + 1), size - best - 1 + HEAD
                at = data.find(head, low, end)
                while at >= 0:
                    tail = view[at:]
                    if any(len(form) > size - at and form.startswith(tail) for form in forms):
                        best = size - at
                        break
                    at = data.find(head, at + 1, end)
            if best:
                return best
        for length in range(min(HEAD - 1, size - start), 0, -1):
            if data[-length:] in self._short:
                return length
        return 0


class StreamRedactor:
    """One response body's redaction state: feed chunks in order, then finish once."""

    def __init__(self, redaction: Redaction) -> None:
        self._redaction = redaction
        self._held = b""
        self.replaced = 0

    def feed(self, chunk: bytes) -> bytes:
        """The redacted output that is certain now; may be empty while a possible form is held."""
        data = self._held + chunk if self._held else chunk
        redaction, pos = self._redaction, 0
        starts = redaction._starts
        out: list[bytes] = []
        while True:
            hold_from = len(data) - redaction.pending(data, pos)
            end = hold_from + redaction.longest
            if starts.search(data, pos, end) is None:  # the usual chunk: no form can begin in it
                break
            found = redaction.search(data, pos, end)
            if found is None or found[0] >= hold_from:
                break
            out += (data[pos:found[0]], REDACTED)
            pos = found[1]
            self.replaced += 1
        out.append(data[pos:hold_from])
        self._held = data[hold_from:]
        return b"".join(out)

    def finish(self) -> bytes:
        """Everything still held, redacted: the stream has ended."""
        data, self._held = self._held, b""
        result, count = self._redaction.redact_all(data)
        self.replaced += count
        return result
