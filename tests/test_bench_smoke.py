"""The benchmark harness still runs end to end: one second of small-GET load per configuration.

No timing is asserted (that is `make bench`'s job, printed as PASS/FAIL); this only proves that
nginx, the baseline forwarder and a real aegisd start, that every request through each of them
succeeded, that the JSON report is written, and that nothing leaked the credential on the way.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bench.services import find_nginx
from tests.harness import Aegis

REPO = Path(__file__).resolve().parent.parent
# Above every run_bench timeout below, so that one fires first: it kills the run's whole process group and
# says which run hung, where pytest-timeout would leave nginx and the daemons behind.
pytestmark = pytest.mark.timeout(300)


def run_bench(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """`python -m ARGS` in its own session: on a timeout the whole group goes (nginx, the baseline and the
    daemons it started included), not just the harness, and the test fails saying so."""
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"python -m {args[0]} ran past {timeout:g}s: {out[-2000:]}{err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk; make bench does)")
@pytest.mark.skipif(find_nginx() is None, reason="nginx is not installed (apt-get install nginx-light)")
def test_bench_smoke_runs_every_configuration() -> None:
    secret = "sk-smoke-" + os.urandom(12).hex()
    root = Path(tempfile.mkdtemp(prefix="agb", dir="/tmp"))  # short: the control socket lives below it
    try:
        env = {**os.environ, "AEGIS_BENCH_SECRET": secret}
        proc = run_bench(["bench", "--smoke", "--work-dir", str(root / "work"), "--out", str(root / "out")], env,
                         timeout=90)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        reports = list((root / "out").glob("*.json"))
        assert len(reports) == 1, proc.stdout
        results = json.loads(reports[0].read_text())
        cells = {(r["config"], r["connections"]): r for r in results["load"]}
        assert set(cells) == {(c, n) for c in ("direct", "baseline", "gate") for n in (1, 20)}
        for row in cells.values():
            assert row["requests"] > 0 and row["errors"] == 0, row  # every answer was a 2xx from nginx
        assert cells[("gate", 20)]["cpu_us_per_req"] > 0
        for conns in (1, 20):  # the gate's loop ran, and every request's ledger row was in some commit
            assert 0 < cells[("gate", conns)]["loop_busy"] <= 1.05
            assert cells[("gate", conns)]["rows_per_commit"] >= 1
        assert "rows per commit" in proc.stdout
        assert results["memory"]["idle_rss_mib"] > 0
        assert "targets" not in results  # smoke runs judge nothing

        gate = Aegis(root / "work" / "gate", outputs=[proc.stdout, proc.stderr])
        report = reports[0].read_text()
        for text in (proc.stdout, proc.stderr, report, gate.log()):
            assert "aegis_" not in text  # no agent token (they all start so) left the harness
        gate.assert_no_leaks([secret], extra_text=[report])
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk; make bench does)")
@pytest.mark.skipif(find_nginx() is None, reason="nginx is not installed (apt-get install nginx-light)")
def test_bench_scale_run_compares_side_by_side() -> None:
    """The scale phase still runs (at 3 instead of 1,000): before and after populating, then the scaled gate
    and a one-credential gate side by side, each with its own token, all requests answered, and the
    side-by-side target judged from those two rows; no timing is judged here."""
    secret = "sk-smoke-" + os.urandom(12).hex()
    root = Path(tempfile.mkdtemp(prefix="ags", dir="/tmp"))  # short: the control sockets live below it
    try:
        proc = run_bench(["bench", "--connections", "20", "--duration", "1", "--warmup", "0", "--sse-rounds", "0",
                          "--scale", "3", "--ledger-rows", "0", "--work-dir", str(root / "work"),
                          "--out", str(root / "out")], {**os.environ, "AEGIS_BENCH_SECRET": secret}, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        results = json.loads(next((root / "out").glob("*.json")).read_text())
        cells = {(r["scenario"], r["config"]): r for r in results["load"]}
        for key in (("get_1", "gate"), ("get_3", "gate"), ("ab_3", "gate"), ("ab_3", "gate-1")):
            assert cells[key]["requests"] > 0 and cells[key]["errors"] == 0, cells.get(key)
        assert cells[("ab_3", "gate")]["rounds"] == 3 == cells[("ab_3", "gate-1")]["rounds"]
        target = next(t for t in results["targets"] if "one-credential gate (side by side)" in t["name"])
        ratio = cells[("ab_3", "gate")]["rps"] / cells[("ab_3", "gate-1")]["rps"]
        assert target["status"] in ("PASS", "FAIL") and target["measured"] == f"{ratio:.4f}x", target
        assert "GET, 3 vs 1, A/B" in proc.stdout
        for gate in ("gate", "gate-1"):
            aegis = Aegis(root / "work" / gate, outputs=[proc.stdout, proc.stderr])
            assert "aegisd stopped" in aegis.log() and "aegis_" not in proc.stdout + proc.stderr + aegis.log()
            aegis.assert_no_leaks([secret])
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk; make bench does)")
@pytest.mark.skipif(find_nginx() is None, reason="nginx is not installed (apt-get install nginx-light)")
def test_two_process_bound_runs() -> None:
    """bench.two_processes (the worker design's upper bound) still runs: every request of every configuration
    succeeded and both ratios are printed; no timing is judged."""
    secret = "sk-smoke-" + os.urandom(12).hex()
    root = Path(tempfile.mkdtemp(prefix="agp", dir="/tmp"))  # short: the control sockets live below it
    try:
        proc = run_bench(["bench.two_processes", "--rounds", "1", "--seconds", "1", "--work-dir", str(root)],
                         {**os.environ, "AEGIS_BENCH_SECRET": secret}, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "errors: 0" in proc.stdout
        for name in ("one gate / baseline", "two gates / baseline"):
            assert f"{name}: median" in proc.stdout, proc.stdout
        for gate in ("gate0", "gate1"):
            aegis = Aegis(root / gate, outputs=[proc.stdout, proc.stderr])
            assert "aegisd stopped" in aegis.log() and "aegis_" not in proc.stdout + proc.stderr + aegis.log()
            aegis.assert_no_leaks([secret])
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_vault_change_costs_run() -> None:
    """bench.vault_changes still runs: it checks itself that the routing table holds everything it added."""
    proc = run_bench(["bench.vault_changes", "--count", "20", "--repeat", "2"], dict(os.environ), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for change in ("add credential", "update credential", "add agent", "grant", "unlock"):
        assert f"  {change}: " in proc.stdout, proc.stdout


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk; make bench does)")
@pytest.mark.skipif(find_nginx() is None, reason="nginx is not installed (apt-get install nginx-light)")
def test_ab_of_two_trees_runs() -> None:
    """bench.ab (this tree against a revision) still runs, with its 64 KiB POSTs (the small GETs differ only in
    the request wrk sends): both daemons answered every request, both are summarised, and the revision's worktree
    is gone afterwards; no timing is judged."""
    secret = "sk-smoke-" + os.urandom(12).hex()
    root = Path(tempfile.mkdtemp(prefix="aga", dir="/tmp"))  # short: the control sockets live below it
    try:
        proc = run_bench(["bench.ab", "HEAD", "--post", "--rounds", "1", "--seconds", "1", "--connections", "1",
                          "--work-dir", str(root)],
                         {**os.environ, "AEGIS_BENCH_SECRET": secret}, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "errors: 0" in proc.stdout and "HEAD: req/s median" in proc.stdout, proc.stdout
        assert "this tree: req/s median" in proc.stdout and "p50 median" in proc.stdout, proc.stdout
        assert not (root / "tree").exists()
        for gate in ("rev", "this"):
            aegis = Aegis(root / gate, outputs=[proc.stdout, proc.stderr])
            assert "aegisd stopped" in aegis.log()
            aegis.assert_no_leaks([secret])
    finally:
        shutil.rmtree(root, ignore_errors=True)
