"""The master key and its slots, in-process on a real vault database: what a lock leaves behind, and what a
damaged slot says."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from aegisd.api.aegis.v1 import vault_pb2
from aegisd.control.vault_service import VaultService
from aegisd.errors import FailedPrecondition, StorageCorrupt, VaultLocked, WrongPassphrase
from aegisd.runtime import Runtime
from aegisd.store import VaultStore
from aegisd.vault import crypto
from aegisd.vault import vault as vault_module
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
    # Found by a cold review: settings no derivation should be asked for (a terabyte; `true` read as 1) were
    # derived, and a slot whose derivation was unknown was a wrong passphrase.
    ("params", '{"memory_kib": 1073741824, "iterations": 3, "lanes": 4}'),
    ("params", '{"memory_kib": 65536, "iterations": true, "lanes": 4}'),
    ("kdf", "scrypt"), ("kdf", "hkdf-sha256"),
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


# -- key changes derive outside the vault's lock, and write only onto the state they read ----------------------

CHEAP = crypto.argon2_settings(19, 2)
NEW = "another long passphrase 9921"
THIRD = "yet another passphrase of 7734"


@pytest.fixture
def cheap_vault(tmp_path: Path) -> Iterator[Vault]:
    store = VaultStore(tmp_path / "vault.db")
    store.open()
    vault = Vault(store, CHEAP)
    vault.init(PASSPHRASE, create_unlock_key=False)
    yield vault
    store.close()


class Paused:
    """The first call of a function of aegisd.vault.vault, held at its start until released: a key change or
    unlock caught in the middle of its slow work. `args` are that call's arguments."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.args: tuple[Any, ...] = ()
        real = getattr(vault_module, name)

        def paused(*args: Any, **kwargs: Any) -> Any:
            if not self.entered.is_set():
                self.args = args
                self.entered.set()
                assert self.release.wait(30)  # longer than the tests wait for anything else
            return real(*args, **kwargs)

        monkeypatch.setattr(vault_module, name, paused)


