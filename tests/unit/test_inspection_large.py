"""Large bodies: inspecting one costs memory within a small multiple of its size, runs beside the event loop
past INLINE_BODY_MAX, and does so in calls of bounded length, with exactly the result of one whole scan.

Found by a cold review: 10 KB of gzip decoding to 10 MiB of `%41` held the event loop for 4.1 s and took the
daemon's peak RSS from 129 to 866 MiB (unquote_to_bytes split the body into a piece per escape).
"""

from __future__ import annotations

import asyncio
import gzip
import importlib
import random
import tracemalloc
from typing import Any, cast

import pytest
from multidict import CIMultiDict

from aegisd.gate import outbound_inspection
from aegisd.inspection import VAULT_SECRET, Inspector, SecretSource, key_formats
from aegisd.inspection.key_formats import FORMATS, OVERLAP, find_key_formats
from tests.inspection_samples import fake_keys
from tests.unit.event_loops import Run
from tests.unit.test_decompress_splits import raw_deflate, two_way

SECRET = b"large-body-secret-Q7w8E9r0"
KEYS = [key.encode() for keys in fake_keys().values() for key in keys]
PREFIXES = [prefix for fmt in FORMATS for prefix in fmt.prefixes]
# Bodies dense with what costs the most per byte: escapes (valid, bare, of both kinds, nested) and prefixes.
DENSE = [b"%41", b"%2541", b"%%41", b"%zz%41", b"\\u0041", b"\\u00zz\\u0041", b"%41\\u0042", b"a\\/", b"%5Cu0041",
         b"==%41", b"sk-", b"://", b"AIza", b"-----BEGIN PRIVATE KEY----- a: "]


def _reference_key_formats(data: bytes) -> set[str]:
    """One `finditer` per format over the whole data, every match judged: what the windowed scan must equal."""
    found: set[str] = set()
    for fmt in FORMATS:
        for match in fmt.pattern.finditer(data):
            family = match.lastgroup
            if family is not None and key_formats._accepted(fmt, match, data):
                found.add(family)
    return found


