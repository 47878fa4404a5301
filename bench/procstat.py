"""CPU time and memory of a process from /proc, so the numbers cover every thread of the daemon."""

from __future__ import annotations

import os
import threading
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by all threads of `pid`."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def main_thread_cpu_seconds(pid: int) -> float | None:
    """On-CPU seconds of the process's main thread (schedstat counts nanoseconds); None without schedstat.

    aegisd runs its event loop on the main thread (aegisd.cli), so its share of the wall time says
    whether the loop is saturated or waits (for the ledger, say).
    """
    try:
        return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[0]) / 1e9
    except OSError:
        return None


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) in KiB."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0])
    return found


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0; needs the right to write clear_refs).

    The vault's Argon2id KDF touches 64 MiB at init/unlock; without a reset that would be the "peak".
    """
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class RssSampler:
    """Samples VmRSS every `interval` seconds in a thread: a peak that needs no clear_refs."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_kib = max(self.peak_kib, memory_kib(self.pid).get("VmRSS", 0))
            except OSError:
                return
            self._stop.wait(self.interval)
