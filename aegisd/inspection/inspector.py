"""The matcher one routing table carries: every vault secret's forms plus the well-known key formats.

Built with the table (in the rebuild's worker thread), so a request only runs precompiled scans.
A finding names a family, never the text that matched and never which credential's secret it was:
telling an agent which credential a guessed string belongs to would make the gate an oracle.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from aegisd.inspection.key_formats import find_key_formats
from aegisd.inspection.literal_matcher import LiteralSearch
from aegisd.inspection.redactor import Redaction
from aegisd.inspection.secret_forms import redaction_forms, search_forms
from aegisd.inspection.views import views

VAULT_SECRET = "vault_secret"  # noqa: S105 - a family name, not a password


@dataclass(frozen=True, slots=True)
class SecretSource:
    """One credential's secret values (the secret, and for basic auth the password alone)."""

    credential_id: str
    values: tuple[bytes, ...]


class Inspector:
    """Scans outbound data for any vault secret or key format; hands out per-credential redactions."""

    def __init__(self, sources: Iterable[SecretSource]) -> None:
        self._values = {s.credential_id: s.values for s in sources}
        self._vault = LiteralSearch(form for values in self._values.values() for form in search_forms(values))
        self._redactions: dict[str, Redaction | None] = {}

    def scan(self, data: bytes) -> set[str]:
        """Families found in `data` or its decoded views; empty when clean."""
        found: set[str] = set()
        for view in views(data):
            if VAULT_SECRET not in found and self._vault.search(view):
                found.add(VAULT_SECRET)
            found |= find_key_formats(view)
        return found

    def redaction(self, credential_id: str) -> Redaction | None:
        """The compiled forms of this credential's secret, built on first use (None if too short to search)."""
        if credential_id not in self._redactions:
            forms = redaction_forms(self._values.get(credential_id, ()))
            self._redactions[credential_id] = Redaction(forms) if forms else None
        return self._redactions[credential_id]
