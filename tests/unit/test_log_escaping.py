"""No log format lets a value start a new line or hide text: each non-printable character is written escaped,
and every printable value comes out exactly as before."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from aegisd.logs import FIELDS_ATTR, HumanFormatter, JournalFormatter, JsonFormatter, escaped, event

FORGED = "x\n2026-11-28T09:00:00.000Z info    vault locked"
# Characters that end a line somewhere (C0, NEL, the Unicode separators), move the cursor or reorder what is shown
# (ESC, bidi overrides and isolates), or hide (zero-width), and a lone surrogate, which cannot even be encoded.
HOSTILE = ["\n", "\r", "\x00", "\x1b", "\x7f", "\x85", "\u2028", "\u2029", "\u202e", "\u2066", "\u200b",
           "\ufeff", "\ud800", "\t", "\x0b", "\x0c"]


def record(message: str, fields: dict[str, object], args: tuple[object, ...] = ()) -> logging.LogRecord:
    """A record as event() makes one (the fields under FIELDS_ATTR and as AEGIS_ attributes)."""
    rec = logging.LogRecord("aegisd.test", logging.WARNING, __file__, 1, message, args, None)
    setattr(rec, FIELDS_ATTR, fields)
    rec.created, rec.msecs = 1795856400.0, 0.0
    return rec


@pytest.mark.parametrize("char", HOSTILE)
def test_a_hostile_character_is_escaped_everywhere(char: str) -> None:
    value = f"a{char}b"
    assert escaped(value) == "a" + repr(char)[1:-1] + "b"
    assert escaped(value).isprintable() and escaped(value).isascii()
    human = HumanFormatter().format(record(f"message {value}", {"credential": value}))
    assert human == (f"2026-11-28T09:00:00.000Z warning message a{repr(char)[1:-1]}b "
                     f"credential=a{repr(char)[1:-1]}b")
    journal = JournalFormatter().format(record(f"message {value}", {"credential": value}))
    assert journal == f"message a{repr(char)[1:-1]}b"
    line = JsonFormatter().format(record(f"message {value}", {"credential": value}))
    assert line.isascii() and "\n" not in line
    assert json.loads(line)["credential"] == value and json.loads(line)["msg"] == f"message {value}"


def test_a_forged_line_stays_on_its_own_line_in_every_format() -> None:
    rec = record("credential update refused: wrong passphrase", {"credential": FORGED})
    human = HumanFormatter().format(rec)
    assert "\n" not in human
    assert human.endswith("credential=x\\n2026-11-28T09:00:00.000Z info    vault locked")
    rec = record("refused %s", {}, (FORGED,))  # a value interpolated into the message itself
    assert "\n" not in HumanFormatter().format(rec) and "\n" not in JournalFormatter().format(rec)
    assert "\n" not in JsonFormatter().format(rec)


@pytest.mark.parametrize("value", ["github", "api.example.com", "Grüße", "日本語", "a b=c", "back\\slash", "",
                                   42, 1.5, True, None, "quote'\"", "\u00e9\u0301"])
def test_printable_values_are_written_as_before(value: object) -> None:
    """Byte-identical with the formatter before escaping (`{k}={v}`, the message as given)."""
    rec = record("credential added", {"credential": value, "n": 3})
    assert HumanFormatter().format(rec) == f"2026-11-28T09:00:00.000Z warning credential added credential={value} n=3"
    if isinstance(value, str):
        assert escaped(value) is value


def test_an_exception_keeps_its_traceback_lines() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("aegisd.test", logging.ERROR, __file__, 1, "failed\nhere", (), sys.exc_info())
    for formatter in (HumanFormatter(), JournalFormatter()):
        text = formatter.format(rec)
        first, _, rest = text.partition("\n")
        assert first.endswith("failed\\nhere") and rest.startswith("Traceback") and "ValueError: boom" in rest


def test_journal_fields_are_escaped_too(caplog: pytest.LogCaptureFixture) -> None:
    """Under journald each field is a journal field of its own (AEGIS_NAME): escaped as on a human line."""
    logger = logging.getLogger("aegisd.test.journal")
    with caplog.at_level(logging.INFO, logger="aegisd.test.journal"):
        event(logger, logging.INFO, "credential row removed", id=FORGED, count=2, name="github")
    (rec,) = caplog.records
    assert rec.AEGIS_ID == "x\\n2026-11-28T09:00:00.000Z info    vault locked"  # type: ignore[attr-defined]
    assert (rec.AEGIS_COUNT, rec.AEGIS_NAME) == ("2", "github")  # type: ignore[attr-defined]
    assert getattr(rec, FIELDS_ATTR) == {"id": FORGED, "count": 2, "name": "github"}  # the formatters escape
