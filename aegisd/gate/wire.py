"""HTTP/1.1 bytes the gate writes on both of its sides: message heads and chunked framing."""

from __future__ import annotations

from collections.abc import Iterable

LAST_CHUNK = b"0\r\n\r\n"


class HeadError(ValueError):
    """A field name or value holds a line break: sent, it would split into a field (or a message) of its own."""


def encode_head(start_line: str, fields: Iterable[tuple[str, str]]) -> bytes:
    """The start line, one `Name: value` line per field and the blank line, as bytes (UTF-8, with the
    surrogate escapes the parsers decoded non-UTF-8 bytes into turned back into those bytes)."""
    lines = [start_line]
    lines += [f"{name}: {value}" for name, value in fields]
    head = "\r\n".join(lines) + "\r\n\r\n"
    if head.count("\n") != len(lines) + 1 or head.count("\r") != len(lines) + 1:
        raise HeadError("a header holds a line break and cannot be sent")
    return head.encode("utf-8", "surrogateescape")


def status_allows_body(status: int) -> bool:
    """Whether an answer with this status may carry a body: 1xx, 204 and 304 never do."""
    return status >= 200 and status not in (204, 304)


def frame_chunk(chunk: bytes) -> bytes:
    """One chunk of a chunked body (never empty: an empty chunk would end the body)."""
    return b"%x\r\n%b\r\n" % (len(chunk), chunk)
