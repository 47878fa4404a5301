"""A credential row and its sealed secret: the one place that seals or opens a secret with its row's
metadata as associated data (crypto.secret_aad), for the vault and for adopting older rows alike."""

from __future__ import annotations

from collections.abc import Sequence
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
