"""The tamper-evident audit ledger: one row per gate decision or daemon event, chained by HMAC."""

from aegisd.ledger.chain import VerifyResult, verify
from aegisd.ledger.entry import DECISIONS, KINDS, LedgerEntry, LedgerRow, now_ms, to_dict
from aegisd.ledger.prune import KeyMissing, LedgerReplaced, PruneRefused, PruneResult, prune
from aegisd.ledger.query import query_rows
from aegisd.ledger.schema import SCHEMA_VERSION, LedgerError, open_reader
from aegisd.ledger.stats import Group, LedgerStats, ledger_stats
from aegisd.ledger.writer import Dropped, LedgerWriter, Replaced, ReplaceIncomplete, Subscription

__all__ = [
    "DECISIONS",
    "KINDS",
    "SCHEMA_VERSION",
    "Dropped",
    "Group",
    "KeyMissing",
    "LedgerEntry",
    "LedgerError",
    "LedgerReplaced",
    "LedgerRow",
    "LedgerStats",
    "LedgerWriter",
    "PruneRefused",
    "PruneResult",
    "ReplaceIncomplete",
    "Replaced",
    "Subscription",
    "VerifyResult",
    "ledger_stats",
    "now_ms",
    "open_reader",
    "prune",
    "query_rows",
    "to_dict",
    "verify",
]
