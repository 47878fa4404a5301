"""The ledger row: what one audit record holds, and its JSON shape.

Rows never carry secrets; the caller guarantees that, and this package never logs row contents.
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

KINDS = ("request", "system")
DECISIONS = ("allowed", "denied")
_INT_MAX = 2**63 - 1  # SQLite INTEGER range; a larger value would fail a whole group commit
_TIME_MS_MAX = 253402300799999  # 9999-12-31T23:59:59.999Z, the last instant ISO 8601 can show
# The most characters a text field keeps. An agent, even an unauthenticated one, chooses the path, the
# service segment and the target host, and the gate takes request heads of up to 64 KiB: uncapped, a few
# hundred such rows make one `ledger show` or `export` page larger than a gRPC message, and a flood of
# them grows the file 30 times faster. Past the cap a field keeps its start and says how long it was.
MAX_TEXT_CHARS = 2048
MAX_DETAIL_CHARS = 8192  # the daemon's own text: a policy reload that lists many failing files


def now_ms() -> int:
    """Wall-clock UTC time in epoch milliseconds, the ledger's time unit."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerEntry:
    """One audit record as the gate or the daemon hands it to the writer.

    The field order is part of the chain format (chain.canonical): changing it needs a new chain version.
    """

    kind: str
    time_ms: int = field(default_factory=now_ms)
    request_id: str = ""
    agent: str = ""
    credential: str = ""
    service: str = ""
    method: str = ""
    path: str = ""
    target_host: str = ""
    decision: str = ""
    reason: str = ""
    status: int = 0
    duration_ms: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    flags: str = ""
    detail: str = ""

    @classmethod
    def system(cls, detail: str, *, reason: str = "") -> LedgerEntry:
        """A daemon event (start, reload, unlock) so operators see it in the same timeline."""
        return cls(kind="system", detail=detail, reason=reason)


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerRow(LedgerEntry):
    """A committed entry with the id the ledger gave it."""

    id: int


# Column order shared by INSERT, SELECT and the row constructor.
ENTRY_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(LedgerEntry))
_INT_FIELDS = ("time_ms", "status", "bytes_in", "bytes_out")
_STR_FIELDS = tuple(name for name in ENTRY_FIELDS if name not in (*_INT_FIELDS, "duration_ms"))


_values_getter: Callable[[LedgerEntry], tuple[Any, ...]] = operator.attrgetter(*ENTRY_FIELDS)
_KIND_DECISIONS = frozenset({(kind, decision) for kind in KINDS for decision in DECISIONS} | {("system", "")})


def entry_values(entry: LedgerEntry) -> tuple[Any, ...]:
    """The entry's fields in ENTRY_FIELDS order, as stored and as hashed."""
    return _values_getter(entry)


