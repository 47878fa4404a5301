"""The matcher one routing table carries: every vault secret's forms plus the well-known key formats.

Built with the table (in the rebuild's worker thread), so a request only runs precompiled scans.
A finding names a family, never the text that matched and never which credential's secret it was:
telling an agent which credential a guessed string belongs to would make the gate an oracle.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aegisd.inspection.key_formats import find_key_formats
from aegisd.inspection.literal_matcher import LiteralSearch
from aegisd.inspection.redactor import Redaction
from aegisd.inspection.secret_forms import redaction_forms, search_forms
from aegisd.inspection.views import Escapes, escapes_for, slow_to_decode, views

VAULT_SECRET = "vault_secret"  # noqa: S105 - a family name, not a password
# What `scan_each` puts between parts. No view spans it: percent and JSON escapes contain neither byte.
# No key format matches across it or reads it as part of a key: only the private-key pattern admits
# a newline (as whitespace between header and key material) or a NUL (inside a header line's value),
# and never a NUL right after a newline. The NUL before a part is no token byte and no scheme
# character, the newline after one ends a key as the end of the data does.
PART_SEPARATOR = b"\n\0"


@dataclass(frozen=True, slots=True)
class SecretSource:
    """One credential's secret values (the secret, and for basic auth the password alone)."""

    credential_id: str
    values: tuple[bytes, ...]


def _decoded(values: tuple[bytes, ...], escapes: Escapes) -> list[bytes]:
    """Each value and its decoded views: a secret that itself holds `%41` is searched for with `A` there too,
    for a request that escapes some of its other characters shows it decoded, `%41` and all."""
    return [view for value in values for view in views(value, escapes)]


class Inspector:
    """Scans outbound data for any vault secret or key format; hands out per-credential redactions."""

    def __init__(self, sources: Iterable[SecretSource], groups: Mapping[str, frozenset[str]] | None = None, *,
                 previous: Inspector | None = None) -> None:
        """`previous`: the inspector this one replaces, whose secrets' search forms are taken rather than derived
        again (a third of a credential change's cost at 1,000 credentials)."""
        self._values = {s.credential_id: s.values for s in sources}
        self._groups = dict(groups or {})
        # The JSON escapes requests are decoded of: those that can spell a character some secret holds.
        self._escapes = escapes_for(value for values in self._values.values() for value in values)
        known: dict[tuple[bytes, ...], tuple[bytes, ...]] = (
            previous._forms if previous is not None and previous._escapes is self._escapes else {})
        self._forms: dict[tuple[bytes, ...], tuple[bytes, ...]] = {
            values: known.get(values) or tuple(search_forms(_decoded(values, self._escapes)))
            for values in self._values.values()}
        self._vault = LiteralSearch(form for forms in self._forms.values() for form in forms)
        self._redactions: dict[frozenset[str], Redaction | None] = {}  # by group
        self._by_credential: dict[str, Redaction | None] = {}  # the same, by credential: one lookup a request
        self._compiling = threading.Lock()  # requests that find a group cold wait for one compile, not make K

    @property
    def values(self) -> Mapping[str, tuple[bytes, ...]]:
        """The secret values by credential id it was built from: a rebuild with the same ones keeps it."""
        return self._values

    @property
    def groups(self) -> Mapping[str, frozenset[str]]:
        """By credential id, the credentials whose secrets its answers are redacted of (routing's
        `credentials_sharing_hosts`); a credential not in it is redacted of its own only."""
        return self._groups

    def scan(self, data: bytes) -> set[str]:
        """Families found in `data` or its decoded views; empty when clean."""
        found: set[str] = set()
        for view in views(data, self._escapes):
            if VAULT_SECRET not in found and self._vault.search(view):
                found.add(VAULT_SECRET)
            found |= find_key_formats(view)
        return found

    def slow_to_scan(self, data: bytes) -> bool:
        """Whether scanning `data` may take a Python step per escape (views.slow_to_decode): the gate then
        inspects it in a worker thread however small it is."""
        return slow_to_decode(data, self._escapes)

    def scan_each(self, parts: Mapping[str, bytes]) -> dict[str, set[str]]:
        """What `scan` finds in each named part, for the parts where it finds anything, in one pass over
        them all while they are clean (a request without secrets).

        Decoding is local (no escape holds a separator byte), and whether data is decoded at all depends on
        whether it holds an escape that makes a view (views.py), which the joined parts do wherever a part
        does: so each layer a part has is, between two separators, inside that layer of the joined parts
        (a part without such an escape has no layer but itself, inside the joined parts as sent), and each
        view of a part lies inside a view of the joined parts. As nothing matches
        across a separator, whatever a part's own scan finds the joined scan finds too, and a clean
        whole proves every part clean. Otherwise each part is scanned alone, so that callers can say where (the joined
        scan may also have found a secret spread over two parts, which no part holds).
        """
        if not self.scan(PART_SEPARATOR.join(parts.values())):
            return {}
        return {name: found for name, part in parts.items() if (found := self.scan(part))}

    def has_redaction(self, credential_id: str) -> bool:
        """Whether `redaction` would answer at once (compiled already): a group's first compile, up to a second
        for a thousand credentials on one host, is made in a worker thread rather than on the event loop."""
        return credential_id in self._by_credential

    def redaction(self, credential_id: str) -> Redaction | None:
        """The compiled forms of this credential's secret and of its group's (credentials whose allowlists reach
        a host its own does: an upstream may have stored what one of them sent and echo it to this one), built on
        first use, one per group (None if all are too short to search)."""
        if credential_id in self._by_credential:
            return self._by_credential[credential_id]
        group = self._groups.get(credential_id) or frozenset((credential_id,))
        with self._compiling:
            if group not in self._redactions:
                forms = redaction_forms(tuple(v for cid in sorted(group) for v in self._values.get(cid, ())))
                self._redactions[group] = Redaction(forms) if forms else None
            found = self._by_credential[credential_id] = self._redactions[group]
        return found
