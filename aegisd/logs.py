"""Logging: human lines or JSON on stderr, or the journal with structured fields under systemd.

Events carry fields (`credential=github`), never secrets; under journald each field becomes
an `AEGIS_<NAME>` journal field so `journalctl AEGIS_CREDENTIAL=github` works.

A value may come from a control call before (or without) being validated, so no format writes a character
that could end the line or hide text: human lines show each non-printable character of the message and of
every field value escaped as Python's repr writes it (a backslash and `n`, `x1b`, `u202e`), JSON escapes
them (json.dumps writes ASCII only), and the journal's message and fields are escaped as human lines are."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

FIELDS_ATTR = "aegis_fields"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def event(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    """Log `message` with structured fields, for every output format."""
    if not logger.isEnabledFor(level):
        return
    extra: dict[str, Any] = {FIELDS_ATTR: fields}
    extra.update({"AEGIS_" + key.upper(): escaped(str(value)) for key, value in fields.items()})
    logger.log(level, message, extra=extra, stacklevel=2)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return dict(getattr(record, FIELDS_ATTR, {}))


def escaped(text: str) -> str:
    """`text` with every character str.isprintable() refuses (controls, line and paragraph separators,
    format characters such as bidi overrides, lone surrogates) written as its Python escape; printable
    text, the usual case, is returned as it is."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


class HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        text = f"{stamp}.{int(record.msecs):03d}Z {record.levelname.lower():7} {escaped(record.getMessage())}"
        fields = _fields(record)
        if fields:
            text += " " + " ".join(f"{k}={escaped(f'{v}')}" for k, v in fields.items())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class JournalFormatter(logging.Formatter):
    """The journal's MESSAGE: the message escaped as on a human line (the fields are journal fields of their own,
    escaped by event())."""

    def format(self, record: logging.LogRecord) -> str:
        text = escaped(record.getMessage())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def under_journal() -> bool:
    """True when systemd connected our stderr to the journal (it sets JOURNAL_STREAM)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(fmt: str, level: str) -> str:
    """Install the handler; returns which one ("journal", "json" or "human")."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler = _journal_handler() if under_journal() else None
    chosen = "journal" if handler is not None else fmt
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    # Libraries must not log request details (URLs can carry query-string secrets) below warning.
    for noisy in ("aiohttp.access", "aiohttp.client", "grpc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return chosen


def _journal_handler() -> logging.Handler | None:
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return None
    handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER="aegisd")
    handler.setFormatter(JournalFormatter())
    return handler


def set_level(level: str) -> None:
    logging.getLogger().setLevel(LEVELS[level])
