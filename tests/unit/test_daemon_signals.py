"""aegisd's signals from the first moment of `Daemon.run`, before the gate and the reload handler are up."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from aegisd.config import load_config
from aegisd.daemon import Daemon


def test_a_stop_or_hangup_during_start_up_neither_kills_nor_tracebacks(tmp_path: Path) -> None:
    """From an operations review: a SIGHUP before the reload handler was in place killed aegisd (its default
    action), and Ctrl-C was asyncio's KeyboardInterrupt traceback. Now a stop is remembered and a hangup ignored."""
    daemon = Daemon(load_config({}, {"AEGIS_DATA_DIR": str(tmp_path)}), {})
    before = signal.getsignal(signal.SIGHUP)

    async def start_up() -> None:
        daemon._install_stop_signals()
        try:
            os.kill(os.getpid(), signal.SIGHUP)  # would end this test process, were it not ignored
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.wait_for(daemon._stop.wait(), 5)
        finally:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    try:
        asyncio.run(start_up())
    finally:
        signal.signal(signal.SIGHUP, before)
