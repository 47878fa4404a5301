"""BodyBuffer: pieces are taken all at once, and each held piece counts what holding it costs."""

from __future__ import annotations

from aegisd.gate.body_buffer import PIECE_OVERHEAD, BodyBuffer


def test_pieces_are_taken_as_one_and_counted_with_their_overhead() -> None:
    buffer = BodyBuffer()
    assert not buffer and buffer.take() == b""
    for piece in (b"a", b"bc", b"def"):
        buffer.put(piece)
    assert buffer and buffer.held == 6 + 3 * PIECE_OVERHEAD  # 1-byte pieces reach a high-water mark early
    assert buffer.take() == b"abcdef"
    assert not buffer and buffer.held == 0
    buffer.put(b"one")
    assert buffer.take() == b"one" and buffer.held == 0
    buffer.put(b"dropped")
    buffer.clear()
    assert not buffer and buffer.held == 0 and buffer.take() == b""