@pytest.mark.parametrize("unit", DENSE, ids=lambda u: u.decode()[:16])
def test_scanning_a_dense_body_allocates_a_small_multiple_of_its_size(unit: bytes) -> None:
    inspector = Inspector([SecretSource("c", (SECRET,))])
    data = unit * (2 * 1024 * 1024 // len(unit))
    tracemalloc.start()
    try:
        assert inspector.scan(data) == set()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * len(data), f"{unit!r}: {peak / len(data):.1f}x the body allocated at once"


def test_the_windowed_whole_data_scan_is_one_finditer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bodies of many windows, keys and near misses planted across the seams, through the whole-data scan."""
    rng = random.Random(31)
    monkeypatch.setattr(key_formats, "PREFILTER_MAX", -1)
    pieces = [*KEYS, *(b" " + key + b" " for key in KEYS), *(key[:rng.randrange(1, len(key))] for key in KEYS),
              *PREFIXES, b" ", b"\n", b"-", b"_", b"x",
              b"postgres://app:s3cr3t@db/x", b"redis://:****@h", b"_://u:pw@h", b"A" * 700, b"sk-" + b"a" * 600]
    bodies = [b"".join(rng.choice(pieces) for _ in range(rng.randrange(50, 400))) for _ in range(60)]
    expected = [_reference_key_formats(body) for body in bodies]
    for window in (97, 1000, 4096):
        monkeypatch.setattr(key_formats, "WINDOW", window)
        assert [find_key_formats(body) for body in bodies] == expected, window
    assert sum(map(bool, expected)) > 40 and len({f for found in expected for f in found}) == len(key_formats.FAMILIES)


def _width(tree: Any) -> tuple[int, int]:
    """The most any match of `tree` can span and the most any look-ahead inside it reads past its position."""
    longest_lookahead = 0
    for op, arg in tree:
        name = str(op)
        if name in ("ASSERT", "ASSERT_NOT"):
            direction, inner = arg
            if direction > 0:  # a look-ahead (a look-behind reads what the match already spans)
                longest_lookahead = max(longest_lookahead, inner.getwidth()[1] + _width(inner)[1])
        elif name in ("SUBPATTERN", "MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT", "ATOMIC_GROUP", "BRANCH"):
            inners = arg[1] if name == "BRANCH" else [arg[-1]] if name != "ATOMIC_GROUP" else [arg]
            for inner in inners:
                longest_lookahead = max(longest_lookahead, _width(inner)[1])
    return tree.getwidth()[1], longest_lookahead


def test_every_match_attempt_reads_within_the_window_overlap() -> None:
    """What makes the windowed scan exact: no pattern reads more than OVERLAP bytes from where it starts."""
    parser = importlib.import_module("re._parser")
    for fmt in FORMATS:
        longest, lookahead = _width(parser.parse(fmt.pattern.pattern))
        assert longest < parser.MAXREPEAT and longest + lookahead + 1 < OVERLAP, (fmt.pattern.pattern[:40], longest)


def test_a_large_body_is_inspected_beside_the_event_loop() -> None:
    """Past INLINE_BODY_MAX the loop keeps turning while the body is inspected, and the finding still counts."""
    inspector = Inspector([SecretSource("c", (SECRET,))])
    body = b"%%41" * (outbound_inspection.INLINE_BODY_MAX // 2) + SECRET
    request = cast(Any, type("Request", (), {"headers": CIMultiDict[str]()}))
    route = cast(Any, type("Route", (), {"body_inspection": "block"}))
    x = cast(Any, type("Row", (), {"agent": "bot", "flags": "", "bytes_in": 0, "path": "/x",
                                   "target_host": "h", "path_inspected": False})())

    async def inspect_while_ticking() -> tuple[int, BaseException | None]:
        ticks = 0
        task = asyncio.ensure_future(outbound_inspection.inspect_request(
            request, route, inspector, x, "/x", "", CIMultiDict[str](), body, 10 * len(body)))
        while not task.done():
            await asyncio.sleep(0)
            ticks += 1
        return ticks, task.exception()

    ticks, error = asyncio.run(inspect_while_ticking())
    assert ticks > 1, "the event loop did not turn while the body was inspected"
    assert error is not None and getattr(error, "code", None) == "body_inspection", error
    assert x.flags == f"body_inspection_block={VAULT_SECRET}"


def test_a_small_compressed_body_is_inspected_inline_and_a_bomb_beside_the_loop() -> None:
    """Found by a cold review: every compressed body went to the two inspection threads, so a 60-byte gzip
    POST waited 1.5-2 s behind another agent's queued bombs. It is decoded inline up to INLINE_BODY_MAX now,
    and handed over only when it decodes to more."""
    inspector = Inspector([SecretSource("c", (SECRET,))])
    gzipped = CIMultiDict[str]({"Content-Encoding": "gzip"})
    request = cast(Any, type("Request", (), {"headers": gzipped}))
    route = cast(Any, type("Route", (), {"body_inspection": "block"}))

    def suspensions(body: bytes) -> tuple[int, BaseException | None]:
        x = cast(Any, type("Row", (), {"agent": "bot", "flags": "", "bytes_in": 0, "path": "/x",
                                       "target_host": "h", "path_inspected": False})())
        coroutine = outbound_inspection.inspect_request(request, route, inspector, x, "/x", "", CIMultiDict[str](),
                                                        body, 10 * 1024 * 1024)

        async def drive() -> tuple[int, BaseException | None]:
            task = asyncio.ensure_future(coroutine)
            ticks = 0
            while not task.done():
                await asyncio.sleep(0)
                ticks += 1
            return ticks, task.exception()

        return asyncio.run(drive())

    small = gzip.compress(b'{"note": "' + SECRET + b'"}')
    ticks, error = suspensions(small)
    assert getattr(error, "code", None) == "body_inspection", error
    assert ticks <= 1, f"a {len(small)}-byte gzip body left the event loop ({ticks} turns)"
    bomb = gzip.compress(b"%41" * (outbound_inspection.INLINE_BODY_MAX // 2) + SECRET)
    assert len(bomb) < outbound_inspection.INLINE_BODY_MAX
    ticks, error = suspensions(bomb)
    assert getattr(error, "code", None) == "body_inspection", error
    assert ticks > 1, "a body decoding past INLINE_BODY_MAX was inspected on the event loop"


def test_the_readings_of_a_deflate_body_share_the_inline_size_and_the_limit() -> None:
    """A body valid as zlib (harmless) and as raw deflate (a secret after 300 KiB) is handed to a thread once
    its readings together decode past INLINE_BODY_MAX, inspected there in both, and refused 413 when they
    together pass the limit, though each alone would fit."""
    inspector = Inspector([SecretSource("c", (SECRET,))])
    body = two_way(raw_deflate(b"a" * (300 * 1024) + SECRET))
    inline = outbound_inspection.INLINE_BODY_MAX
    with pytest.raises(outbound_inspection._LargerThanInline):
        outbound_inspection._inspect_body(inspector, body, "deflate", 10 * 1024 * 1024, inline)
    assert outbound_inspection._inspect_body(inspector, body, "deflate", 10 * 1024 * 1024, None) == (
        {VAULT_SECRET}, None)
    _, problem = outbound_inspection._inspect_body(inspector, body, "deflate", 400 * 1024, None)
    assert problem is not None and (problem.status, problem.code) == (413, "body_too_large")


def test_each_agent_has_one_body_in_the_inspection_threads_queue_at_a_time(run: Run) -> None:
    """Found by a cold review: two crafted 10 MiB bodies of one agent held both threads, and another agent's
    300 KiB body waited 38 s behind them. An agent's next body waits for its previous one; another agent's
    goes in beside it, and an agent with nothing queued holds no state."""
    turns = outbound_inspection.AgentTurns()
    order: list[str] = []

    async def body(agent: str, name: str, release: asyncio.Event) -> None:
        async with turns.turn(agent):
            order.append(name)
            await release.wait()

    async def main() -> None:
        first, second, other = asyncio.Event(), asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(body("a", "a1", first)), asyncio.create_task(body("a", "a2", second)),
                 asyncio.create_task(body("b", "b1", other))]
        for _ in range(5):
            await asyncio.sleep(0)
        assert order == ["a1", "b1"]  # a2 waits for a1; b1 did not wait for either
        first.set()
        other.set()
        second.set()
        await asyncio.gather(*tasks)
        assert order == ["a1", "b1", "a2"] and not turns._turns

    run(main())
