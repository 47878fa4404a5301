"""What one vault change costs at scale: the write plus the gate's routing rebuild it triggers.

`python -m bench.vault_changes [--count N] [--repeat R]`

In-process, with the daemon's own classes on a temp data dir (no gRPC, no CLI): N credentials, N
agents and N grants, then the median of R of each change, timed from the call to the end of the
rebuild its listeners run. No target covers these; docs/performance.md records them because a
change must not cost time that grows with the whole vault when it touches one row (the eighth stop, in
docs/performance-history.md).
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from aegisd.agents import AgentRegistry
from aegisd.gate.routing import RoutingState
from aegisd.store import VaultStore
from aegisd.vault.credentials import Credential
from aegisd.vault.vault import Vault

PASSPHRASE = "bench vault changes " + "x" * 24


def _credential(name: str) -> Credential:
    return Credential(id="", name=name, service=name, domains=[f"api.{name}.example.com"])


def _median_ms(change: Callable[[int], object], repeat: int) -> float:
    times = []
    for i in range(repeat):
        started = time.perf_counter()
        change(i)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def measure(count: int, repeat: int, root: Path) -> dict[str, float]:
    """Milliseconds per change (median of `repeat`) with `count` of each already in the vault."""
    store = VaultStore(root / "vault.db")
    store.open()
    try:
        vault = Vault(store)
        vault.init(PASSPHRASE, False)
        agents = AgentRegistry(store, vault)
        for i in range(count):
            vault.add_credential(_credential(f"c{i}"), secrets.token_urlsafe(32))
            agents.add(f"a{i}")
            agents.grant(f"a{i}", f"c{i}")
        routing = RoutingState(vault, agents)
        vault.add_listener(routing.on_vault_event)
        routing.rebuild()
        timings = {
            "add_credential_ms": _median_ms(
                lambda i: vault.add_credential(_credential(f"x{i}"), secrets.token_urlsafe(32)), repeat),
            "update_credential_ms": _median_ms(
                lambda i: vault.update_credential(f"c{i}", {"rate_limit": "10/min"}), repeat),
            "add_agent_ms": _median_ms(lambda i: agents.add(f"y{i}"), repeat),
            "grant_ms": _median_ms(lambda i: agents.grant(f"y{i}", f"c{i}"), repeat),
        }
        table = routing.table
        if table is None or len(table.routes) != count + repeat or len(table.agents_by_hash) != count + repeat:
            raise RuntimeError("the routing table does not hold every credential and agent added")
        vault.lock()
        started = time.perf_counter()
        vault.unlock(passphrase=PASSPHRASE)
        timings["unlock_ms"] = (time.perf_counter() - started) * 1000
        return timings
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vault_changes", description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="aegis-vc-"))
    try:
        timings = measure(args.count, args.repeat, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.count} credentials, agents and grants; median of {args.repeat} each:")
    for name, ms in timings.items():
        print(f"  {name.removesuffix('_ms').replace('_', ' ')}: {ms:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
