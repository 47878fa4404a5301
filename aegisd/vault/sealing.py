"""A credential row and its sealed secret: the one place that seals or opens a secret with its row's
metadata as associated data (crypto.secret_aad), for the vault and for adopting older rows alike."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aegisd.vault.credentials import CREDENTIAL_COLUMNS, Credential, credential_from_row
from aegisd.vault.crypto import seal, secret_aad, unseal

SELECT_SEALED = f"SELECT {CREDENTIAL_COLUMNS}, nonce, ciphertext FROM credentials"  # noqa: S608 - constant


def seal_secret(key: bytearray, vault_id: str, cred: Credential, data: bytes) -> tuple[bytes, bytes]:
    """Nonce and ciphertext of `data`, bound to the vault, the credential and its metadata."""
    return seal(key, data, secret_aad(vault_id, cred.id, cred.sealed_metadata()))


def open_row(row: Sequence[Any], vault_id: str, key: bytearray) -> tuple[Credential, bytes]:
    """A row of SELECT_SEALED and its secret, opened with the row's own metadata: ValueError or TypeError if
    the row is malformed, SealBroken if the seal does not open with it."""
    cred = credential_from_row(row)
    return cred, unseal(key, row[-2], row[-1], secret_aad(vault_id, cred.id, cred.sealed_metadata()))


OK, TAMPERED, NOT_ADOPTED, UNCHECKED = "ok", "tampered", "not_adopted", "unchecked"


@dataclass(frozen=True, slots=True)
class SealCheck:
    """One credential row and whether its seal holds, for everything that reads credentials in bulk.

    With `status` OK, `credential` is the metadata the secret was sealed with and `secret` that secret:
    what the gate may serve. Otherwise (TAMPERED, NOT_ADOPTED, or UNCHECKED while the vault is locked) it is
    the row as it reads, for display only, and there is no secret. `seal` (nonce and ciphertext) names this
    one sealing, so what is built from an OK check can be kept until the row changes. The vault caches
    checks and hands the same objects to every caller: never modify one.
    """

    credential: Credential
    status: str
    secret: bytes | None = field(default=None, repr=False)
    seal: bytes = field(default=b"", repr=False)
