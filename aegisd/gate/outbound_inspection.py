"""Step 8: inspect what the agent sends (path, query string, headers, body) for credential-like strings.

Per credential: `off` streams the body untouched; `warn` forwards and flags the ledger row; `block`
(the default) refuses with 403 `body_inspection`. In `warn` and `block` the pipeline reads the body
whole (`read_body`), bounded by `max_body_bytes` (413 past it), has it inspected here, then forwards
it from that buffer. Findings name
families only (`vault_secret`, `openai_key`, ...): never the matched text, never which credential.

A body larger than INLINE_BODY_MAX, or a compressed one that together with what it decodes to comes to
more than that (each gzip member after the first counting MEMBER_COST), is inspected in a worker thread, so
that one agent's large or crafted body cannot stall everyone else's requests on the event loop: inspecting
10 MiB costs up to about a second and a half of CPU (crafted for it; 10 KB of gzip can decode to that much),
and every step of it is either a C pass that releases the GIL (Hyperscan, zlib) or a bounded call that holds
it for at most a few tens of milliseconds (views.CHUNK, key_formats.WINDOW, one gzip member's decoding). A
small compressed body is decoded inline within that budget, so it never waits behind them, and costs the
event loop no more than a plain body of INLINE_BODY_MAX would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from aegisd.gate.agent_connection import GateRequest
from aegisd.gate.headers import cgi_name, plain_names
from aegisd.gate.refusal import Refusal
from aegisd.gate.routing import Route
from aegisd.inspection import REDACTED, Inspector
from aegisd.inspection.decompress import (
    DECODABLE,
    GZIP_MAGIC,
    MEMBER_COST,
    TooLarge,
    deflate_readings,
    gzip_reading,
)

NOT_INSPECTABLE = "not_inspectable"
# A path holding more findings than this is recorded as one marker: bounds the bisection's scans.
MASK_ROUNDS = 4
# A longer text holding a finding is recorded as one marker, found by one scan: bisecting a 64 KiB path of
# nested percent-encodings took half a second of the event loop, and a crafted 2 KiB one with 8 findings 14 ms
# (an agent's refusals have a ledger budget of 80 rows a second). These bounds: about 3.5 ms at worst.
MASK_BISECT_BYTES = 1024
# For the row of a request that names no agent (anyone can send those): two findings in at most 256 bytes, a few
# dozen scans of a short text, about 1.3 ms at worst.
TOKENLESS_MASKING = {"bisect_bytes": 256, "rounds": 2}
# Bodies up to this size are inspected on the event loop: a clean one in well under a millisecond (about
# 0.1 ms per 64 KiB of JSON), the worst crafted one in about 15 ms, where handing it to a thread would
# add some 40 µs to every request (the 64 KiB POST the benchmark sends among them).
INLINE_BODY_MAX = 256 * 1024
# Inspection of larger bodies: two at a time, each scan running without the GIL for the most part; more
# wait their turn here rather than in the default executor, which the control socket and doctor use.
INSPECTION_THREADS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="aegis-inspect")


class AgentTurns:
    """One body of each agent in the inspection threads' queue at a time. Its queue is first come, first served:
    one agent's bodies (its concurrency cap, 64 by default, of up to 1.5 s each) would hold every other agent's
    large body for minutes; now another agent's waits for at most one body of each agent ahead of it."""

    def __init__(self) -> None:
        self._turns: dict[str, tuple[asyncio.Lock, list[int]]] = {}  # agent -> (its turn, [bodies waiting or in])

    @contextlib.asynccontextmanager
    async def turn(self, agent: str) -> AsyncIterator[None]:
        lock, users = self._turns.setdefault(agent, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._turns[agent]


INSPECTION_TURNS = AgentTurns()


class Inspected(Protocol):
    """What this step writes on the request's ledger row (the pipeline's Exchange)."""

    agent: str  # whose turn in the inspection threads a large body takes (AgentTurns)
    flags: str
    bytes_in: int
    path: str
    target_host: str  # the agent's X-Target-Host, or the allowlist's only host: a label under a wildcard is the agent's
    path_inspected: bool  # the row's path was inspected (and masked if it holds a finding)


async def inspect_request(request: GateRequest, route: Route, inspector: Inspector, x: Inspected, raw_path: str,
                          query: str, headers: CIMultiDict[str], body: bytes | None, limit: int) -> None:
    """Pass, flag (warn) or refuse (block) the request; `body` is the whole body, read by `read_body`.

    `query` and `headers` are what of the agent's reaches the upstream (headers.agent_query/agent_headers).
    """
    mode = route.body_inspection
    if mode == "off":
        return
    found = inspector.scan_each({
        "path": raw_path.encode("utf-8", "surrogateescape"),
        "query string": query.encode("utf-8", "surrogateescape"),
        "headers": "\n".join(map(": ".join, headers.items())).encode("utf-8", "surrogateescape"),
        "target host": x.target_host.encode("utf-8", "surrogateescape"),  # a gate header, so not in `headers`
    })
    x.path_inspected = True
    if "path" in found:  # the ledger and webhooks record the path: never with what matched in it
        x.path = masked(inspector, raw_path)
    if "target host" in found:
        x.target_host = masked(inspector, x.target_host)
    problem: Refusal | None = None
    if body:
        encoding = content_encodings(request.headers)
        try:
            if len(body) > INLINE_BODY_MAX or inspector.slow_to_scan(body):
                raise _LargerThanInline()
            # Inline, a compressed body decoded only while it and its decoded text (and members) together fit
            # INLINE_BODY_MAX: a small one never waits in the threads' queue behind other agents' large bodies.
            in_body, problem = _inspect_body(inspector, body, encoding, limit, INLINE_BODY_MAX)
        except _LargerThanInline:
            async with INSPECTION_TURNS.turn(x.agent):
                in_body, problem = await asyncio.get_running_loop().run_in_executor(
                    INSPECTION_THREADS, _inspect_body, inspector, body, encoding, limit, None)
        _note(found, "body", in_body)
    if not found and problem is None:
        return
    families = sorted(set().union(*found.values())) or [NOT_INSPECTABLE]
    if mode == "warn":
        _flag(x, "body_inspection_warn=" + "+".join(families))
        return
    _flag(x, "body_inspection_block=" + "+".join(families))
    if problem is not None and families == [NOT_INSPECTABLE]:
        raise problem
    places = list(found)
    where = ", ".join(places[:-1]) + " and " + places[-1] if len(places) > 1 else places[0]
    verb = "carry" if len(places) > 1 else "carries"
    raise Refusal(403, "body_inspection", f"not forwarded: the request's {where} {verb} a credential-like string "
                  f"({', '.join(families)}); secrets and API keys may not leave through the gate")


def content_encodings(headers: CIMultiDictProxy[str]) -> str:
    """Every value of the request's Content-Encoding header, joined, counting the names CGI-style servers read as
    it: Werkzeug, uWSGI and Puma give `Content_Encoding` (lighttpd `Content.Encoding` too) the variable
    `HTTP_CONTENT_ENCODING` that a decompressing middleware reads, so the body is inspected as such an upstream
    may decode it. Two values (whatever their names) are refused like two Content-Encoding headers: `415`."""
    own = headers.getall("Content-Encoding", ())
    if plain_names(headers):  # the usual request: one pass over the names, in C
        return ", ".join(own)
    spelt_for_cgi = [value for name, value in headers.items()
                     if name.lower() != "content-encoding" and cgi_name(name) == "content_encoding"]
    return ", ".join([*own, *spelt_for_cgi])


class BodyTooLarge(Exception):
    """The agent's body crossed the configured limit while it was being read."""


async def counted_body(request: GateRequest, x: Inspected, limit: int) -> AsyncIterator[bytes]:
    """The request body as it arrives, counted in `x.bytes_in`; BodyTooLarge as soon as it passes `limit`."""
    async for chunk in request.body():
        x.bytes_in += len(chunk)
        if x.bytes_in > limit:
            raise BodyTooLarge()
        yield chunk


async def read_body(request: GateRequest, x: Inspected, limit: int) -> bytes:
    """The whole request body, refusing (413) as soon as it passes `limit` bytes (a declared length past it
    was refused before the body was asked for)."""
    buffer = bytearray()
    try:
        async for chunk in counted_body(request, x, limit):
            buffer += chunk
    except BodyTooLarge:
        raise body_too_large(limit) from None
    except ConnectionError:  # the agent hung up (AgentGone), or sent broken chunked framing (BodyMalformed)
        raise body_broken() from None
    return bytes(buffer)


class _LargerThanInline(Exception):
    """The body, or what it decodes to, is larger than inline inspection takes: a worker thread's job."""


def _inspect_body(inspector: Inspector, body: bytes, content_encoding: str, limit: int,
                  inline_max: int | None) -> tuple[set[str], Refusal | None]:
    """The families found in the body as sent and decompressed, and why it cannot be inspected, if it cannot.
    With `inline_max`, _LargerThanInline once the body and its decoded text would pass it (nothing scanned yet)."""
    decoded, problem = _decoded(body, content_encoding, limit, inline_max)
    if inline_max is not None and any(map(inspector.slow_to_scan, decoded)):
        raise _LargerThanInline()
    families = inspector.scan(body)
    for reading in decoded:
        families |= inspector.scan(reading)
    return families, problem


def _decoded(body: bytes, content_encoding: str, limit: int,
             inline_max: int | None = None) -> tuple[list[bytes], Refusal | None]:
    """The decompressed body when it is compressed (each reading of a `deflate` one, together no larger than
    one body may be), or why it cannot be inspected; _LargerThanInline when, with `inline_max` given, the body
    and what it decodes to (each gzip member after the first counting MEMBER_COST) would together pass it
    and what it decodes to is within the limit."""
    cap = limit if inline_max is None else min(limit, max(inline_max - len(body), 0))
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        if not body.startswith(GZIP_MAGIC):
            return [], None
        encoding, sniffed = "gzip", True  # an upload of a .gz file: look inside it too
    elif encoding in DECODABLE:
        sniffed = False
    else:
        one = ", in one Content-Encoding header (a Content_Encoding header counts as one)" if "," in encoding else ""
        return [], Refusal(415, "body_not_inspectable", f"a request body with Content-Encoding {encoding!r} "
                           f"cannot be inspected; send it as identity, gzip or deflate{one}")
    try:
        if encoding == "deflate":  # zlib, raw deflate, gzip: upstreams differ in which they read
            decoded, whole = deflate_readings(body, cap)
            return decoded, None if whole else Refusal(
                400, "body_not_inspectable", "the request body is not valid deflate, or valid in only some of the "
                "ways an upstream may read it (zlib, raw deflate)")
        reading = gzip_reading(body, cap)
    except TooLarge:
        if cap < limit:
            raise _LargerThanInline() from None
        return [], Refusal(413, "body_too_large", f"the decompressed request body is larger than {limit} "
                           "bytes; inspected bodies must fit the limit once decompressed (each gzip member after "
                           f"the first counting {MEMBER_COST} bytes)", close=True)
    # A body cut short or damaged (a CRC error is found only after its data) is inspected for what decodes of
    # it, as gunzip prints what it can before it complains. An upload that only starts like gzip, or a .gz cut
    # short or damaged, is then inspected as its bytes and that; a body declared gzip is not valid gzip.
    decoded = [reading.out] if reading.out else []
    if reading.ended or sniffed:
        return decoded, None
    return decoded, Refusal(400, "body_not_inspectable", f"the request body is not valid {encoding}")


def _note(found: dict[str, set[str]], where: str, families: set[str]) -> None:
    if families:
        found.setdefault(where, set()).update(families)


def _flag(x: Inspected, flag: str) -> None:
    x.flags = f"{x.flags},{flag}" if x.flags else flag


def masked(inspector: Inspector, path: str, bisect_bytes: int = MASK_BISECT_BYTES, rounds: int = MASK_ROUNDS) -> str:
    """`path` with each `/`-separated segment that holds (part of) a finding replaced by [REDACTED], for the
    ledger, which must never hold the text that matched. Whole segments, because a key format's match may
    run on past the shortest text that is found (`sk-` and 32 or more characters) and a base64 form's edges
    depend on its neighbours; a finding seen only once decoded (percent-encoded) is masked as sent."""
    data = path.encode("utf-8", "surrogateescape")
    if len(data) > bisect_bytes:
        return REDACTED.decode() if inspector.scan(data) else path
    for _ in range(rounds):
        if not inspector.scan(data):
            return data.decode("utf-8", "surrogateescape")
        start, end = _first_finding(inspector, data)
        start, end = data.rfind(b"/", 0, start) + 1, data.find(b"/", end)
        data = data[:start] + REDACTED + (data[end:] if end >= 0 else b"")
    return REDACTED.decode()


def _first_finding(inspector: Inspector, data: bytes) -> tuple[int, int]:
    """A short span of `data` (which holds a finding) that holds one on its own, as (start, end): by bisection,
    the shortest prefix holding a finding, then that prefix's shortest suffix still holding it."""
    end = _bisect(lambda n: bool(inspector.scan(data[:n])), 0, len(data))
    start = _bisect(lambda n: not inspector.scan(data[n:end]), 0, end) - 1
    return start, end


def _bisect(holds: Callable[[int], bool], low: int, high: int) -> int:
    """The least n in (low, high] where `holds` turns true, given it is false at `low` and true at `high`."""
    while high - low > 1:
        middle = (low + high) // 2
        if holds(middle):
            high = middle
        else:
            low = middle
    return high


def body_broken() -> Refusal:
    """400 for a request body the agent abandoned or whose chunked framing broke, whether it was being read
    whole or streamed upstream; the connection is closed after (if the agent is still there to answer)."""
    return Refusal(400, "bad_request", "the request body ended early or is malformed", close=True)


def body_too_large(limit: int) -> Refusal:
    """413 for a request body past `limit`, however it was found out; the connection is closed after."""
    return Refusal(413, "body_too_large", f"the request body is larger than {limit} bytes", close=True)
