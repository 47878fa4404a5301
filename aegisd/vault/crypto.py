"""Key handling: the master key, the slots that wrap it, and sealing secrets.

LUKS-style: one random 256-bit master key, never stored in clear, wrapped by any number
of slots (a passphrase through Argon2id, or a random unlock key through HKDF). Secrets are
sealed with AES-256-GCM under a key derived from the master key, with associated data
that binds each ciphertext to its vault, its credential and that credential's metadata, so a
ciphertext moved elsewhere, or an allowlist widened behind aegisd's back, fails to open instead
of sending the secret somewhere it was not meant to go.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from aegisd.errors import VaultLocked

KEY_BYTES = 32
NONCE_BYTES = 12
SALT_BYTES = 16
# Argon2id: 64 MiB, 3 passes, 4 lanes (~0.2 s here), unless the config says otherwise (kdf_memory_mib,
# kdf_iterations). Stored per slot, so a slot opens with the cost it was made with.
ARGON2_DEFAULTS: dict[str, int] = {"memory_kib": 65536, "iterations": 3, "lanes": 4}
# The most a passphrase slot may ask of a derivation (the settings' ceiling, config.py, comes from here). A stored
# slot asking more is damaged, never derived: an edited vault.db could otherwise ask for terabytes, and a
# passphrase change would copy the setting into its new slot.
ARGON2_MAX: dict[str, int] = {"memory_kib": 4096 * 1024, "iterations": 64, "lanes": 16}
KDFS = {"passphrase": "argon2id", "unlock_key": "hkdf-sha256"}


def argon2_settings(memory_mib: int, iterations: int) -> dict[str, int]:
    """The Argon2id parameters for new passphrase slots from the config's cost (lanes stay the default's)."""
    return {"memory_kib": memory_mib * 1024, "iterations": iterations, "lanes": ARGON2_DEFAULTS["lanes"]}


class WrongKey(Exception):
    """The passphrase or unlock key does not open this slot."""


class SlotDamaged(Exception):
    """A key slot's stored fields are malformed: no passphrase could open it."""


class SealBroken(Exception):
    """A ciphertext failed authentication: tampered with, or moved from another row or vault."""


@dataclass
class KeySlot:
    kind: str  # "passphrase" | "unlock_key"
    kdf: str  # "argon2id" | "hkdf-sha256"
    params: dict[str, Any]
    salt: bytes
    nonce: bytes
    wrapped: bytes
    id: int | None = None


@dataclass
class MasterKey:
    """The unlocked master key and its subkeys; `wipe` overwrites every byte we hold."""

    raw: bytearray
    _subkeys: dict[str, bytearray] = field(default_factory=dict)
    _wiped: bool = False
    # Derivations run in worker threads outside the vault's lock; this keeps one from storing a subkey
    # after a wipe has cleared them all.
    _guard: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def generate(cls) -> MasterKey:
        return cls(bytearray(os.urandom(KEY_BYTES)))

    def subkey(self, purpose: str) -> bytearray:
        """A key for one purpose (secrets, agent tokens, ledger), so no key serves two. VaultLocked once wiped:
        a caller that took the master key just before a lock must not derive keys from its zeroed bytes."""
        with self._guard:
            if self._wiped:
                raise VaultLocked()
            if purpose not in self._subkeys:
                derived = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                               info=b"aegis/v1/" + purpose.encode()).derive(bytes(self.raw))
                self._subkeys[purpose] = bytearray(derived)
            return self._subkeys[purpose]

    @property
    def wiped(self) -> bool:
        """Whether `wipe` has run: the bytes are zeros, and must not be wrapped into a slot."""
        with self._guard:
            return self._wiped

    def wipe(self) -> None:
        with self._guard:
            self._wiped = True
            for buf in (self.raw, *self._subkeys.values()):
                buf[:] = bytes(len(buf))
            self._subkeys.clear()


def _slot_aad(vault_id: str, kind: str) -> bytes:
    return b"aegis-slot-v1\0" + vault_id.encode() + b"\0" + kind.encode()


def _argon2_kek(passphrase: str, salt: bytes, params: dict[str, Any]) -> bytes:
    settings = {name: params[name] for name in ARGON2_MAX}
    for name, value in settings.items():
        if type(value) is not int or not 1 <= value <= ARGON2_MAX[name]:
            raise ValueError(f"Argon2id {name} out of range")
    return Argon2id(salt=salt, length=KEY_BYTES, iterations=settings["iterations"], lanes=settings["lanes"],
                    memory_cost=settings["memory_kib"]).derive(passphrase.encode())