def in_thread(call: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run `call` in a thread; the list gets what it returned or raised."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def opens_with(vault: Vault, passphrase: str) -> bool:
    vault.lock()
    try:
        vault.unlock(passphrase=passphrase)
    except WrongPassphrase:
        return False
    return True


class HeldAtFirstEntry:
    """Stands in for the vault's derivation lock: the first thread to enter waits there, holding nothing, until
    released; everyone else passes. A key change caught after reading the vault and before deriving anything."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(30)
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_two_passphrase_changes_at_once_do_not_both_apply(cheap_vault: Vault, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first change has read the slots and waits to derive, holding no lock: a second change completes
    meanwhile. The first, whose passphrase opened the slots it read, then finds them replaced and fails, so the
    second's passphrase is the one that opens (no lost update)."""
    held = HeldAtFirstEntry()
    monkeypatch.setattr(cheap_vault, "_kdf", held, raising=False)
    first, first_outcome = in_thread(lambda: cheap_vault.change_passphrase(PASSPHRASE, NEW))
    assert held.entered.wait(10)
    second, second_outcome = in_thread(lambda: cheap_vault.change_passphrase(PASSPHRASE, THIRD))
    second.join(10)
    assert not second.is_alive(), "the second change waited on the first one"
    assert second_outcome == [None]
    held.release.set()
    first.join(10)
    [refused] = first_outcome
    assert isinstance(refused, FailedPrecondition) and refused.reason == "vault_changed", refused
    assert "the vault changed while its passphrase was being changed" in refused.message
    assert opens_with(cheap_vault, THIRD)
    assert not opens_with(cheap_vault, NEW) and not opens_with(cheap_vault, PASSPHRASE)


def test_a_passphrase_replaced_while_its_proof_waited_is_not_proof(cheap_vault: Vault) -> None:
    """Found by a review: verify_passphrase (adopting an older vault, updating a credential) compared nothing once
    it had derived, so an old passphrase, its call queued behind the change that replaced it (`as_of` read as the
    call came in), still proved the operator's consent after the change had committed."""
    queued = cheap_vault.read_state()
    cheap_vault.change_passphrase(PASSPHRASE, NEW)
    with pytest.raises(FailedPrecondition) as refused:
        cheap_vault.verify_passphrase(PASSPHRASE, as_of=queued)
    assert refused.value.reason == "vault_changed"
    assert "the vault changed while the passphrase was being checked" in refused.value.message
    cheap_vault.verify_passphrase(NEW, as_of=cheap_vault.read_state())  # the current one still proves it


def test_a_lock_during_a_key_change_wipes_its_key_and_fails_it(cheap_vault: Vault,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """lock() does not wait for a change's derivation: it wipes the master key copy the change holds, and the
    change fails rather than wrap zeros (or anything) into a slot."""
    paused = Paused(monkeypatch, "make_slot")
    change, outcome = in_thread(lambda: cheap_vault.replace_unlock_key(PASSPHRASE, "aegis-unlock-test-key"))
    assert paused.entered.wait(10)
    held: MasterKey = paused.args[0]
    locking, locked = in_thread(cheap_vault.lock)
    locking.join(10)
    assert locked == [True], "lock() waited on the key change"
    assert held.wiped and held.raw == bytearray(crypto.KEY_BYTES)
    paused.release.set()
    change.join(10)
    [refused] = outcome
    assert isinstance(refused, FailedPrecondition) and refused.reason == "vault_changed", refused
    assert cheap_vault.state == "locked" and cheap_vault._in_flight == {}
    assert [s.kind for s in cheap_vault._slots()] == ["passphrase"]  # no unlock key slot was written


def test_a_lock_during_an_unlock_wins(cheap_vault: Vault, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unlock derives its key without the lock; a lock() meanwhile means the vault stays locked, as it would
    had the lock come after the unlock."""
    cheap_vault.lock()
    paused = Paused(monkeypatch, "open_slot")
    unlocking, outcome = in_thread(lambda: cheap_vault.unlock(passphrase=PASSPHRASE))
    assert paused.entered.wait(10)
    locking, locked = in_thread(cheap_vault.lock)
    locking.join(10)
    assert locked == [False], "lock() waited on the unlock"
    paused.release.set()
    unlocking.join(10)
    [refused] = outcome
    assert isinstance(refused, FailedPrecondition) and refused.reason == "vault_changed", refused
    assert cheap_vault.state == "locked" and cheap_vault._master is None
    assert cheap_vault.unlock(passphrase=PASSPHRASE) and cheap_vault.state == "unlocked"


def test_an_unlock_of_an_unlocked_vault_that_a_lock_overtakes_is_not_reported_done(
        cheap_vault: Vault, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a review: once Unlock checked the secret of an already unlocked vault, a lock() during that
    derivation left it answering "already unlocked" (OK) while the vault was locked. It is vault_changed now."""
    assert cheap_vault.state == "unlocked"
    paused = Paused(monkeypatch, "open_slot")
    unlocking, outcome = in_thread(lambda: cheap_vault.unlock(passphrase=PASSPHRASE))
    assert paused.entered.wait(10)
    assert cheap_vault.lock() is True
    paused.release.set()
    unlocking.join(10)
    [refused] = outcome
    assert isinstance(refused, FailedPrecondition) and refused.reason == "vault_changed", refused
    assert cheap_vault.state == "locked"


def test_an_unlock_whose_recheck_fails_wipes_the_key_it_derived(cheap_vault: Vault,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a review: the re-check after the derivation reads the slots again, and a read that fails there
    (a SQLite error, a malformed slot, a store that will not reopen after a restore) must not leave the master
    key it derived unwiped in memory; only a key the vault adopts is kept."""
    cheap_vault.lock()
    opened: list[MasterKey] = []
    real_open, real_slots = cheap_vault._open, cheap_vault._slots

    def spying_open(*args: Any) -> MasterKey:
        opened.append(real_open(*args))
        return opened[-1]

    reads: list[int] = []

    def failing_recheck() -> Any:
        reads.append(1)
        if len(reads) == 2:  # the first read makes the snapshot, the second is the re-check
            raise StorageCorrupt("a read error during the re-check")
        return real_slots()

    monkeypatch.setattr(cheap_vault, "_open", spying_open)
    monkeypatch.setattr(cheap_vault, "_slots", failing_recheck)
    with pytest.raises(StorageCorrupt, match="re-check"):
        cheap_vault.unlock(passphrase=PASSPHRASE)
    [key] = opened
    assert key.wiped and key.raw == bytearray(crypto.KEY_BYTES)
    assert cheap_vault.state == "locked" and cheap_vault._master is None
    monkeypatch.undo()
    assert cheap_vault.unlock(passphrase=PASSPHRASE)


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Context:
    """The little of a gRPC servicer context the @rpc wrapper uses."""

    def __init__(self) -> None:
        self.trailers: tuple[tuple[str, str], ...] = ()

    def set_trailing_metadata(self, trailers: tuple[tuple[str, str], ...]) -> None:
        self.trailers = trailers

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise _Aborted(code, message)


def test_a_right_secret_whose_unlock_another_unlock_beat_is_logged(
        cheap_vault: Vault, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Found by a review: an Unlock whose derivation another Unlock beat answered OK with nothing logged,
    while a wrong guess in the same race is logged; the right one is on record now too (never the input)."""
    cheap_vault.lock()
    caplog.set_level(logging.WARNING, logger="aegisd.vault.vault")
    derive = cheap_vault._open
    raced: list[bool] = []

    def derive_then_lose_the_race(*args: Any) -> Any:
        master = derive(*args)
        if not raced:  # the owner's unlock lands between this derivation and its re-check
            raced.append(False)
            raced[0] = cheap_vault.unlock(passphrase=PASSPHRASE)
        return master

    monkeypatch.setattr(cheap_vault, "_open", derive_then_lose_the_race)
    assert cheap_vault.unlock(passphrase=PASSPHRASE) is False
    assert raced == [True] and cheap_vault.state == "unlocked"
    assert "vault unlock raced another unlock: the passphrase given was correct" in caplog.text
    assert PASSPHRASE not in caplog.text


@pytest.mark.parametrize("right", [True, False], ids=["right", "wrong"])
@pytest.mark.parametrize("call", ["Unlock", "ChangePassphrase"])
def test_a_right_secret_whose_call_a_lock_cut_short_is_logged(cheap_vault: Vault, monkeypatch: pytest.MonkeyPatch,
                                                             call: str, right: bool) -> None:
    """Found by a review: a socket client sending Unlock(guess) and then Lock while the derivation runs got a
    wrong guess logged (a warning) but a right one only `vault_changed`, with nothing changed and nothing
    logged, so the one guess that succeeded left no trace. It is logged now, by name only, never the input."""
    guess = PASSPHRASE if right else "not the passphrase at all 5521"
    logged: list[tuple[int, str, dict[str, Any]]] = []

    def log_event(message: str, *, level: int = logging.INFO, **fields: Any) -> None:
        logged.append((level, message, fields))

    service = VaultService(cast(Runtime, SimpleNamespace(vault=cheap_vault, log_event=log_event)))
    context: Any = _Context()

    async def calling() -> object:
        if call == "Unlock":
            return await service.Unlock(vault_pb2.UnlockRequest(passphrase=guess), context)
        return await service.ChangePassphrase(vault_pb2.ChangePassphraseRequest(current=guess, new_passphrase=NEW),
                                              context)

    if call == "Unlock":
        cheap_vault.lock()
        expected = ("vault unlock abandoned: the vault was locked or changed meanwhile; the secret given was "
                    "correct", {"via": "passphrase"})
    else:
        expected = ("vault key change abandoned: the vault was locked or changed meanwhile; the passphrase given "
                    "was correct", {"change": "passphrase changed"})
    paused = Paused(monkeypatch, "open_slot")
    thread, outcome = in_thread(lambda: asyncio.run(calling()))
    assert paused.entered.wait(10)
    cheap_vault.lock()  # the second client's Lock, while the first call derives
    paused.release.set()
    thread.join(10)
    [aborted] = outcome
    assert isinstance(aborted, _Aborted), aborted
    abandoned = [(message, fields) for level, message, fields in logged if "abandoned" in message]
    if right:
        assert aborted.code == grpc.StatusCode.FAILED_PRECONDITION
        assert abandoned == [expected]
        assert [level for level, message, _ in logged if "abandoned" in message] == [logging.WARNING]
    else:
        assert aborted.code == grpc.StatusCode.PERMISSION_DENIED
        assert abandoned == [] and len(logged) == 1 and "wrong" in logged[0][1]
    assert guess not in repr(logged)
    assert opens_with(cheap_vault, PASSPHRASE)  # nothing changed


def test_a_passphrase_opens_its_slot_in_either_unicode_form() -> None:
    """From the vault review: "é" typed as one character at `init` and piped in as two (NFD) later was a wrong
    passphrase. Slots are made from the composed form; a slot made before, from the form typed, still opens."""
    composed, decomposed = "caf\u00e9 long passphrase 4471", "cafe\u0301 long passphrase 4471"
    master = MasterKey.generate()
    slot = crypto.make_slot(master, "v", "passphrase", decomposed, CHEAP)
    for given in (composed, decomposed):
        assert crypto.open_slot(slot, "v", given).raw == master.raw
    with pytest.raises(crypto.WrongKey):
        crypto.open_slot(slot, "v", "cafe long passphrase 4471")

    salt, nonce = bytes(crypto.SALT_BYTES), bytes(crypto.NONCE_BYTES)  # as an older aegisd made it: as typed
    kek = crypto._kek("passphrase", "argon2id", decomposed, salt, CHEAP)
    wrapped = AESGCM(kek).encrypt(nonce, bytes(master.raw), crypto._slot_aad("v", "passphrase"))
    older = crypto.KeySlot(kind="passphrase", kdf="argon2id", params=CHEAP, salt=salt, nonce=nonce, wrapped=wrapped)
    assert crypto.open_slot(older, "v", decomposed).raw == master.raw
