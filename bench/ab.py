"""Does a change cost the gate anything? Two source trees' daemons side by side, alternating.

`python -m bench.ab REV [--rounds N] [--seconds S] [--connections C]`

This machine's speed drifts by a third within minutes, so two full `make bench` runs cannot tell a
change of a few per cent from the drift. Here the daemon built from REV (a git revision, checked out
in a temporary worktree) and the one from this tree are configured as `make bench` configures one,
share one nginx, and take turns at 20 connections (or `--connections N`) with small GETs (or, `--post`, the
benchmark's 64 KiB POSTs, which body inspection reads), the order flipped every round:
a difference that holds in most rounds is the change's, not the machine's. At one connection the p50
is the number to read (the one-connection target is added latency).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench.daemon import BenchDaemon, start_configured
from bench.procstat import cpu_seconds
from bench.services import start_nginx
from bench.wrk import POST_BYTES, Request, run_wrk

REPO = Path(__file__).resolve().parent.parent
CONNECTIONS = 20


class TreeDaemon(BenchDaemon):
    """A bench daemon whose `aegisd` package comes from another checkout (PYTHONPATH wins over the venv's)."""

    tree: Path | None = None

    def env(self) -> dict[str, str]:
        env = super().env()
        if self.tree is not None:
            env["PYTHONPATH"] = str(self.tree)
        return env


def _worktree(rev: str, root: Path, stack: ExitStack) -> Path:
    """REV checked out under `root`, removed (with git's record of it) when the stack closes."""
    path = root / "tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(path), rev], check=True,
                   capture_output=True, text=True)
    stack.callback(subprocess.run, ["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)],
                   check=False, capture_output=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    parser.add_argument("rev", help="The revision to compare this tree with (e.g. HEAD~3, a commit).")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    parser.add_argument("--post", action="store_true", help="64 KiB POSTs instead of small GETs.")
    parser.add_argument("--work-dir", type=Path, help="Keep the daemons' files here (default: a temp dir, removed).")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so every process started is stopped
    with ExitStack() as stack:
        root = args.work_dir
        if root is None:
            root = Path(tempfile.mkdtemp(prefix="aegis-ab-"))
            stack.callback(shutil.rmtree, root, True)
        tree = _worktree(args.rev, root, stack)
        nginx = start_nginx(root / "nginx")
        stack.callback(nginx.stop)
        gates: dict[str, tuple[BenchDaemon, str, str]] = {}
        for name, source in ((args.rev, tree), ("this tree", None)):
            daemon = TreeDaemon(root / ("rev" if source else "this"))
            daemon.tree = source
            setup = start_configured(stack, daemon, nginx.url)
            gates[name] = (daemon, daemon.gate_url + ("/bench/upload" if args.post else "/bench/small"), setup.token)

        def request(token: str) -> Request:
            return Request("POST", POST_BYTES, token) if args.post else Request(token=token)

        for _, url, token in gates.values():
            run_wrk(url, args.connections, 1, request(token))  # warm-up
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in gates}
        errors = 0
        order = list(gates)
        for round_no in range(args.rounds):
            cells = []
            for name in order:
                gate, url, token = gates[name]
                before = cpu_seconds(gate.pid)
                wrk = run_wrk(url, args.connections, args.seconds, request(token))
                per_request = (cpu_seconds(gate.pid) - before) / wrk.requests * 1e6 if wrk.requests else 0.0
                results[name].append((wrk.rps, per_request, wrk.p50_ms))
                errors += wrk.errors
                cells.append(f"{name} {wrk.rps:6.0f} req/s, {per_request:4.0f} us CPU/req, "
                             f"p50 {wrk.p50_ms:5.2f} ms, p99 {wrk.p99_ms:5.2f} ms")
            order.reverse()
            print(f"round {round_no + 1}: " + " | ".join(cells), flush=True)
        for name, values in results.items():
            rps, cpu, p50 = ([v[i] for v in values] for i in range(3))
            print(f"{name}: req/s median {statistics.median(rps):.0f} ({min(rps):.0f}-{max(rps):.0f}), "
                  f"CPU/req median {statistics.median(cpu):.0f} us ({min(cpu):.0f}-{max(cpu):.0f}), "
                  f"p50 median {statistics.median(p50):.3f} ms ({min(p50):.3f}-{max(p50):.3f})", flush=True)
        print(f"errors: {errors}", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
