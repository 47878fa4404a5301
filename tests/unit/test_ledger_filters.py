"""Ledger text filters: an empty value is a filter (rows with none), an absent one is not."""

from __future__ import annotations

import pytest

from aegisd.api.aegis.v1 import ledger_pb2 as pb
from aegisd.control.ledger_service import _filters, _matches
from aegisd.ledger.entry import LedgerRow
from aegisd.ledger.query import filter_clauses

ANONYMOUS = LedgerRow(id=1, kind="request", agent="", service="github", credential="gh", decision="denied",
                      reason="unauthenticated", status=401)
CLAUDE = LedgerRow(id=2, kind="request", agent="claude", service="github", credential="gh", decision="allowed",
                   status=200)
SYSTEM = LedgerRow(id=3, kind="system", detail="vault unlocked")


@pytest.mark.parametrize("column", ["agent", "service", "credential"])
def test_filter_clauses_take_an_empty_value_as_a_filter(column: str) -> None:
    assert filter_clauses(**{column: ""}) == ([f"{column} = ?"], [""])  # type: ignore[arg-type]
    assert filter_clauses(**{column: None}) == ([], [])  # type: ignore[arg-type]


def test_a_present_empty_agent_selects_the_rows_without_one() -> None:
    flt = pb.LedgerFilter(agent="")
    assert _filters(flt)["agent"] == ""
    assert [r.id for r in (ANONYMOUS, CLAUDE, SYSTEM) if _matches(r, flt)] == [1, 3]
    no_service = pb.LedgerFilter(service="")
    assert _filters(no_service)["service"] == ""
    assert [r.id for r in (ANONYMOUS, CLAUDE, SYSTEM) if _matches(r, no_service)] == [3]


def test_an_unset_filter_matches_everything_as_before() -> None:
    """What a client from before field presence sends for "" is no field at all: no filter, as it meant then."""
    old_client_bytes = b""  # proto3 without presence never writes an empty string
    flt = pb.LedgerFilter.FromString(old_client_bytes)
    assert {_filters(flt)[name] for name in ("agent", "service", "credential")} == {None}
    assert all(_matches(r, flt) for r in (ANONYMOUS, CLAUDE, SYSTEM))
    claude = pb.LedgerFilter(agent="claude")
    assert [r.id for r in (ANONYMOUS, CLAUDE, SYSTEM) if _matches(r, claude)] == [2]
