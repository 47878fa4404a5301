"""The lines `vault list|show` and `agent list|show` print on stderr for rows that fail authentication.

Found by a cold review: they printed the row's stored name and id raw, and put the id in a command to paste.
Anyone who can write vault.db could then send terminal escapes to the operator's terminal, or plant shell
syntax (`x$(touch /tmp/PWNED)`) in the suggested `aegisctl vault remove --id ...`."""

from __future__ import annotations

import shlex
import uuid

import pytest

from aegisctl.commands import agent, vault
from aegisctl.integrity import problem

EVIL_NAME = "gh\x1b]0;pwned\x07\x1b[2J"
SHELL_ID = "x$(touch /tmp/PWNED)"


def _controls(text: str) -> list[str]:
    return [c for c in text if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c in "\u2028\u2029\u202e"]


@pytest.mark.parametrize("kind, verb", [("credential", "vault"), ("agent", "agent")])
def test_a_tampered_rows_note_is_printable_and_its_command_safe_to_paste(kind: str, verb: str) -> None:
    aegisd_id = uuid.uuid4().hex  # the form aegisd gives every row
    note = problem(kind, {"name": EVIL_NAME, "id": aegisd_id, "integrity": "tampered"}, "it is not served")
    assert note is not None and not _controls(note), note
    assert r"gh\x1b]0;pwned\x07\x1b[2J" in note and f"`aegisctl {verb} remove --id {aegisd_id}`" in note

    note = problem(kind, {"name": "gh", "id": SHELL_ID, "integrity": "tampered"}, "it is not served")
    assert note is not None
    command = note.split("`")[1]
    assert command == f"aegisctl {verb} remove --id {shlex.quote(SHELL_ID)}"
    assert shlex.split(command)[-1] == SHELL_ID  # one word, taken literally by a shell

    note = problem(kind, {"name": "gh", "id": "x\x1b[2J\u202e", "integrity": "tampered"}, "it is not served")
    assert note is not None and not _controls(note), note
    assert f"`aegisctl {verb} remove --id ID`" in note and f"`aegisctl {verb} list --json`" in note

    note = problem(kind, {"name": EVIL_NAME, "id": "\x07", "integrity": "not_adopted"}, "it is not served")
    assert note is not None and not _controls(note) and "vault adopt" in note, note


def test_every_note_printed_by_the_listings_is_printable() -> None:
    rows = [{"name": EVIL_NAME, "id": SHELL_ID, "integrity": "tampered"}]
    for note in vault._integrity_notes(rows):
        assert not _controls(note), note
    agents = [{**rows[0], "ignored_grants": []},
              {"name": "bot", "id": uuid.uuid4().hex, "integrity": "ok", "ignored_grants": ["x\x1b[2J", "y\x9b1m"]}]
    notes = agent._integrity_notes(agents)
    assert len(notes) == 2 and not [n for n in notes if _controls(n)], notes
    assert r"x\x1b[2J, y\x9b1m" in notes[1] and "`aegisctl revoke bot CREDENTIAL`" in notes[1]
