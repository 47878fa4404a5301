"""Orchestrates one benchmark run: upstreams, baseline, a configured aegisd, wrk load, and the report.

Configurations alternate within each (scenario, connections) cell, so drift on a shared machine hits
all three alike. See docs/performance.md for the method and how to read the output.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench import ledger_scale, profile, sse
from bench.daemon import BenchDaemon, Setup, start_configured
from bench.populate import populate
from bench.procstat import RssSampler, cpu_seconds, main_thread_cpu_seconds, memory_kib, reset_peak
from bench.report import RESULTS_DIR, ledger_summary, load_table, targets_table, write_json
from bench.services import Service, ServiceError, find_nginx, start_baseline, start_nginx, start_sse_upstream
from bench.targets import evaluate
from bench.wrk import POST_BYTES, Request, WrkError, WrkResult, run_wrk

CONFIGS = ("direct", "baseline", "gate")

MIB = 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description="Benchmark the Aegis gate (issue 7).")
    p.add_argument("--smoke", action="store_true", help="1 s of small-GET load per configuration; no targets.")
    p.add_argument("--duration", type=float, default=10.0, help="Seconds per wrk run [10].")
    p.add_argument("--warmup", type=float, default=3.0, help="Warm-up seconds per configuration [3].")
    p.add_argument("--rounds", type=int, default=1, help="Repeat every cell N times; medians are reported [1].")
    p.add_argument("--connections", default="1,20", help="Comma-separated wrk connection counts [1,20].")
    p.add_argument("--sse-rounds", type=int, default=200, help="Sequential SSE streams per path [200].")
    p.add_argument("--scale", type=int, default=1000, help="Credentials and agents for the scale run; 0 skips.")
    p.add_argument("--ledger-rows", type=int, default=1_000_000, help="Rows for the ledger run; 0 skips.")
    p.add_argument("--ledger-only", action="store_true", help="Run only the ledger scenario.")
    p.add_argument("--profile", type=int, default=0, metavar="S",
                   help="Also sample the gate with py-spy for S seconds under 20-connection load.")
    p.add_argument("--work-dir", type=Path, help="Keep all state and logs here (default: a temp dir, removed).")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="Where the JSON goes [bench/results].")
    args = p.parse_args(argv)
    if args.smoke:
        args.duration, args.warmup, args.rounds = 1.0, 0.0, 1
        args.sse_rounds, args.scale, args.ledger_rows, args.profile = 0, 0, 0, 0
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    missing = [tool for tool, found in (("wrk", shutil.which("wrk")), ("nginx", find_nginx())) if not found]
    if missing:
        print(f"bench: {' and '.join(missing)} not installed; `make bench` installs them "
              "(Debian: apt-get install wrk nginx-light)", file=sys.stderr)
        sys.exit(2)
    root = args.work_dir or Path(tempfile.mkdtemp(prefix="agb", dir="/tmp"))  # short: socket paths <= 107 bytes
    try:
        code = Bench(args, root).run()
    except (ServiceError, WrkError, OSError, RuntimeError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        code = 1
    finally:
        if args.work_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    sys.exit(code)


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.connections = [int(c) for c in args.connections.split(",") if c.strip()]
        self.results: dict[str, Any] = {"load": []}

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def run(self) -> int:
        self.results["machine"] = machine_info()
        self.results["settings"] = {k: str(v) for k, v in vars(self.args).items()}
        if not self.args.ledger_only:
            self.gate_phases()
        if self.args.ledger_rows:
            self.ledger()
        self.results["machine"]["loadavg_after"] = os.getloadavg()
        return self.finish()

    # -- phases ----------------------------------------------------------------------------------

    def gate_phases(self) -> None:
        """Everything that loads the gate: one nginx, baseline and configured aegisd for all of it."""
        with ExitStack() as stack:
            nginx = start_nginx(self.root / "nginx")
            stack.callback(nginx.stop)
            sse_up = start_sse_upstream(self.root) if self.args.sse_rounds else None
            if sse_up is not None:
                stack.callback(sse_up.stop)
            baseline = start_baseline(self.root, nginx.url)
            stack.callback(baseline.stop)
            daemon = BenchDaemon(self.root / "gate")
            setup = start_configured(stack, daemon, nginx.url, sse_up.url if sse_up else None)
            self.results["features"] = setup.features
            self.log(f"aegisd {daemon.gate_url}, nginx {nginx.url}, baseline {baseline.url}; "
                     f"features {setup.features}")
            self.main_loads(nginx, baseline, daemon, setup)
            if sse_up is not None:
                self.log(f"SSE: {self.args.sse_rounds} sequential streams per path")
                self.results["sse"] = asyncio.run(sse.compare(sse_up.port, daemon.gate_port, setup.token,
                                                              self.args.sse_rounds))
            elif self.args.sse_rounds:
                self.results["sse_skipped"] = "node is not installed"
            if self.args.profile:
                self.profile(daemon, setup)
            if self.args.scale:
                self.scale(stack, nginx, baseline, daemon, setup)

    def main_loads(self, nginx: Service, baseline: Service, daemon: BenchDaemon, setup: Setup) -> None:
        targets = {"direct": (nginx.url, None), "baseline": (baseline.url, baseline.pid),
                   "gate": (daemon.gate_url + "/bench", daemon.pid)}
        time.sleep(1.0)
        idle = memory_kib(daemon.pid)["VmRSS"]
        self.results["memory"] = {"idle_rss_mib": idle / MIB,
                                  "baseline_idle_rss_mib": memory_kib(baseline.pid)["VmRSS"] / MIB}
        scenarios = [("get", "/small", Request(token=setup.token))]
        if not self.args.smoke:
            scenarios.append(("post64k", "/upload", Request("POST", POST_BYTES, setup.token)))
        if self.args.warmup:
            self.log(f"warm-up: {self.args.warmup:g}s per configuration and scenario")
            for _, path, request in scenarios:
                for base, _pid in targets.values():
                    run_wrk(base + path, 20, self.args.warmup, request)
        peak_reset = reset_peak(daemon.pid)
        with RssSampler(daemon.pid) as sampler:
            for scenario, path, request in scenarios:
                for conns in self.connections:
                    self.cell(scenario, conns, {name: (base + path, pid) for name, (base, pid) in targets.items()},
                              request, daemon)
        hwm = memory_kib(daemon.pid)["VmHWM"]
        self.results["memory"].update({
            "peak_rss_mib": (hwm if peak_reset else sampler.peak_kib) / MIB,
            "peak_source": "VmHWM after clear_refs" if peak_reset else "VmRSS sampled every 50 ms",
            "sampled_peak_rss_mib": sampler.peak_kib / MIB,
            "baseline_peak_rss_mib": memory_kib(baseline.pid)["VmHWM"] / MIB,
        })

    def cell(self, scenario: str, conns: int, urls: Mapping[str, tuple[str, int | None]], request: Request,
             daemon: BenchDaemon, rounds: int | None = None, duration: float | None = None,
             requests: Mapping[str, Request] | None = None) -> None:
        """One (scenario, connections) cell: every configuration, alternating, `rounds` times (each
        configuration sends `request`, or its own from `requests`: another gate has its own agent token)."""
        requests = {name: (requests or {}).get(name, request) for name in urls}
        runs: dict[str, list[tuple[WrkResult, float | None]]] = {name: [] for name in urls}
        loop = GateLoopSample()
        order = list(urls)
        for _ in range(rounds or self.args.rounds):
            for name in order:
                url, pid = urls[name]
                if name == "gate":  # its metrics scrape stays outside the CPU and wall time measured
                    loop.begin(daemon)
                cpu_before = cpu_seconds(pid) if pid else 0.0
                result = run_wrk(url, conns, duration or self.args.duration, requests[name])
                cpu = cpu_seconds(pid) - cpu_before if pid else None
                if name == "gate":
                    loop.end(daemon)
                runs[name].append((result, cpu))
            order.reverse()  # whoever runs first in a round may meet a different machine than whoever runs last
        rows = {name: aggregate(scenario, conns, name, samples) for name, samples in runs.items()}
        if "gate" in rows:
            rows["gate"].update(loop.summary())
        for name, row in rows.items():
            if row["errors"]:
                row["sample_answer"] = sample_answer(urls[name][0], requests[name])
        for name, row in rows.items():
            if name != "direct" and "direct" in rows:
                row["vs_direct"] = row["rps"] / rows["direct"]["rps"] if rows["direct"]["rps"] else None
            if name == "gate" and "baseline" in rows:
                row["vs_baseline"] = row["rps"] / rows["baseline"]["rps"] if rows["baseline"]["rps"] else None
            self.results["load"].append(row)
            self.log(f"{scenario:<9} c={conns:<3} {name:<9} {row['rps']:>8.0f} req/s  p50 {row['p50_ms']:.2f} ms  "
                     f"p99 {row['p99_ms']:.2f} ms  errors {row['errors']}")

    def profile(self, daemon: BenchDaemon, setup: Setup) -> None:
        out = self.args.out / f"profile-{time.strftime('%Y%m%dT%H%M%S')}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        seconds = self.args.profile
        summary: dict[str, Any] = {}
        for scenario, path, request in (("get", "/small", Request(token=setup.token)),
                                        ("post64k", "/upload", Request("POST", POST_BYTES, setup.token))):
            target = out.with_name(out.stem + f"-{scenario}.txt")
            self.log(f"profiling the gate with py-spy for {seconds}s ({scenario}, 20 connections) -> {target}")
            try:
                spy = profile.record(daemon.pid, seconds, target)
            except FileNotFoundError as exc:
                self.results["profile"] = {"skipped": str(exc)}
                return
            time.sleep(0.5)
            result = run_wrk(daemon.gate_url + "/bench" + path, 20, seconds, request)
            _, err = spy.communicate(timeout=seconds + 60)
            if spy.returncode != 0 or not target.exists():
                summary[scenario] = {"error": err.decode(errors="replace")[-500:]}
                continue
            summary[scenario] = {"rps_while_sampled": result.rps, "file": str(target),
                                 **profile.summarise(target)}
        self.results["profile"] = summary

    def scale(self, stack: ExitStack, nginx: Service, baseline: Service, daemon: BenchDaemon, setup: Setup) -> None:
        """The same 20-connection GET right before and right after adding `count` of everything, so the
        comparison is between neighbouring runs rather than runs minutes apart; then the scaled gate and a
        second one configured alike with one of everything, side by side, alternating in short rounds.

        The side-by-side cell is the one this machine's drift cannot move: the two gates are the same
        program, so a fast or slow stretch speeds or slows both alike (the forwarder gains more than the
        gate from a fast stretch, so a ratio to it cannot correct for one).
        """
        count = self.args.scale
        request = Request(token=setup.token)
        urls = {"baseline": (baseline.url + "/small", baseline.pid),
                "gate": (daemon.gate_url + "/bench/small", daemon.pid)}
        one = BenchDaemon(self.root / "gate-1")
        one_setup = start_configured(stack, one, nginx.url)
        self.cell("get_1", 20, urls, request, daemon)
        self.log(f"adding {count} credentials, {count} agents and {count} grants over gRPC")
        timings = populate(daemon.socket, count)
        self.results["scale"] = {"count": count, **timings}
        self.log(f"populated in {sum(timings.values()):.1f}s: {timings}")
        if self.args.warmup:  # the routes just added are cold; a smoke run (no warm-up) judges nothing
            for url, _ in urls.values():
                run_wrk(url, 20, self.args.warmup, request)
        self.cell(f"get_{count}", 20, urls, request, daemon)
        self.results["memory"]["rss_after_scale_mib"] = memory_kib(daemon.pid)["VmRSS"] / MIB
        one_request = Request(token=one_setup.token)
        if self.args.warmup:
            run_wrk(one.gate_url + "/bench/small", 20, self.args.warmup, one_request)
        side_by_side = {"gate": (daemon.gate_url + "/bench/small", daemon.pid),
                        "gate-1": (one.gate_url + "/bench/small", one.pid)}
        self.cell(f"ab_{count}", 20, side_by_side, request, daemon, rounds=max(3, self.args.rounds),
                  duration=self.args.duration / 2, requests={"gate-1": one_request})

    def ledger(self) -> None:
        rows = self.args.ledger_rows
        daemon = BenchDaemon(self.root / "ledger")
        daemon.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log(f"filling a fresh ledger with {rows} rows through LedgerWriter")
        fill = asyncio.run(ledger_scale.fill(daemon.data_dir / "ledger.db", rows))
        self.log(f"ledger writer: {fill['rows_per_s']:.0f} rows/s")
        try:
            start_s = daemon.start()
            daemon.ctl("init", "--passphrase-stdin", input=secrets.token_urlsafe(24) + "\n")
            queries = ledger_scale.time_queries(daemon)
        finally:
            daemon.stop()
        self.results["ledger"] = {"fill": fill, "daemon_start_s": start_s, "queries": queries,
                                  "db_mib": (daemon.data_dir / "ledger.db").stat().st_size / 2**20}
        self.log(f"ledger queries: {queries}")

    # -- the end ---------------------------------------------------------------------------------

    def finish(self) -> int:
        print()
        print(load_table(self.results["load"]))
        if "sse" in self.results:
            s = self.results["sse"]
            print(f"\nSSE time to first event ({s['gate']['n']} streams each): direct p50 {s['direct']['p50_ms']:.2f} "
                  f"ms p99 {s['direct']['p99_ms']:.2f} ms; gate p50 {s['gate']['p50_ms']:.2f} ms "
                  f"p99 {s['gate']['p99_ms']:.2f} ms")
        memory = self.results.get("memory")
        if memory:
            print(f"\ndaemon RSS: idle {memory['idle_rss_mib']:.1f} MiB, peak under load "
                  f"{memory['peak_rss_mib']:.1f} MiB ({memory['peak_source']})")
            print(f"features: {self.results.get('features')}")
        if "ledger" in self.results:
            print("\n" + ledger_summary(self.results["ledger"]))
        for scenario, summary in self.results.get("profile", {}).items():
            if isinstance(summary, dict) and "own" in summary:
                print(f"\nprofile ({scenario}, {summary['samples']} samples), top own time:")
                print("\n".join(f"  {pct:5.1f}%  {name}" for name, pct in summary["own"][:12]))
        bad = [r for r in self.results["load"] if r["errors"] or not r["requests"]]
        if not self.args.smoke:
            targets = evaluate(self.results)
            self.results["targets"] = [t.as_dict() for t in targets]
            print("\ntargets (issue 7):")
            print(targets_table(targets))
        path = write_json(self.results, self.args.out)
        print(f"\nresults: {path}")
        if bad:
            print(f"bench: {len(bad)} runs had errors or no requests; their numbers are not valid", file=sys.stderr)
            return 1
        return 0


class GateLoopSample:
    """How busy the gate's event loop was and how many ledger rows shared a commit, over a cell's gate runs.

    A loop well under 100 % on CPU while wrk waits means requests sit elsewhere (a group commit, say),
    not that the gate is short of CPU.
    """

    def __init__(self) -> None:
        self.busy: list[float] = []
        self.commits = self.rows = 0.0
        self._counters = (0.0, 0.0)
        self._clocks: tuple[float, float | None] = (0.0, None)

    def begin(self, daemon: BenchDaemon) -> None:
        self._counters = daemon.ledger_counters()
        self._clocks = (time.perf_counter(), main_thread_cpu_seconds(daemon.pid))

    def end(self, daemon: BenchDaemon) -> None:
        wall, cpu = self._clocks
        cpu_now, wall_now = main_thread_cpu_seconds(daemon.pid), time.perf_counter()
        if cpu is not None and cpu_now is not None:
            self.busy.append((cpu_now - cpu) / (wall_now - wall))
        commits, rows = daemon.ledger_counters()
        self.commits += commits - self._counters[0]
        self.rows += rows - self._counters[1]

    def summary(self) -> dict[str, float | None]:
        return {"loop_busy": statistics.median(self.busy) if self.busy else None,
                "rows_per_commit": self.rows / self.commits if self.commits else None}


def aggregate(scenario: str, conns: int, config: str, samples: list[tuple[WrkResult, float | None]]) -> dict[str, Any]:
    """Median over rounds of each metric; CPU per request from the summed CPU and requests."""
    def med(get: Callable[[WrkResult], float]) -> float:
        return statistics.median(get(r) for r, _ in samples)

    requests = sum(r.requests for r, _ in samples)
    cpu = [c for _, c in samples if c is not None]
    return {
        "scenario": scenario, "connections": conns, "config": config, "rounds": len(samples),
        "rps": med(lambda r: r.rps), "p50_ms": med(lambda r: r.p50_ms), "p90_ms": med(lambda r: r.p90_ms),
        "p99_ms": med(lambda r: r.p99_ms), "max_ms": max(r.max_ms for r, _ in samples),
        "requests": requests, "errors": sum(r.errors for r, _ in samples),
        "cpu_us_per_req": sum(cpu) / requests * 1e6 if cpu and requests else None,
    }


def sample_answer(url: str, request: Request) -> str:
    """One request like wrk's, to show what a failing configuration answers (status and body start)."""
    parts = urlsplit(url)
    headers = {"X-Aegis-Agent": request.token} if request.token else {}
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    try:
        conn.request(request.method, parts.path, body=b"x" * request.body_bytes or None, headers=headers)
        reply = conn.getresponse()
        return f"{reply.status} {reply.read(300).decode(errors='replace')}"
    except OSError as exc:
        return f"no answer: {exc}"
    finally:
        conn.close()


def machine_info() -> dict[str, Any]:
    def version(*cmd: str) -> str:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "not installed"
        return (proc.stdout + proc.stderr).strip().splitlines()[0] if (proc.stdout + proc.stderr).strip() else ""

    repo = Path(__file__).resolve().parent.parent
    return {
        "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(), "platform": platform.platform(),
        "python": platform.python_version(), "wrk": version("wrk", "-v"),
        "nginx": version(find_nginx() or "nginx", "-v"), "node": version("node", "--version"),
        "commit": version("git", "-C", str(repo), "rev-parse", "--short", "HEAD"),
        "tree_dirty": bool(subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True,
                                          text=True, check=False).stdout.strip()),
    }