def normalize(entry: LedgerEntry) -> LedgerEntry:
    """Check and coerce an entry so it stores exactly and its MAC survives a round trip.

    Raises ValueError / TypeError at the caller, so one bad entry never fails a whole group commit.
    """
    if _stores_as_is(entry):
        return entry
    if entry.kind not in KINDS:
        raise ValueError(f"ledger kind must be one of {KINDS}")
    if entry.decision not in DECISIONS and not (entry.kind == "system" and entry.decision == ""):
        raise ValueError(f"ledger decision must be one of {DECISIONS}")
    changes: dict[str, Any] = {}
    for name in _STR_FIELDS:
        value = getattr(entry, name)
        if not isinstance(value, str):
            raise TypeError(f"ledger field {name} must be str")
        if type(value) is not str:  # an enum member, say: store and hash its plain text
            changes[name] = value = str.__str__(value)
        if not value.isascii():
            # Lone surrogates (from surrogateescape decoding) cannot be stored as UTF-8 text.
            clean = value.encode("utf-8", "replace").decode("utf-8")
            if clean != value:
                changes[name] = clean
    for name in _INT_FIELDS:
        value = getattr(entry, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _INT_MAX:
            raise ValueError(f"ledger field {name} must be a non-negative int")
        if type(value) is not int:  # HTTPStatus.OK, say
            changes[name] = int(value)
    if entry.time_ms > _TIME_MS_MAX:
        raise ValueError("ledger time_ms is out of range")
    duration = entry.duration_ms
    if isinstance(duration, bool) or not isinstance(duration, int | float):
        raise ValueError("ledger field duration_ms must be a finite number")
    try:
        as_float = float(duration)
    except OverflowError:  # an int past the float range
        raise ValueError("ledger field duration_ms must be a finite number") from None
    if not math.isfinite(as_float):
        raise ValueError("ledger field duration_ms must be a finite number")
    # SQLite stores a whole-number REAL as an integer, so -0.0 reads back as 0.0: the MAC, taken over the JSON
    # `-0.0`, would never verify again (nor would any row after it). Every other finite float reads back exact.
    as_float += 0.0  # -0.0 + 0.0 is 0.0; any other value is unchanged
    if type(duration) is not float or math.copysign(1.0, duration) != math.copysign(1.0, as_float):
        changes["duration_ms"] = as_float
    # Defence in depth: a query string may carry a token, so it never reaches the ledger.
    path = changes.get("path", entry.path)
    cut = min((i for i in (path.find("?"), path.find("#")) if i >= 0), default=-1)
    if cut >= 0:
        changes["path"] = path[:cut]
    for name in _STR_FIELDS:
        value = changes.get(name, getattr(entry, name))
        limit = MAX_DETAIL_CHARS if name == "detail" else MAX_TEXT_CHARS
        if len(value) > limit:
            changes[name] = truncate(value, limit)
    return replace(entry, **changes) if changes else entry


def truncate(value: str, limit: int = MAX_TEXT_CHARS) -> str:
    """value cut to exactly `limit` characters, ending in a marker that says it was cut and from how many.

    The result is never longer than limit, so truncating it again changes nothing (a row normalized twice
    stores and hashes the same text).
    """
    if len(value) <= limit:
        return value
    marker = f"...[truncated: {len(value)} characters]"
    return value[: max(limit - len(marker), 0)] + marker[: limit]


def _stores_as_is(e: LedgerEntry) -> bool:
    """Whether normalize would return the entry unchanged, decided in a fraction of the full check's time.

    It runs on the event loop for every gate request, whose rows are built from plain str, int and float
    values, so nearly every row passes here; anything else (an enum, a bool, non-ASCII text, a query string,
    a value out of range, text past MAX_TEXT_CHARS) goes through the full check, which coerces it or says what
    is wrong. Each field is spelled out because `type(x) is T` on an attribute is several times cheaper than
    any loop over fields; one length check on all the text at once bounds every field.
    """
    return (
        type(e.kind) is str and type(e.request_id) is str and type(e.agent) is str and type(e.credential) is str
        and type(e.service) is str and type(e.method) is str and type(e.path) is str
        and type(e.target_host) is str and type(e.decision) is str and type(e.reason) is str
        and type(e.flags) is str and type(e.detail) is str
        and type(e.time_ms) is int and type(e.status) is int and type(e.bytes_in) is int
        and type(e.bytes_out) is int and type(e.duration_ms) is float
        and (e.kind, e.decision) in _KIND_DECISIONS
        and len(text := f"{e.kind}{e.request_id}{e.agent}{e.credential}{e.service}{e.method}{e.path}"
                        f"{e.target_host}{e.decision}{e.reason}{e.flags}{e.detail}") <= MAX_TEXT_CHARS
        and text.isascii()
        and 0 <= e.time_ms <= _TIME_MS_MAX
        and 0 <= e.status <= _INT_MAX
        and 0 <= e.bytes_in <= _INT_MAX
        and 0 <= e.bytes_out <= _INT_MAX
        and math.isfinite(e.duration_ms)
        and math.copysign(1.0, e.duration_ms) == 1.0  # not -0.0 (nor any negative: rare, and checked in full)
        and "?" not in e.path
        and "#" not in e.path
    )


def row_from_values(row_id: int, values: tuple[Any, ...]) -> LedgerRow:
    """Build a row from SELECTed columns in ENTRY_FIELDS order."""
    return LedgerRow(id=row_id, **dict(zip(ENTRY_FIELDS, values, strict=True)))


def iso_time(time_ms: int) -> str:
    """ISO 8601 UTC with milliseconds and 'Z', the form every JSON consumer parses."""
    seconds, millis = divmod(time_ms, 1000)
    stamp = datetime.fromtimestamp(seconds, UTC)
    return f"{stamp:%Y-%m-%dT%H:%M:%S}.{millis:03d}Z"


def to_dict(row: LedgerRow) -> dict[str, Any]:
    """The stable JSON shape of a row for `--json`, export and follow."""
    return {
        "id": row.id,
        "time": iso_time(row.time_ms),
        "request_id": row.request_id,
        "agent": row.agent,
        "credential": row.credential,
        "service": row.service,
        "method": row.method,
        "path": row.path,
        "target_host": row.target_host,
        "decision": row.decision,
        "reason": row.reason,
        "status": row.status,
        "duration_ms": row.duration_ms,
        "bytes_in": row.bytes_in,
        "bytes_out": row.bytes_out,
        "kind": row.kind,
        "flags": row.flags,
        "detail": row.detail,
    }
