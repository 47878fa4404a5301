"""How listings show whether a row authenticates: the gate serves only rows marked ok."""

from __future__ import annotations

from aegisd.api.aegis.v1 import credentials_pb2 as pb

NAMES: dict[int, str] = {pb.INTEGRITY_OK: "ok", pb.INTEGRITY_UNCHECKED: "unchecked", pb.INTEGRITY_TAMPERED: "tampered",
                         pb.INTEGRITY_NOT_ADOPTED: "not_adopted"}
TEXT = {"ok": "ok", "unchecked": "unchecked (locked)", "tampered": "FAILS", "not_adopted": "to adopt"}


def name(value: int) -> str:
    """The JSON name of an Integrity value."""
    return NAMES.get(value, "unknown")


def text(integrity: str) -> str:
    """The table cell for a JSON name: failures in capitals, so they stand out."""
    return TEXT.get(integrity, integrity)


def problem(kind: str, row: dict[str, object], consequence: str) -> str | None:
    """One line saying why a row is not served and what to do, or None for a row that is fine (or unchecked)."""
    label = f"{kind} {row['name']} ({row['id']})"
    if row["integrity"] == "tampered":
        return (f"{label} fails authentication: it was changed outside aegisd, so {consequence}; remove it "
                f"(`aegisctl {'vault' if kind == 'credential' else 'agent'} remove --id {row['id']}`) and add it "
                "again as you intend it")
    if row["integrity"] == "not_adopted":
        return f"{label} comes from an older aegisd, so {consequence} until adopted: `aegisctl vault adopt`"
    return None
