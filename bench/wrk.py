"""Run wrk with bench/wrk_report.lua and parse the JSON line its done() hook prints."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).with_name("wrk_report.lua")
MARKER = "AEGIS_BENCH_RESULT "
POST_BYTES = 64 * 1024  # the benchmark's POST body: inspected, not forwarded as a stream


class WrkError(Exception):
    """wrk failed or printed no result line; the message carries its output."""


@dataclass(frozen=True)
class Request:
    """What every connection sends, the same bytes to each configuration."""

    method: str = "GET"
    body_bytes: int = 0
    token: str = ""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int  # socket errors, timeouts and non-2xx/3xx answers

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def run_wrk(url: str, connections: int, seconds: float, request: Request, threads: int = 1) -> WrkResult:
    """One wrk run; one thread by default, so wrk takes as little of the 2 cores as possible."""
    env = {**os.environ, "AEGIS_BENCH_TOKEN": request.token, "AEGIS_BENCH_METHOD": request.method,
           "AEGIS_BENCH_BODY_BYTES": str(request.body_bytes)}
    duration = f"{max(1, round(seconds))}s"
    args = ["wrk", "-t", str(min(threads, connections)), "-c", str(connections), "-d", duration,
            "--timeout", "5s", "-s", str(SCRIPT), url]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=seconds + 60, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)), None)
    if proc.returncode != 0 or line is None:
        raise WrkError(f"wrk exited {proc.returncode}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    data = json.loads(line[len(MARKER):])
    errors = sum(int(v) for v in data["errors"].values())
    return WrkResult(requests=int(data["requests"]), seconds=data["duration_us"] / 1e6,
                     p50_ms=data["p50_us"] / 1000, p90_ms=data["p90_us"] / 1000, p99_ms=data["p99_us"] / 1000,
                     max_ms=data["max_us"] / 1000, errors=errors)
