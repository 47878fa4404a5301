"""What would two gate processes give on this machine? An upper bound for the worker design.

`python -m bench.two_processes [--rounds N] [--seconds S]`

docs/performance.md proposes `SO_REUSEPORT` worker processes to meet the 0.9 x baseline target. This
measures the most such a design could give before building it: two fully independent aegisd (each
its own data dir, ledger and limits, so nothing is shared that the real design would have to share)
each take half of the 20 connections, against one aegisd taking all 20 and the baseline forwarder
taking all 20. Every configuration is driven by the same two wrk processes of 10 connections each,
alternating, so load generation costs the same for all three.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import sys
import tempfile
import threading
from contextlib import ExitStack
from pathlib import Path

from bench.daemon import BenchDaemon, start_configured
from bench.procstat import cpu_seconds
from bench.services import start_baseline, start_nginx
from bench.wrk import Request, WrkResult, run_wrk

Target = tuple[str, str]  # (url, agent token)


def _drive(targets: tuple[Target, Target], seconds: float) -> list[WrkResult]:
    """Two wrk processes of 10 connections each, at the same time, one per target."""
    results: list[WrkResult | None] = [None, None]

    def run(i: int) -> None:
        url, token = targets[i]
        results[i] = run_wrk(url, 10, seconds, Request(token=token))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if any(r is None for r in results):
        raise RuntimeError("a wrk run failed; see its error above")
    return [r for r in results if r is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.two_processes", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--work-dir", type=Path, help="Keep the daemons' files here (default: a temp dir, removed).")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so every process started is stopped
    with ExitStack() as stack:
        root = args.work_dir
        if root is None:
            root = Path(tempfile.mkdtemp(prefix="aegis-2p-"))
            stack.callback(shutil.rmtree, root, True)
        nginx = start_nginx(root / "nginx")
        stack.callback(nginx.stop)
        baseline = start_baseline(root, nginx.url)
        stack.callback(baseline.stop)
        gates = []
        for i in range(2):
            daemon = BenchDaemon(root / f"gate{i}")
            setup = start_configured(stack, daemon, nginx.url)
            gates.append((daemon, (daemon.gate_url + "/bench/small", setup.token)))
        configs: dict[str, tuple[tuple[Target, Target], list[int], list[BenchDaemon]]] = {
            "baseline": (((baseline.url + "/small", ""),) * 2, [baseline.pid], []),
            "one gate": ((gates[0][1],) * 2, [gates[0][0].pid], [gates[0][0]]),
            "two gates": ((gates[0][1], gates[1][1]), [gates[0][0].pid, gates[1][0].pid], [gates[0][0], gates[1][0]]),
        }
        for targets, _, _ in configs.values():
            _drive(targets, 1)  # warm-up
        ratios: dict[str, list[float]] = {"one gate": [], "two gates": []}
        errors = 0
        order = list(configs)
        for round_no in range(args.rounds):
            rps: dict[str, float] = {}
            cells = {}
            for name in order:  # rotated every round, so drift within a round favours none of them
                targets, pids, daemons = configs[name]
                before = sum(cpu_seconds(pid) for pid in pids)
                ledger_before = [d.ledger_counters() for d in daemons]
                results = _drive(targets, args.seconds)
                cpu = sum(cpu_seconds(pid) for pid in pids) - before
                commits = sum(d.ledger_counters()[0] - b[0] for d, b in zip(daemons, ledger_before, strict=True))
                rows = sum(d.ledger_counters()[1] - b[1] for d, b in zip(daemons, ledger_before, strict=True))
                rps[name] = sum(r.rps for r in results)
                errors += sum(r.errors for r in results)
                requests = sum(r.requests for r in results)
                per_commit = f", {rows / commits:4.1f} rows/commit" if commits else ""
                cells[name] = (f"{name} {rps[name]:6.0f} req/s, p99 {max(r.p99_ms for r in results):5.2f} ms, "
                               f"{cpu / requests * 1e6 if requests else 0:4.0f} us CPU/req{per_commit}")
            order = order[1:] + order[:1]
            for name in ratios:
                ratios[name].append(rps[name] / rps["baseline"] if rps["baseline"] else 0.0)
            print(f"round {round_no + 1}: " + " | ".join(cells[name] for name in configs), flush=True)
        for name, values in ratios.items():
            print(f"{name} / baseline: median {statistics.median(values):.2f}x, "
                  f"range {min(values):.2f}-{max(values):.2f}x", flush=True)
        print(f"errors: {errors}", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
