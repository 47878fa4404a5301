"""The run's table on stdout and its JSON in bench/results/<timestamp>.json (gitignored)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bench.targets import Target

RESULTS_DIR = Path(__file__).with_name("results")
SCENARIO_NAMES = {"get": "small GET", "post64k": "64 KiB POST", "get_1": "GET, before scale-up"}


def load_table(load: list[dict[str, Any]]) -> str:
    head = (f"{'scenario':<24}{'conns':>6}  {'config':<9}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
            f"{'errors':>8}{'CPU us/req':>12}{'x base':>8}{'x direct':>9}")
    lines = [head, "-" * len(head)]
    for r in load:
        cpu = f"{r['cpu_us_per_req']:.0f}" if r.get("cpu_us_per_req") is not None else "-"
        vs_base = f"{r['vs_baseline']:.2f}" if r.get("vs_baseline") is not None else "-"
        vs_direct = f"{r['vs_direct']:.2f}" if r.get("vs_direct") is not None else "-"
        name = SCENARIO_NAMES.get(r["scenario"]) or scale_name(r["scenario"])
        lines.append(f"{name:<24}{r['connections']:>6}  "
                     f"{r['config']:<9}{r['rps']:>9.0f}{r['p50_ms']:>9.2f}{r['p90_ms']:>9.2f}{r['p99_ms']:>9.2f}"
                     f"{r['errors']:>8}{cpu:>12}{vs_base:>8}{vs_direct:>9}")
    lines += [f"  {r['config']} {r['scenario']} c={r['connections']} answered: {r['sample_answer']}"
              for r in load if r.get("sample_answer")]
    gate = [r for r in load if "rows_per_commit" in r]
    if gate:
        lines.append("gate event loop on CPU (share of wall time) and ledger rows per group commit:")
        lines += [f"  {r['scenario']} c={r['connections']}: loop {_maybe(r['loop_busy'], '.0%')}, "
                  f"{_maybe(r['rows_per_commit'], '.1f')} rows per commit" for r in gate]
    return "\n".join(lines)


def scale_name(scenario: str) -> str:
    """`get_1000` (the scaled gate, before and after) or `ab_1000` (it and a one-credential gate side by side)."""
    kind, _, count = scenario.partition("_")
    return f"GET, {count} vs 1, A/B" if kind == "ab" else f"GET, {count} creds+agents"


def _maybe(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def ledger_summary(ledger: dict[str, Any]) -> str:
    fill, q = ledger["fill"], ledger["queries"]
    lines = [f"ledger: {fill['rows']:,} rows written at {fill['rows_per_s']:,.0f} rows/s (append + commit); "
             f"{ledger['db_mib']:.0f} MiB; daemon ready in {ledger['daemon_start_s']:.2f} s",
             "  ListEntries --limit 50: " + ", ".join(f"{k} {v:.1f} ms" for k, v in q["rpc_ms"].items()),
             f"  aegisctl ledger show --agent: {q['cli_show_agent_ms']:.0f} ms wall "
             f"(aegisctl --version alone: {q['cli_startup_ms']:.0f} ms)"]
    if "cli_stats_ms" in q:
        lines.append(f"  aegisctl ledger stats: {q['cli_stats_ms']:.0f} ms wall")
    for key in ("export", "export_one_agent"):
        if key in q:
            e = q[key]
            lines.append(f"  {key.replace('_', ' ')}: {e['seconds']:.1f} s, exit {e['exit']}, CLI peak RSS "
                         f"{e['cli_max_rss_mib']:.1f} MiB, daemon peak growth {e['daemon_peak_growth_mib']:.1f} MiB")
    return "\n".join(lines)


def targets_table(targets: list[Target]) -> str:
    width = max((len(t.name) for t in targets), default=10)
    return "\n".join(f"{t.status:<5} {t.name:<{width}}  {t.measured:>16}  {t.limit}" for t in targets)


def write_json(results: dict[str, Any], directory: Path = RESULTS_DIR) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path
