"""The master key and its slots, in-process on a real vault database: what a lock leaves behind, and what a
damaged slot says."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from aegisd.errors import StorageCorrupt, VaultLocked, WrongPassphrase
from aegisd.store import VaultStore
from aegisd.vault import crypto
from aegisd.vault.crypto import MasterKey
from aegisd.vault.vault import Vault
from tests.harness import PASSPHRASE


@pytest.fixture
def vault_path(tmp_path: Path) -> Iterator[Path]:
    store = VaultStore(tmp_path / "vault.db")
    store.open()
    Vault(store).init(PASSPHRASE, create_unlock_key=False)
    store.close()
    yield tmp_path / "vault.db"


def unlock(path: Path, passphrase: str = PASSPHRASE) -> None:
    store = VaultStore(path)
    store.open()
    try:
        Vault(store).unlock(passphrase=passphrase)
    finally:
        store.close()


def test_a_derivation_in_flight_when_the_key_is_wiped_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker thread deriving a subkey while a lock wipes the master key must not store a live subkey in
    the wiped key afterwards, where whatever still holds the key object would find it."""
    entered, release = threading.Event(), threading.Event()

    class SlowHKDF:
        def __init__(self, **kwargs: Any) -> None:
            self._hkdf = HKDF(**kwargs)

        def derive(self, material: bytes) -> bytes:
            entered.set()
            release.wait(5)
            return self._hkdf.derive(material)

    monkeypatch.setattr("aegisd.vault.crypto.HKDF", SlowHKDF)
    master = MasterKey.generate()
    derived: list[bytearray] = []
    deriving = threading.Thread(target=lambda: derived.append(master.subkey("agent-records")))
    deriving.start()
    assert entered.wait(5)
    wiping = threading.Thread(target=master.wipe)
    wiping.start()
    release.set()
    deriving.join(5)
    wiping.join(5)
    assert master._subkeys == {} and master.raw == bytearray(crypto.KEY_BYTES)
    assert derived == [bytearray(crypto.KEY_BYTES)]  # handed out before the wipe, and zeroed by it
    with pytest.raises(VaultLocked):
        master.subkey("agent-records")


@pytest.mark.parametrize(("column", "value"), [
    ("nonce", b"short"), ("salt", b""), ("params", "{}"), ("params", '{"memory_kib": "lots", "iterations": 3, '
                                                                    '"lanes": 4}'),
    ("wrapped", "text, not bytes"),
])
def test_a_damaged_slot_is_reported_as_damage_not_a_wrong_passphrase(vault_path: Path, column: str,
                                                                       value: object) -> None:
    conn = sqlite3.connect(vault_path)
    with conn:
        conn.execute(f"UPDATE key_slots SET {column} = ?", (value,))  # noqa: S608 - the test's own columns
    conn.close()
    damaged = r"key slot 1 is damaged \(\w+\): restore vault.db from a backup with aegisd stopped"
    with pytest.raises(StorageCorrupt, match=damaged):
        unlock(vault_path)


def test_a_wrong_passphrase_is_still_wrong(vault_path: Path) -> None:
    with pytest.raises(WrongPassphrase, match="wrong passphrase"):
        unlock(vault_path, PASSPHRASE + "x")
    unlock(vault_path)


def test_a_new_passphrase_keeps_stronger_argon2_settings(vault_path: Path) -> None:
    """An operator who made the passphrase slot costlier (here: more iterations, more memory) keeps that through
    `aegisctl passphrase`; settings below the defaults are raised to them."""
    store = VaultStore(vault_path)
    store.open()
    try:
        vault = Vault(store)
        master = MasterKey.generate()  # a slot wrapped with costlier settings (over a master key of its own)
        assert vault.vault_id is not None
        strong = crypto.make_slot(master, vault.vault_id, "passphrase", PASSPHRASE,
                                  {"memory_kib": 131072, "iterations": 4, "lanes": 1})
        vault._replace_slots("passphrase", strong)
        vault.change_passphrase(PASSPHRASE, "another long passphrase 9921")
        (params,) = [s.params for s in vault._slots() if s.kind == "passphrase"]
    finally:
        store.close()
    assert params == {"memory_kib": 131072, "iterations": 4, "lanes": 4}
    unlock(vault_path, "another long passphrase 9921")