def _hkdf_kek(unlock_key: str, salt: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt,
                info=b"aegis/v1/unlock-key-slot").derive(unlock_key.encode())


def _kek(slot_kind: str, kdf: str, secret: str, salt: bytes, params: dict[str, Any]) -> bytes:
    """The key-encrypting key; ValueError (a damaged slot, not a wrong secret) for a derivation that is not the
    one its kind is made with."""
    if kdf != KDFS.get(slot_kind):
        raise ValueError(f"a {slot_kind} slot does not use {kdf!r}")
    return _argon2_kek(secret, salt, params) if kdf == "argon2id" else _hkdf_kek(secret, salt)


def make_slot(master: MasterKey, vault_id: str, kind: str, secret: str,
              params: dict[str, int] | None = None) -> KeySlot:
    """Wrap the master key under a passphrase (Argon2id) or an unlock key (HKDF)."""
    kdf = KDFS[kind]
    slot_params: dict[str, Any] = dict(params or ARGON2_DEFAULTS) if kdf == "argon2id" else {}
    salt, nonce = os.urandom(SALT_BYTES), os.urandom(NONCE_BYTES)
    kek = _kek(kind, kdf, unicodedata.normalize("NFC", secret), salt, slot_params)
    wrapped = AESGCM(kek).encrypt(nonce, bytes(master.raw), _slot_aad(vault_id, kind))
    return KeySlot(kind=kind, kdf=kdf, params=slot_params, salt=salt, nonce=nonce, wrapped=wrapped)


def open_slot(slot: KeySlot, vault_id: str, secret: str) -> MasterKey:
    """Unwrap the master key, or raise WrongKey; SlotDamaged if the slot's stored fields cannot be used at all
    (a salt, nonce or parameter of the wrong size or type).

    Slots are made from the secret in Unicode's composed form (NFC), so an "é" typed as one character and
    piped in as two opens the same slot; a slot made before that, from a secret as typed, is tried that way
    too (a second derivation, only for a secret that NFC changes)."""
    composed = unicodedata.normalize("NFC", secret)
    for form in dict.fromkeys((composed, secret)):
        try:
            kek = _kek(slot.kind, slot.kdf, form, slot.salt, slot.params)
            return MasterKey(bytearray(AESGCM(kek).decrypt(slot.nonce, slot.wrapped, _slot_aad(vault_id, slot.kind))))
        except InvalidTag:
            continue
        except (ValueError, TypeError, KeyError, OverflowError) as exc:
            raise SlotDamaged(f"key slot {slot.id} is damaged ({type(exc).__name__})") from None
    raise WrongKey("the key does not open this slot")


def secret_aad(vault_id: str, credential_id: str, metadata: bytes) -> bytes:
    """A secret's associated data: its vault, its credential, and the metadata that says where and how it
    may be used (Credential.sealed_metadata), so editing that metadata in vault.db breaks the seal."""
    return b"aegis-secret-v2\0" + vault_id.encode() + b"\0" + credential_id.encode() + b"\0" + metadata


def secret_aad_v1(vault_id: str, credential_id: str) -> bytes:
    """The associated data of secrets sealed before their metadata was: read once, then resealed."""
    return b"aegis-secret-v1\0" + vault_id.encode() + b"\0" + credential_id.encode()


def seal(key: bytearray, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
    nonce = os.urandom(NONCE_BYTES)
    return nonce, AESGCM(bytes(key)).encrypt(nonce, plaintext, aad)


def unseal(key: bytearray, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """Open a seal; SealBroken if it fails authentication or is malformed (a nonce of the wrong size or type)."""
    try:
        return AESGCM(bytes(key)).decrypt(nonce, ciphertext, aad)
    except (InvalidTag, ValueError, TypeError):
        raise SealBroken("ciphertext failed authentication") from None


def keyed_hash(key: bytearray, value: str) -> bytes:
    """HMAC-SHA256, used to store agent tokens without storing them (the gate finds them by keyed_hasher)."""
    return keyed_hasher(key)(value.encode())


def keyed_hasher(key: bytes | bytearray) -> Callable[[bytes], bytes]:
    """keyed_hash's function under one key, keyed once: each call then costs a copy of the keyed state,
    for the gate, which hashes every request's agent token."""
    keyed = hmac.new(bytes(key), digestmod=hashlib.sha256)

    def digest(message: bytes) -> bytes:
        h = keyed.copy()
        h.update(message)
        return h.digest()

    return digest
