"""Body bytes received and not yet passed on: a request's from its agent, an answer's from its upstream.

llhttp hands a body over one piece per chunk (or per read). A body framed as 1-byte chunks, sent by an agent or
by an upstream, would be a Python object per byte, each one then inspected, framed and written on its own without
a turn for the event loop in between: seconds of stall for everyone. Pieces are therefore taken all at once, as one,
and each held piece counts what holding it costs, so a buffer of tiny pieces reaches the high-water mark as soon
as one of whole reads would in memory.
"""

from __future__ import annotations

import collections

PIECE_OVERHEAD = 64  # bytes a held piece costs beyond its own: the bytes object's header and its deque slot


class BodyBuffer:
    """The pieces held, and `held`: their bytes plus PIECE_OVERHEAD each, the figure flow control compares."""

    __slots__ = ("_pieces", "held")

    def __init__(self) -> None:
        self._pieces: collections.deque[bytes] = collections.deque()
        self.held = 0

    def __bool__(self) -> bool:
        return bool(self._pieces)

    def put(self, piece: bytes) -> None:
        self._pieces.append(piece)
        self.held += len(piece) + PIECE_OVERHEAD

    def take(self) -> bytes:
        """Every piece held, joined (b"" if none)."""
        pieces = self._pieces
        data = pieces.popleft() if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        self.held = 0
        return data

    def clear(self) -> None:
        self._pieces.clear()
        self.held = 0
