"""Time to the first server-sent event, over raw sockets so the client adds the same tiny cost to
both paths: connect, send the request, and stop the clock when the first `data:` event is complete.
"""

from __future__ import annotations

import asyncio
import statistics
import time


async def first_event_ms(port: int, path: str, token: str) -> float:
    """Milliseconds from connect to the first complete event; then read the stream to its end."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n"
               f"X-Aegis-Agent: {token}\r\nConnection: close\r\n\r\n")
    writer.write(request.encode())
    buffer = b""
    elapsed = -1.0
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            if not chunk:
                break
            buffer += chunk
            if elapsed < 0:
                start = buffer.find(b"data:")
                if start >= 0 and buffer.find(b"\n\n", start) >= 0:
                    elapsed = (time.perf_counter() - started) * 1000
    finally:
        writer.close()
    if elapsed < 0 or not buffer.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"no event from 127.0.0.1:{port}{path}: {buffer[:200]!r}")
    return elapsed


async def compare(direct_port: int, gate_port: int, token: str, rounds: int) -> dict[str, dict[str, float]]:
    """Alternate direct and gate, one connection at a time, and summarise each."""
    samples: dict[str, list[float]] = {"direct": [], "gate": []}
    for _ in range(5):  # warm both paths (the gate's pooled connection, Node's JIT)
        await first_event_ms(direct_port, "/stream", token)
        await first_event_ms(gate_port, "/sse/stream", token)
    for _ in range(rounds):
        samples["direct"].append(await first_event_ms(direct_port, "/stream", token))
        samples["gate"].append(await first_event_ms(gate_port, "/sse/stream", token))
    return {name: summarise(values) for name, values in samples.items()}


def summarise(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"n": len(ordered), "p50_ms": statistics.median(ordered), "p99_ms": percentile(ordered, 99),
            "max_ms": ordered[-1]}


def percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    rank = max(1, round(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]
