"""How the gate masks what an agent put in a path before the ledger records it: what is masked, and that the
work stays bounded whatever the agent sends."""

from __future__ import annotations

from typing import Any

from aegisd.gate.outbound_inspection import MASK_BISECT_BYTES, TOKENLESS_MASKING, masked
from aegisd.inspection import Inspector

KEY = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"


class CountingInspector:
    """An Inspector (key formats only) that counts its scans."""

    def __init__(self) -> None:
        self.inspector, self.scans = Inspector(()), 0

    def scan(self, data: bytes) -> Any:
        self.scans += 1
        return self.inspector.scan(data)


def test_a_short_path_keeps_its_clean_segments() -> None:
    counting = CountingInspector()
    assert masked(counting, f"/repos/{KEY}/issues") == "/repos/[REDACTED]/issues"  # type: ignore[arg-type]
    assert masked(counting, "/repos/acme/issues") == "/repos/acme/issues"  # type: ignore[arg-type]


def test_a_long_path_holding_a_finding_costs_one_scan() -> None:
    """Found by a cold review: bisecting a 64 KiB path of nested percent-encodings took half a second of the
    event loop per request, for any client, token or not. Past MASK_BISECT_BYTES one scan decides."""
    counting = CountingInspector()
    path = "/" + "%2525" * 2000 + "/" + "/".join([KEY] * 9)
    assert len(path) > MASK_BISECT_BYTES
    assert masked(counting, path) == "[REDACTED]"  # type: ignore[arg-type]
    assert counting.scans == 1
    clean = "/" + "a" * (MASK_BISECT_BYTES * 4)
    assert masked(counting, clean) == clean and counting.scans == 2  # type: ignore[arg-type]


def test_the_scans_masking_costs_are_bounded_for_an_agent_and_tighter_without_one() -> None:
    """Found by two reviews: a crafted 2 KiB path with many findings took ~18 ms of the event loop to mask (8
    rounds of bisection), and an agent's refusals may write 80 rows a second, anyone's tokenless ones 100. The
    scans are now bounded: 4 findings within 1,024 bytes for an agent, 2 within 256 bytes for no agent."""
    for bound, most in (({}, 4 * (2 * 10 + 2) + 1), (TOKENLESS_MASKING, 2 * (2 * 8 + 2) + 1)):
        counting = CountingInspector()
        limit = int(bound.get("bisect_bytes", MASK_BISECT_BYTES))
        path = ("/x" + f"/{KEY}/" + "%2525252541" * 3) * 40
        path = path[:limit]
        shown = masked(counting, path, **bound)  # type: ignore[arg-type]
        assert KEY not in shown and counting.scans <= most, (bound, counting.scans)
