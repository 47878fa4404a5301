"""Issue 7's targets, checked against one run's results and printed PASS/FAIL/SKIP.

These are judgements on a measurement, never test assertions: a loaded machine moves them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    name: str
    status: str  # PASS | FAIL | SKIP
    measured: str
    limit: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _check(name: str, value: float | None, limit: float, unit: str, *, at_most: bool, fmt: str = "{:.2f}",
           skip_reason: str = "not measured") -> Target:
    if value is None:
        return Target(name, "SKIP", skip_reason, "")
    ok = value <= limit if at_most else value >= limit
    return Target(name, "PASS" if ok else "FAIL", fmt.format(value) + unit,
                  ("<= " if at_most else ">= ") + fmt.format(limit) + unit)


def _cell(load: list[dict[str, Any]], scenario: str, connections: int, config: str) -> dict[str, Any] | None:
    return next((r for r in load if r["scenario"] == scenario and r["connections"] == connections
                 and r["config"] == config), None)


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str = "rps") -> float | None:
    return a[key] / b[key] if a and b and b[key] else None


def evaluate(results: dict[str, Any]) -> list[Target]:
    load = results.get("load", [])
    gate20 = _cell(load, "get", 20, "gate")
    base20 = _cell(load, "get", 20, "baseline")
    gate1, direct1 = _cell(load, "get", 1, "gate"), _cell(load, "get", 1, "direct")
    out = [
        _check("GET 20c: gate req/s >= 0.9 x baseline", _ratio(gate20, base20), 0.9, "x", at_most=False),
        _check("GET 20c: gate req/s >= 4000", gate20["rps"] if gate20 else None, 4000, "", at_most=False,
               fmt="{:.0f}"),
        _check("GET 20c: gate p99 <= 10 ms", gate20["p99_ms"] if gate20 else None, 10, " ms", at_most=True),
        _check("GET 1c: gate p50 - direct p50 <= 0.5 ms",
               gate1["p50_ms"] - direct1["p50_ms"] if gate1 and direct1 else None, 0.5, " ms", at_most=True,
               fmt="{:.3f}"),
        _check("POST 64KiB 20c: gate req/s >= 0.9 x baseline (extra: same bar, bigger body)",
               _ratio(_cell(load, "post64k", 20, "gate"), _cell(load, "post64k", 20, "baseline")), 0.9, "x",
               at_most=False),
    ]
    sse = results.get("sse")
    out.append(_check("SSE first event: gate p50 <= direct p50 + 5 ms",
                      sse["gate"]["p50_ms"] - sse["direct"]["p50_ms"] if sse else None, 5, " ms added",
                      at_most=True, skip_reason=results.get("sse_skipped", "not measured")))
    scale = results.get("scale")
    count = scale["count"] if scale else 1000
    before, after = _cell(load, "get_1", 20, "gate"), _cell(load, f"get_{count}", 20, "gate")
    out.append(_check(f"{count} credentials+agents: gate req/s within 5% of 1 (runs before/after adding)",
                      _ratio(after, before), 0.95, "x", at_most=False, fmt="{:.4f}"))
    out.append(_check(f"{count} credentials+agents: gate CPU per request within 5% of 1 (less load-sensitive)",
                      _ratio(after, before, "cpu_us_per_req"), 1.05, "x", at_most=True, fmt="{:.4f}"))
    # The same program with one of everything, alternating with the scaled gate in one cell: the machine's
    # drift moves both alike, which the forwarder (in the before/after cells) does not.
    scaled, one = _cell(load, f"ab_{count}", 20, "gate"), _cell(load, f"ab_{count}", 20, "gate-1")
    out.append(_check(f"{count} credentials+agents: gate req/s within 5% of a one-credential gate (side by side)",
                      _ratio(scaled, one), 0.95, "x", at_most=False, fmt="{:.4f}"))
    ledger = results.get("ledger")
    out.append(_check("ledger writer >= 20000 rows/s", ledger["fill"]["rows_per_s"] if ledger else None, 20000,
                      " rows/s", at_most=False, fmt="{:.0f}"))
    worst = max(ledger["queries"]["rpc_ms"].values()) if ledger else None
    rows = f"{ledger['fill']['rows']:,} rows" if ledger else "1M rows"
    out.append(_check(f"ledger show --limit 50 (slowest of 7 filters, {rows}) <= 100 ms", worst, 100, " ms",
                      at_most=True, fmt="{:.1f}"))
    export = ledger["queries"].get("export") if ledger else None
    small = ledger["queries"].get("export_one_agent") if ledger else None
    no_export = "`aegisctl ledger export` does not exist yet" if ledger else "not measured"
    out.append(_check(f"ledger export of {rows}: daemon peak RSS growth (streams)",
                      export["daemon_peak_growth_mib"] if export else None, 32, " MiB", at_most=True,
                      fmt="{:.1f}", skip_reason=no_export))
    out.append(_check("ledger export: CLI peak RSS, all rows minus 1% of them (constant memory)",
                      export["cli_max_rss_mib"] - small["cli_max_rss_mib"] if export and small else None, 16, " MiB",
                      at_most=True, fmt="{:.1f}", skip_reason=no_export))
    memory = results.get("memory", {})
    out.append(_check("daemon RSS idle <= 80 MB", _mb(memory.get("idle_rss_mib")), 80, " MB", at_most=True,
                      fmt="{:.1f}"))
    out.append(_check("daemon peak RSS under 20c load <= 150 MB", _mb(memory.get("peak_rss_mib")), 150, " MB",
                      at_most=True, fmt="{:.1f}"))
    return out


def _mb(mib: float | None) -> float | None:
    """The issue's targets are in MB (10^6 bytes); /proc reports KiB, kept as MiB in the results."""
    return mib * 1024 * 1024 / 1e6 if mib is not None else None
