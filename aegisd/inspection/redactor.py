"""Replace a secret's forms with `[REDACTED]` in a stream, without buffering the stream.

At the end of each chunk the redactor holds back only the longest tail that could still grow
into a form (a proper prefix of one), so it never holds more than (longest form - 1) bytes, and
a chunk ending in ordinary text such as an SSE event's blank line is released whole at once.
Matches are leftmost, and longest among forms starting at the same byte, exactly as
`Redaction.redact_all` on the whole body would choose them, whatever the chunk boundaries.

Memory and time are linear in the forms' length, for secrets of up to the vault's 16 KiB too. Up to
FRAGMENT (64) bytes of each form are handled whole: a set of their prefixes holds the tails to keep
back, and one trie regex finds the forms. Past that both would grow with the square of the length (a
16,000-byte secret's forms have some 10^9 bytes of prefixes, and `re` compiles their 110 KB at some
microseconds a byte, 0.2 s on the event loop, where a redaction is built on first use): a longer tail
must begin with a long form's first FRAGMENT bytes, which `bytes.find` locates, and a long form is
found by a regex over its first FRAGMENT bytes and confirmed where they occur.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable

from aegisd.inspection.literal_matcher import FRAGMENT, compile_literals, compile_longest

REDACTED = b"[REDACTED]"


class Redaction:
    """The forms of one credential's injected secret, compiled for replacement."""

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
        # Tails of up to FRAGMENT - 1 bytes are looked up here; longer ones start with a long form's head.
        self._prefixes = frozenset(f[:n] for f in ordered for n in range(1, min(FRAGMENT, len(f))))
        self._short_max = min(FRAGMENT, self.longest) - 1
        heads: dict[bytes, list[bytes]] = {}
        for form in ordered:  # longest first, so within a head the longest form is tried first
            if len(form) > FRAGMENT:
                heads.setdefault(form[:FRAGMENT], []).append(form)
        self._heads = tuple((head, tuple(forms)) for head, forms in heads.items())
        self._form_bytes = frozenset(b for f in ordered for b in f)

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

    def redact_all(self, data: bytes) -> tuple[bytes, int]:
        """Every form in `data` replaced; returns the result and how many were replaced."""
        if self.exact:
            return self.pattern.subn(REDACTED, data)
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
        if not data or data[-1] not in self._form_bytes:
            return 0
        if self._heads and len(data) - start >= FRAGMENT:
            best = self._long_pending(data, start)
            if best:
                return best
        for size in range(min(self._short_max, len(data) - start), 0, -1):
            if data[-size:] in self._prefixes:
                return size
        return 0

    def _long_pending(self, data: bytes, start: int) -> int:
        """`pending` for tails of FRAGMENT bytes or more, which begin with a long form's first FRAGMENT bytes."""
        size, best = len(data), 0
        view = memoryview(data)
        for head, forms in self._heads:
            # Where this head starts a tail longer than `best` and shorter than the head's longest form.
            low, end = max(start, size - len(forms[0]) + 1), size - best - 1 + FRAGMENT
            at = data.find(head, low, end)
            while at >= 0:
                tail = view[at:]
                if any(len(form) > size - at and form.startswith(tail) for form in forms):
                    best = size - at
                    break
                at = data.find(head, at + 1, end)
        return best


class StreamRedactor:
    """One response body's redaction state: feed chunks in order, then finish once."""

    def __init__(self, redaction: Redaction) -> None:
        self._redaction = redaction
        self._held = b""
        self.replaced = 0

    def feed(self, chunk: bytes) -> bytes:
        """The redacted output that is certain now; may be empty while a possible form is held."""
        if not self._redaction.exact:
            return self._feed_long(chunk)
        data = self._held + chunk if self._held else chunk
        pattern, pos = self._redaction.pattern, 0
        out: list[bytes] = []
        while True:
            hold_from = len(data) - self._redaction.pending(data, pos)
            match = pattern.search(data, pos, hold_from + self._redaction.longest)
            if match is None or match.start() >= hold_from:
                break
            out += (data[pos:match.start()], REDACTED)
            pos = match.end()
            self.replaced += 1
        out.append(data[pos:hold_from])
        self._held = data[hold_from:]
        return b"".join(out)

    def _feed_long(self, chunk: bytes) -> bytes:
        """`feed` where some form is longer than FRAGMENT: a pattern match is only where one may begin."""
        data = self._held + chunk if self._held else chunk
        redaction, pos = self._redaction, 0
        out: list[bytes] = []
        while True:
            hold_from = len(data) - redaction.pending(data, pos)
            end = hold_from + redaction.longest
            match = redaction.pattern.search(data, pos, end)
            found = None if match is None else redaction.confirm(data, match.start(), end)
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
