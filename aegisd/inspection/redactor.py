"""Replace a secret's forms with `[REDACTED]` in a stream, without buffering the stream.

At the end of each chunk the redactor holds back only the longest tail that could still grow
into a form (a proper prefix of one), so it never holds more than (longest form - 1) bytes, and
a chunk ending in ordinary text such as an SSE event's blank line is released whole at once.
Matches are leftmost, and longest among forms starting at the same byte, exactly as
`Redaction.redact_all` on the whole body would choose them, whatever the chunk boundaries.
"""

from __future__ import annotations

from collections.abc import Iterable

from aegisd.inspection.literal_matcher import compile_longest

REDACTED = b"[REDACTED]"


class Redaction:
    """The forms of one credential's injected secret, compiled for replacement."""

    def __init__(self, forms: Iterable[bytes]) -> None:
        ordered = sorted({f for f in forms if f}, key=lambda f: (-len(f), f))
        if not ordered:
            raise ValueError("a redaction needs at least one form")
        self.pattern = compile_longest(ordered)  # at one starting byte, the longest form that fits
        self.longest = len(ordered[0])
        self._prefixes = frozenset(f[:n] for f in ordered for n in range(1, len(f)))
        self._form_bytes = frozenset(b for f in ordered for b in f)

    def redact_all(self, data: bytes) -> tuple[bytes, int]:
        """Every form in `data` replaced; returns the result and how many were replaced."""
        return self.pattern.subn(REDACTED, data)

    def stream(self) -> StreamRedactor:
        return StreamRedactor(self)

    def pending(self, data: bytes, start: int) -> int:
        """Length of the longest suffix of data[start:] that is a proper prefix of some form."""
        if not data or data[-1] not in self._form_bytes:
            return 0
        for size in range(min(self.longest - 1, len(data) - start), 0, -1):
            if data[-size:] in self._prefixes:
                return size
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

    def finish(self) -> bytes:
        """Everything still held, redacted: the stream has ended."""
        data, self._held = self._held, b""
        result, count = self._redaction.redact_all(data)
        self.replaced += count
        return result
