"""How listings show whether a row authenticates: the gate serves only rows marked ok."""

from __future__ import annotations

import re
import shlex

from aegisctl.output import printable
from aegisd.api.aegis.v1 import credentials_pb2 as pb

NAMES: dict[int, str] = {pb.INTEGRITY_OK: "ok", pb.INTEGRITY_UNCHECKED: "unchecked", pb.INTEGRITY_TAMPERED: "tampered",
                         pb.INTEGRITY_NOT_ADOPTED: "not_adopted"}
TEXT = {"ok": "ok", "unchecked": "unchecked (locked)", "tampered": "FAILS", "not_adopted": "to adopt"}
# The ids aegisd gives credential and agent rows: uuid4().hex (aegisd/vault/vault.py, aegisd/agents.py). A row
# that fails authentication may hold any id someone wrote into vault.db: only this form is put in a command
# as it is, for the operator to paste.
AEGISD_ID = re.compile(r"[0-9a-f]{32}\Z")


def name(value: int) -> str:
    """The JSON name of an Integrity value."""
    return NAMES.get(value, "unknown")


def text(integrity: str) -> str:
    """The table cell for a JSON name: failures in capitals, so they stand out."""
    return TEXT.get(integrity, integrity)


def problem(kind: str, row: dict[str, object], consequence: str) -> str | None:
    """One line saying why a row is not served and what to do, or None for a row that is fine (or unchecked).

    Its name and id come from the database, where anyone who can write vault.db may have put terminal escapes
    or shell syntax: the line is printable, and the id goes into the suggested command only as a word a shell
    takes literally."""
    label = f"{kind} {row['name']} ({row['id']})"
    if row["integrity"] == "tampered":
        verb = "vault" if kind == "credential" else "agent"
        return printable(f"{label} fails authentication: it was changed outside aegisd, so {consequence}; remove it "
                         f"({remove_by_id(verb, str(row['id']))}) and add it again as you intend it")
    if row["integrity"] == "not_adopted":
        return printable(f"{label} comes from an older aegisd, so {consequence} until adopted: `aegisctl vault adopt`")
    return None


def remove_by_id(verb: str, row_id: str) -> str:
    """The command that removes a row by its id: the id as it is when aegisd made it, shell-quoted when it is
    printable, and otherwise a pointer to the listing that shows it exactly (JSON)."""
    if AEGISD_ID.match(row_id):
        return f"`aegisctl {verb} remove --id {row_id}`"
    if printable(row_id) == row_id:
        return f"`aegisctl {verb} remove --id {shlex.quote(row_id)}`"
    return (f"`aegisctl {verb} remove --id ID`, its id as `aegisctl {verb} list --json` shows it: this one holds "
            "characters a terminal cannot show")
