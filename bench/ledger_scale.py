"""The ledger at a million rows: how fast its writer commits, and how fast reads stay on top of it.

Rows go in through aegisd.ledger.LedgerWriter itself, before the daemon starts, chained under a
throwaway key: the daemon's real key derives from a vault that does not exist yet, so `ledger
verify` on this file would (rightly) fail. Nothing here verifies; timings of show/stats do not
depend on the key.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc

from aegisd.api.aegis.v1 import ledger_pb2, ledger_pb2_grpc
from aegisd.ledger import LedgerEntry, LedgerWriter
from bench.daemon import BIN, BenchDaemon
from bench.procstat import memory_kib, reset_peak

AGENTS = 100
SERVICES = 20
CHUNK = 10_000
SPAN_MS = 30 * 86_400_000  # rows spread over 30 days


def _entries(rng: random.Random, start: int, count: int, now_ms: int, step: int) -> list[LedgerEntry]:
    out = []
    for i in range(start, start + count):
        denied = rng.random() < 0.05
        service = f"svc{rng.randrange(SERVICES):02d}"
        out.append(LedgerEntry(
            kind="request", time_ms=now_ms - SPAN_MS + i * step, request_id=f"{i:016x}",
            agent=f"agent-{rng.randrange(AGENTS):03d}", credential=f"cred-{service}", service=service,
            method="POST" if rng.random() < 0.3 else "GET", path=f"/v1/items/{i % 997}",
            target_host=f"api.{service}.example.com", decision="denied" if denied else "allowed",
            reason="not_granted" if denied else "", status=403 if denied else 200,
            duration_ms=round(rng.uniform(1, 900), 3), bytes_in=rng.randrange(0, 4096),
            bytes_out=rng.randrange(0, 65536)))
    return out


async def fill(path: Path, rows: int, seed: int = 7) -> dict[str, float]:
    """Append `rows` rows through the real writer, a chunk at a time.

    Only append + commit is timed (rows_per_s: the writer on its own); building the entries, which
    the gate does anyway for each request, is kept off the clock but reported in wall_s.
    """
    rng = random.Random(seed)
    now_ms = time.time_ns() // 1_000_000
    writer = LedgerWriter(path)
    await writer.start()
    writer.set_key(os.urandom(32))
    timed = 0.0
    wall = time.perf_counter()
    for start in range(0, rows, CHUNK):
        chunk = _entries(rng, start, min(CHUNK, rows - start), now_ms, SPAN_MS // rows or 1)
        started = time.perf_counter()
        for entry in chunk[:-1]:
            writer.append_nowait(entry)
        await writer.append(chunk[-1])  # commits are in order: the last one done means all are
        timed += time.perf_counter() - started
    wall = time.perf_counter() - wall
    await writer.close()
    return {"rows": rows, "seconds": timed, "rows_per_s": rows / timed, "wall_s": wall}


def time_queries(daemon: BenchDaemon, repeats: int = 5) -> dict[str, Any]:
    """ListEntries over the control socket (the query the CLI runs) and the CLI's own wall time."""
    filters = {
        "agent": ledger_pb2.LedgerFilter(agent="agent-042"),
        "agent+blocked": ledger_pb2.LedgerFilter(agent="agent-042", blocked=True),
        "service+since_7d": ledger_pb2.LedgerFilter(service="svc07",
                                                   since_ms=time.time_ns() // 1_000_000 - 7 * 86_400_000),
        "agent+since_1h": ledger_pb2.LedgerFilter(agent="agent-042",
                                                 since_ms=time.time_ns() // 1_000_000 - 3_600_000),
        "credential": ledger_pb2.LedgerFilter(credential="cred-svc03"),
        "blocked": ledger_pb2.LedgerFilter(blocked=True),
        "none": ledger_pb2.LedgerFilter(),
    }
    rpc_ms: dict[str, float] = {}
    returned: dict[str, int] = {}
    with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        for name, flt in filters.items():
            samples = []
            for _ in range(repeats):
                started = time.perf_counter()
                reply = stub.ListEntries(ledger_pb2.ListEntriesRequest(filter=flt, limit=50), timeout=60)
                samples.append((time.perf_counter() - started) * 1000)
            rpc_ms[name] = statistics.median(samples)
            returned[name] = len(reply.records)
    show = ("ledger", "show", "--agent", "agent-042", "--limit", "50", "--json")
    result: dict[str, Any] = {"rpc_ms": rpc_ms, "rows_returned": returned,
                              "cli_show_agent_ms": _median_ms(daemon, show),
                              "cli_startup_ms": _median_ms(daemon, ("--version",))}
    if daemon.has_command("ledger", "stats"):
        result["cli_stats_ms"] = _median_ms(daemon, ("ledger", "stats"))
    if daemon.has_command("ledger", "export"):
        result["export"] = measure_export(daemon)
        result["export_one_agent"] = measure_export(daemon, "--agent", "agent-042")
    return result


def _median_ms(daemon: BenchDaemon, args: tuple[str, ...], repeats: int = 3) -> float:
    return statistics.median(daemon.ctl_seconds(*args) for _ in range(repeats)) * 1000


def measure_export(daemon: BenchDaemon, *filters: str) -> dict[str, Any]:
    """Export (everything, or what `filters` select) to /dev/null. The daemon's peak RSS growth and the
    CLI's peak RSS, compared between 1 M rows and one agent's ~1 %, show whether it streams."""
    reset_ok = reset_peak(daemon.pid)
    before = memory_kib(daemon.pid)
    started = time.perf_counter()
    with open(os.devnull, "wb") as sink:
        proc = subprocess.Popen([str(BIN / "aegisctl"), "ledger", "export", *filters], env=daemon.env(), stdout=sink,
                                stderr=sink)
        _, status, usage = os.wait4(proc.pid, 0)  # wait4: this child's own peak RSS
        proc.returncode = os.waitstatus_to_exitcode(status)
    after = memory_kib(daemon.pid)
    return {"exit": proc.returncode, "seconds": time.perf_counter() - started,
            "cli_max_rss_mib": usage.ru_maxrss / 1024,
            "daemon_peak_growth_mib": (after["VmHWM"] - (before["VmRSS"] if reset_ok else before["VmHWM"])) / 1024,
            "peak_reset": reset_ok}
