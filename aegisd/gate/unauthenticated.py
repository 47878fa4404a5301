"""How many refusals of unauthenticated requests get a ledger row each.

Anyone who can reach the gate can send requests without a token, and each refusal writes a row: an
unbounded stream of them would fill the disk, and a full disk stops every agent (503
ledger_unavailable). Past a steady rate, such refusals are counted instead, and one system row
records how many went unrecorded one by one. Requests of authenticated agents are never counted here:
their own rate limits bound them, and each keeps its row.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aegisd.ledger import LedgerEntry, LedgerError

log = logging.getLogger("aegisd.gate")

RATE_PER_SECOND = 100.0  # rows a second for refusals of unauthenticated requests, once the burst is spent
BURST = 500
SUMMARY_AFTER_SECONDS = 1.0  # the summary row follows the first refusal left out by this long


class UnauthenticatedRows:
    """A token bucket over the rows of refusals that name no agent, and the summary of those left out."""

    def __init__(self, record: Callable[[LedgerEntry], None], rate: float = RATE_PER_SECOND,
                 burst: int = BURST) -> None:
        self._record = record  # LedgerWriter.append_nowait: the summary is a system row nobody waits on
        self._rate, self._burst = rate, float(burst)
        self._tokens, self._at = float(burst), time.monotonic()
        self._left_out = 0
        self._since = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def admit(self) -> bool:
        """Whether this refusal gets its row; if not, it is counted for the next summary row."""
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        if not self._left_out:
            self._since = now
            self._timer = asyncio.get_running_loop().call_later(SUMMARY_AFTER_SECONDS, self._summarise)
        self._left_out += 1
        return False

    def flush(self) -> None:
        """Write the pending summary now rather than when its timer fires: the gate is stopping, and the
        ledger closes before the timer would."""
        if self._timer is not None:
            self._timer.cancel()
        if self._left_out:
            self._summarise()

    def _summarise(self) -> None:
        self._timer = None
        count, seconds = self._left_out, time.monotonic() - self._since
        self._left_out = 0
        detail = (f"{count} refusals of requests without a valid agent token in {seconds:.1f} s were not recorded "
                  f"one by one (more than {self._rate:g} a second after a burst of {self._burst:g})")
        log.warning("%s", detail)
        try:
            self._record(LedgerEntry.system(detail, reason="unauthenticated_flood"))
        except LedgerError as exc:  # stopping: the log line above is the record
            log.error("the summary of unrecorded refusals could not be queued: %s", exc)
