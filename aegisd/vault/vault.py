"""The vault's state machine (uninitialized → locked → unlocked) and its credentials.

Methods block (Argon2id, SQLite) and are called from worker threads; one lock keeps
state changes atomic. Listeners hear about every change so in-memory views (the gate's
routing table) rebuild from the vault rather than keeping state of their own.
"""

from __future__ import annotations

import hmac
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from typing import Any

from aegisd.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StorageCorrupt,
    VaultLocked,
    VaultUninitialized,
    WrongPassphrase,
    log_safe,
)
from aegisd.store import VaultStore
from aegisd.vault import adoption
from aegisd.vault import credentials as cred_rules
from aegisd.vault.adoption import OlderRows
from aegisd.vault.credentials import CREDENTIAL_COLUMNS, Credential, credential_from_row, credential_row
from aegisd.vault.crypto import (
    ARGON2_DEFAULTS,
    KeySlot,
    MasterKey,
    SealBroken,
    SlotDamaged,
    WrongKey,
    make_slot,
    open_slot,
)
from aegisd.vault.passphrase_strength import check_passphrase_strength
from aegisd.vault.sealing import NOT_ADOPTED, OK, SELECT_SEALED, TAMPERED, UNCHECKED, SealCheck, open_row, seal_secret

Listener = Callable[[str], None]
log = logging.getLogger(__name__)


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class _Snapshot:
    """The vault as read under the lock before a slow key derivation without it, to compare with afterwards."""

    vault_id: str
    slots: list[KeySlot]
    locks: int
    unlocked: bool


class Vault:
    """The master key (while unlocked) and the credentials it protects."""

    def __init__(self, store: VaultStore, argon2: Mapping[str, int] = ARGON2_DEFAULTS) -> None:
        self._store = store
        self._argon2 = dict(argon2)  # the cost of new passphrase slots
        self._lock = threading.RLock()
        # Argon2id derivations run one at a time, outside _lock: the memory they take (kdf_memory_mib each) and the
        # rate of passphrase guesses over the socket stay what they were when _lock serialised them.
        self._kdf = threading.Lock()
        self._master: MasterKey | None = None
        self._listeners: list[Listener] = []
        self._checks: dict[tuple[Any, ...], SealCheck] = {}  # see checked_credentials; empty while locked
        self._locks = 0  # lock() calls so far: a derivation outside the lock that began before one is stale
        self._in_flight: dict[int, MasterKey] = {}  # copies key changes hold outside the lock; lock() wipes them
        self.vault_id: str | None = self._read_meta("vault_id")

    # -- state -----------------------------------------------------------------------------

    @property
    def state(self) -> str:
        if self.vault_id is None:
            return "uninitialized"
        return "unlocked" if self._master is not None else "locked"

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def notify(self, event: str) -> None:
        """Tell listeners something changed: "unlocked", "locked", "credentials", "agents"."""
        for listener in self._listeners:
            listener(event)

    def init(self, passphrase: str, create_unlock_key: bool, unlock_key: str | None = None) -> str:
        """Create the vault and leave it unlocked. Returns the vault id.

        The slots are made (Argon2id) before the lock is taken: a second init racing this one fails at the
        check under it, and nothing else waits on the derivation."""
        if self.vault_id is not None:  # checked again under the lock; this spares a derivation
            raise AlreadyExists(f"a vault already exists in {self._store.path.parent}", reason="vault_exists")
        check_passphrase_strength(passphrase)
        if create_unlock_key and not unlock_key:
            raise InvalidArgument("an unlock key was requested but none was generated")
        master = MasterKey.generate()
        try:
            vault_id = uuid.uuid4().hex
            with self._kdf:
                slots = [make_slot(master, vault_id, "passphrase", passphrase, self._argon2)]
            if create_unlock_key and unlock_key:
                slots.append(make_slot(master, vault_id, "unlock_key", unlock_key))
            with self._lock:
                if self.vault_id is not None:
                    raise AlreadyExists(f"a vault already exists in {self._store.path.parent}",
                                        reason="vault_exists")
                with self._store.transaction() as conn:
                    conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                                     [("vault_id", vault_id), ("created_at", str(now_ms())),
                                      ("format", "aegis-vault-v1")])
                    for slot in slots:
                        _insert_slot(conn, slot)
                self.vault_id, self._master = vault_id, master
        except BaseException:
            master.wipe()
            raise
        self.notify("unlocked")
        return vault_id

    def unlock(self, *, passphrase: str | None = None, unlock_key: str | None = None,
               as_of: _Snapshot | None = None) -> bool:
        """Open the vault; returns False if it was already unlocked (the secret is checked all the same: a wrong
        one raises WrongPassphrase, so a caller is never told a wrong secret worked, and a guess is logged).

        The slot is opened (Argon2id) outside the lock, so listings and the gate's other reads do not wait on
        it; the key is kept only if nothing changed meanwhile: a lock() during the derivation wins. `as_of`
        (read_state, taken when the call came in) makes "meanwhile" start there, as for every method taking it."""
        snapshot = as_of or self.read_state()
        already = snapshot.unlocked
        kind = "passphrase" if passphrase is not None else "unlock_key"
        secret = passphrase if passphrase is not None else unlock_key
        if not secret:
            raise InvalidArgument("give a passphrase or an unlock key")
        master = self._open(snapshot, kind, secret)
        adopted = False
        try:  # every way out but adoption wipes the key, a failing re-check (a read error, a restore) included
            with self._lock:
                if self.state == "unlocked":  # already, or another unlock came first (read again: the lock was let go)
                    if not already:  # the secret was right: on record, as a right one cut short by a lock is
                        log.warning("vault unlock raced another unlock: the %s given was correct, and the vault was "
                                    "already unlocked", "passphrase" if kind == "passphrase" else "unlock key")
                    return False
                # Locked now, unlocked or not when this began: a lock() meanwhile makes the snapshot stale, so a
                # vault found unlocked and locked during the derivation is reported changed, never "already unlocked".
                if not self._unchanged(snapshot, master):
                    raise _changed_meanwhile("it was being unlocked")
                self._master, adopted = master, True
        finally:
            if not adopted:
                master.wipe()
        self._warn_if_older_rows()
        self.notify("unlocked")
        return True

    def _open(self, snapshot: _Snapshot, kind: str, secret: str) -> MasterKey:
        """Open the snapshot's slots of `kind` with `secret` (_open_slots), one derivation at a time."""
        with self._kdf:
            return _open_slots(snapshot.vault_id, snapshot.slots, kind, secret)

    def read_state(self) -> _Snapshot:
        """What a key derivation outside the lock starts from, and compares with once it is done (_unchanged).

        A caller that queues a method deriving keys (unlock, verify_passphrase, the key changes) behind others
        takes this when the call comes in and passes it as the method's `as_of`: a lock(), or another change,
        that came while the call waited its turn then counts as having come during it, as when it did not wait."""
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> _Snapshot:
        """read_state; call with the lock held."""
        return _Snapshot(self._require_initialized(), self._slots(), self._locks, self._master is not None)

    def _unchanged(self, snapshot: _Snapshot, master: MasterKey) -> bool:
        """Whether the vault is as `snapshot` found it (same vault, same slots, no lock() since) and `master`
        was not wiped by a lock(); call with the lock held."""
        return (not master.wiped and self.vault_id == snapshot.vault_id and self._locks == snapshot.locks
                and self._slots() == snapshot.slots)

    # -- key slots: what opens the vault ------------------------------------------------------------

    def verify_passphrase(self, passphrase: str, *, as_of: _Snapshot | None = None) -> None:
        """Raise WrongPassphrase unless `passphrase` opens the vault; changes nothing (locked stays locked).
        VaultChanged if the vault's key slots changed meanwhile (a passphrase change, a restore): the passphrase
        proven must be one that opens the vault now, not one replaced while the call waited its turn."""
        snapshot = as_of or self.read_state()
        self._open(snapshot, "passphrase", passphrase).wipe()
        with self._lock:
            if self.vault_id != snapshot.vault_id or self._slots() != snapshot.slots:
                raise _changed_meanwhile("the passphrase was being checked")

    def change_passphrase(self, current: str, new: str, *, as_of: _Snapshot | None = None) -> None:
        """Wrap the master key under `new` in place of the passphrase slot; `current` must open the vault.

        Locked or unlocked, the vault stays as it was: proving the passphrase is not unlocking. The master key
        does not change, so nothing else is re-sealed, and backups taken before still open with `current`.
        """
        if not new:
            raise InvalidArgument("give a new passphrase")
        if hmac.compare_digest(new.encode(), current.encode()):
            raise InvalidArgument("the new passphrase is the current one")
        check_passphrase_strength(new)

        def new_slot(master: MasterKey, snapshot: _Snapshot) -> KeySlot:
            params = _stronger_argon2(self._argon2, [s.params for s in snapshot.slots if s.kind == "passphrase"])
            return make_slot(master, snapshot.vault_id, "passphrase", new, params)

        self._change_slots("passphrase", current, new_slot, "its passphrase was being changed", as_of)

    def replace_unlock_key(self, passphrase: str, unlock_key: str, *, as_of: _Snapshot | None = None) -> int:
        """Wrap the master key under a new `unlock_key` in place of every unlock key the vault had (how many
        is returned: they stop working now); `passphrase` must open the vault."""
        return self._change_slots("unlock_key", passphrase,
                                  lambda master, snapshot: make_slot(master, snapshot.vault_id, "unlock_key",
                                                                     unlock_key),
                                  "its unlock key was being replaced", as_of)

    def remove_unlock_keys(self, passphrase: str, *, as_of: _Snapshot | None = None) -> int:
        """Delete every unlock key slot (returns how many): only the passphrase opens the vault afterwards."""
        return self._change_slots("unlock_key", passphrase, None, "its unlock keys were being removed", as_of)

    def _change_slots(self, kind: str, passphrase: str, make: Callable[[MasterKey, _Snapshot], KeySlot] | None,
                      doing: str, as_of: _Snapshot | None) -> int:
        """Replace the slots of `kind` with what `make` wraps (none if None), proven by `passphrase`.

        The derivations (Argon2id: open the passphrase slot, wrap under a new passphrase) run outside the lock, so
        nothing else waits a second on them. The write happens only if the vault is still as it was read: two
        changes at once cannot both apply to the same slots (the second fails, nothing lost), and a lock()
        meanwhile wipes the key copy held here and fails the change rather than waiting on it.
        """
        snapshot = as_of or self.read_state()
        master = self._open(snapshot, "passphrase", passphrase)
        try:
            with self._lock:
                if not self._unchanged(snapshot, master):
                    raise _changed_meanwhile(doing)
                self._in_flight[id(master)] = master  # from here a lock() wipes it
            with self._kdf:
                slot = make(master, snapshot) if make is not None else None
            with self._lock:
                if not self._unchanged(snapshot, master):
                    raise _changed_meanwhile(doing)
                return self._replace_slots(kind, slot)
        finally:
            with self._lock:
                self._in_flight.pop(id(master), None)
            master.wipe()

    def _replace_slots(self, kind: str, slot: KeySlot | None) -> int:
        """In one transaction, delete the slots of `kind` and insert `slot` (if any); returns how many went.

        Then the file is rebuilt from its rows (the store's compact): the deleted slots are overwritten as they
        go (secure_delete), and this also clears what an older aegisd left in the free space, so a retired key
        cannot be carved out of vault.db, its log or a later backup."""
        with self._store.transaction() as conn:
            removed = conn.execute("DELETE FROM key_slots WHERE kind = ?", (kind,)).rowcount
            if slot is not None:
                _insert_slot(conn, slot)
        self._store.compact()
        return int(removed)

    def lock(self) -> bool:
        """Wipe the key material we hold; returns False if it was already locked.

        Also wipes the copies a key change holds while deriving outside the lock (that change then fails), and
        counts the lock, so an unlock or change that began before it cannot keep or use a key after it."""
        with self._lock:
            self._require_initialized()
            self._locks += 1
            for copy in self._in_flight.values():
                copy.wipe()
            if self._master is None:
                return False
            self._master.wipe()
            self._master, self._checks = None, {}
        self.notify("locked")
        return True

    def reopen(self, swap: Callable[[], None]) -> None:
        """Run `swap` (a restore replacing the database files) while nothing can unlock, then re-read the vault.

        Refused while unlocked: the key in memory would not belong to what comes back.
        """
        with self._lock:
            if self._master is not None:
                raise FailedPrecondition("the vault is unlocked; lock it first so nothing uses it while it is "
                                         "replaced", reason="vault_unlocked")
            swap()
            self.vault_id = self._read_meta("vault_id")
        self.notify("locked")

    def master(self) -> MasterKey:
        master = self._master
        if master is None:
            if self.vault_id is None:
                raise VaultUninitialized()
            raise VaultLocked()
        return master

    def counts(self) -> dict[str, int]:
        if self.vault_id is None:
            return {"credentials": 0, "agents": 0, "grants": 0, "key_slots": 0}
        with self._store.reading() as conn:
            return {table: int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608
                    for table in ("credentials", "agents", "grants", "key_slots")}

    # -- credentials -----------------------------------------------------------------------

    def add_credential(self, cred: Credential, secret: str) -> Credential:
        cred_rules.validate_credential(cred)
        data = cred_rules.validate_secret(secret, cred.auth_type)
        with self._lock:
            vault_id, master = self._require_initialized(), self.master()
            cred.id = uuid.uuid4().hex
            cred.created_at = cred.updated_at = cred.rotated_at = now_ms()
            nonce, ciphertext = seal_secret(master.subkey("secrets"), vault_id, cred, data)
            with self._store.transaction() as conn:
                self._check_unique(conn, cred)
                conn.execute(
                    f"INSERT INTO credentials ({CREDENTIAL_COLUMNS}, nonce, ciphertext) "  # noqa: S608
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", (*credential_row(cred), nonce, ciphertext))
        self.notify("credentials")
        return cred

    def checked_credentials(self, ids: AbstractSet[str] | None = None) -> list[SealCheck]:
        """Every credential row (or those with the given ids), in name order, and whether its seal holds
        (SealCheck): what listings, metrics, the expiry watch, doctor and the gate's routing table read.
        While locked every row is UNCHECKED.

        Checks are cached by the row's exact contents, so after a change only the rows it touched are opened
        again (opening all of 1,000 costs about 60 ms); an edited row is a different row. The cache holds
        secrets, so it goes at lock; a full pass replaces it, so it holds only rows that still exist.
        """
        vault_id = self._require_initialized()
        with self._lock, self._store.reading() as conn:
            if ids is None:
                rows = conn.execute(f"{SELECT_SEALED} ORDER BY name").fetchall()
            else:  # in batches under SQLite's limit on bound variables (999 in older builds)
                wanted = sorted(ids)
                rows = [row for i in range(0, len(wanted), 500) for row in conn.execute(
                    f"{SELECT_SEALED} WHERE id IN ({', '.join('?' * len(wanted[i:i + 500]))})",
                    wanted[i:i + 500])]
                rows.sort(key=lambda row: str(row[1]))
            known: dict[tuple[Any, ...], SealCheck] = {}
            checks = []
            for row in rows:
                key = _cache_key(row)
                check = known[key] = self._check(row, vault_id, key)
                checks.append(check)
            if self._master is not None and ids is None:
                self._checks = known
        return checks

    def check_credential(self, name: str) -> SealCheck:
        """One credential by name, checked like checked_credentials (for `vault show`)."""
        vault_id = self._require_initialized()
        with self._lock, self._store.reading() as conn:
            row = conn.execute(f"{SELECT_SEALED} WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"no credential named {name!r}", reason="credential_not_found")
            return self._check(row, vault_id, _cache_key(row))

    def _check(self, row: tuple[Any, ...], vault_id: str, cache_key: tuple[Any, ...]) -> SealCheck:
        """The cached check of this exact row (its _cache_key), else a fresh one. Call with the lock held."""
        if self._master is None:
            return _readable(row, UNCHECKED)
        return self._checks.get(cache_key) or _check_row(row, vault_id, self._master)

    def update_credential(self, name: str, changes: dict[str, Any], passphrase_proven: bool = False
                          ) -> tuple[Credential, list[str]]:
        """Apply metadata changes, resealing the secret with them; refused if its seal is already broken.

        A change that lets the secret go where it could not before (`widenings`) needs `passphrase_proven`: the
        socket alone must not be enough to point a secret at a host of the caller's and read it there. Returns
        the credential and those widenings (empty for any other change)."""
        with self._lock:
            vault_id, master = self._require_initialized(), self.master()
            # Scrubbed: the row's previous version (a wider allowlist, its seal still valid) must not wait in the
            # write-ahead log, where writing the data directory alone would be enough to put it back.
            with self._store.transaction(scrub=True) as conn:
                cred, data = open_sealed(conn, vault_id, master, "name", name)
                before = replace(cred)
                for key, value in changes.items():
                    setattr(cred, key, value)
                cred_rules.validate_credential(cred)
                widened = cred_rules.widenings(before, cred)
                if widened and not passphrase_proven:
                    raise PassphraseRequired(f"this change lets credential {name!r}'s secret go where it could "
                                             f"not before ({'; '.join(widened)}): it needs the vault's passphrase")
                if cred.auth_type != before.auth_type:
                    _check_secret_fits(data, cred.auth_type)
                cred.updated_at = now_ms()
                self._check_unique(conn, cred)
                nonce, ciphertext = seal_secret(master.subkey("secrets"), vault_id, cred, data)
                conn.execute(
                    "UPDATE credentials SET service=?, domains=?, auth_type=?, header_name=?, query_param=?, "
                    "scopes=?, rate_limit=?, body_inspection=?, updated_at=?, expires_at=?, nonce=?, ciphertext=? "
                    "WHERE id=?",
                    (cred.service, json.dumps(cred.domains), cred.auth_type, cred.header_name,
                     cred.query_param, json.dumps(cred.scopes), cred.rate_limit, cred.body_inspection,
                     cred.updated_at, cred.expires_at, nonce, ciphertext, cred.id))
        self.notify("credentials")
        return cred, widened

    def rotate_credential(self, name: str, secret: str) -> Credential:
        """Seal a new secret with the credential's metadata, which must open with the old one: a rotate must
        not give metadata edited outside aegisd a fresh seal (remove the credential and add it again)."""
        with self._lock:
            vault_id, master = self._require_initialized(), self.master()
            with self._store.reading() as conn:
                cred, _ = open_sealed(conn, vault_id, master, "name", name)
            data = cred_rules.validate_secret(secret, cred.auth_type)
            nonce, ciphertext = seal_secret(master.subkey("secrets"), vault_id, cred, data)
            cred.rotated_at = cred.updated_at = now_ms()
            with self._store.transaction(scrub=True) as conn:
                conn.execute("UPDATE credentials SET nonce=?, ciphertext=?, rotated_at=?, updated_at=? "
                             "WHERE id=?", (nonce, ciphertext, cred.rotated_at, cred.updated_at, cred.id))
        self.notify("credentials")
        return cred

    def remove_credential(self, name: str, by_id: bool = False) -> int:
        """Delete the credential and its grants; returns how many grants went with it.

        By name, only a credential that opens: its name is sealed with it, so a name moved onto another
        row cannot point the removal elsewhere. By id, only a row that fails to open (never served).
        """
        with self._lock:
            vault_id, master = self._require_initialized(), self.master()
            with self._store.transaction(scrub=True) as conn:
                if not by_id:
                    cred_id = open_sealed(conn, vault_id, master, "name", name)[0].id
                else:
                    cred_id = name
                    try:
                        open_sealed(conn, vault_id, master, "id", cred_id)
                    except StorageCorrupt:
                        pass  # fails to open: what removing by id is for
                    else:
                        raise FailedPrecondition(f"credential {cred_id!r} opens; remove it by its name",
                                                 reason="remove_by_name")
                if conn.execute("SELECT count(*) FROM credentials WHERE id = ?", (cred_id,)).fetchone()[0] != 1:
                    raise StorageCorrupt(f"more than one credential row has id {cred_id!r}: vault.db was rebuilt "
                                         "outside aegisd; restore a good backup", reason="tampered")
                grants = int(conn.execute("SELECT count(*) FROM grants WHERE credential_id = ?",
                                          (cred_id,)).fetchone()[0])
                conn.execute("DELETE FROM credentials WHERE id = ?", (cred_id,))
        self.notify("credentials")
        return grants

    # -- internals -------------------------------------------------------------------------

    def _require_initialized(self) -> str:
        if self.vault_id is None:
            raise VaultUninitialized()
        return self.vault_id

    def _check_unique(self, conn: sqlite3.Connection, cred: Credential) -> None:
        for column in ("name", "service"):
            row = conn.execute(f"SELECT name FROM credentials WHERE {column} = ? AND id != ?",  # noqa: S608
                               (getattr(cred, column), cred.id)).fetchone()
            if row and column == "name":
                raise AlreadyExists(f"there is already a credential named {cred.name!r}")
            if row:  # its own reason: the fix is another service, or changing the credential that holds it
                raise AlreadyExists(f"there is already credential {row[0]!r} for service {cred.service!r} "
                                    "(one credential per service)", reason="service_taken")

    def _slots(self) -> list[KeySlot]:
        with self._store.reading() as conn:
            rows = conn.execute("SELECT id, kind, kdf, params, salt, nonce, wrapped FROM key_slots "
                                "ORDER BY id").fetchall()
        try:
            return [KeySlot(id=r[0], kind=r[1], kdf=r[2], params=json.loads(r[3]), salt=r[4], nonce=r[5],
                            wrapped=r[6]) for r in rows]
        except (ValueError, TypeError):
            raise StorageCorrupt(f"a key slot in {self._store.path} is malformed") from None

    # -- rows from an older aegisd -------------------------------------------------------------

    def older_rows(self) -> OlderRows:
        """What an older aegisd wrote and this one does not trust yet: secrets sealed without their metadata,
        agent and grant rows without a MAC. The gate serves none of it until an operator adopts it."""
        vault_id, master = self._require_initialized(), self.master()
        with self._store.reading() as conn:
            return adoption.find_older_rows(conn, vault_id, master)

    def adopt_older_rows(self, expected: str) -> OlderRows:
        """Trust exactly what older_rows listed, as it stands, in one write. `expected` is the listing's digest
        as the operator saw it: if anything changed since, nothing is adopted (FailedPrecondition)."""
        with self._lock:
            vault_id, master = self._require_initialized(), self.master()
            with self._store.transaction(scrub=True) as conn:  # an older row's secret is replaced by its sealed form
                older = adoption.find_older_rows(conn, vault_id, master)
                if older.digest() != expected:
                    raise FailedPrecondition("what an older aegisd wrote changed since it was listed; list it again "
                                             "and check it", reason="older_rows_changed")
                adoption.adopt(conn, vault_id, master, older)
        if older:
            log.warning("adopted what an older aegisd wrote: %s", older.summary())
            self.notify("credentials")
        return older

    def _warn_if_older_rows(self) -> None:
        """At unlock: say once, in the log, that rows from an older aegisd wait for `aegisctl vault adopt`."""
        try:
            older = self.older_rows()
        except Exception as exc:  # the unlock itself has succeeded; this is advice
            log.warning("could not look for rows from an older aegisd: %s", log_safe(exc))
            return
        if older:
            log.warning("%s from an older aegisd are not served until an operator checks them and runs "
                        "`aegisctl vault adopt`", older.summary())

    def _read_meta(self, key: str) -> str | None:
        with self._store.reading() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else None


def _open_slots(vault_id: str, all_slots: list[KeySlot], kind: str, secret: str) -> MasterKey:
    """The master key from the first slot of `kind` that `secret` opens (a new copy the caller owns);
    WrongPassphrase if none does, StorageCorrupt if none could be read at all. Slow (Argon2id): call it without
    the vault's lock, on slots read under it."""
    slots = [s for s in all_slots if s.kind == kind]
    if not slots:
        if kind == "unlock_key":  # not a wrong guess: nothing to guess against
            raise FailedPrecondition("this vault has no unlock key; unlock it with the passphrase",
                                     reason="no_unlock_key")
        raise WrongPassphrase("this vault has no passphrase slot")
    damaged = []
    for slot in slots:
        try:
            return open_slot(slot, vault_id, secret)
        except WrongKey:
            continue
        except SlotDamaged as exc:
            damaged.append(str(exc))
    if len(damaged) == len(slots):  # no secret could open these: say so, not "wrong passphrase"
        raise StorageCorrupt(f"{'; '.join(damaged)}: restore vault.db from a backup with aegisd stopped (a restore "
                             "through aegisd keeps the vault's key slots; docs/operations.md says how)",
                             reason="key_slot_damaged")
    raise WrongPassphrase(f"wrong {'passphrase' if kind == 'passphrase' else 'unlock key'}")


class PassphraseRequired(FailedPrecondition):
    """A change the control socket alone must not make (a credential update that widens where its secret may go,
    an adoption of an older aegisd's rows), asked without the passphrase: nothing changed."""

    reason = "passphrase_required"


class VaultChanged(FailedPrecondition):
    """A key derivation outside the lock succeeded, but found the vault changed (slots replaced, locked, restored)
    when done: nothing was changed. Raised only once the secret given has opened the slots it read, so it also
    says that secret was right (a wrong one raises WrongPassphrase first): the control service logs it, or a
    right guess raced with a lock would leave no trace."""

    reason = "vault_changed"


def _changed_meanwhile(doing: str) -> VaultChanged:
    """The VaultChanged a derivation outside the lock raises when the vault changed while it ran."""
    return VaultChanged(f"the vault changed while {doing} (another key change, a lock or a restore); "
                        "nothing was changed: try again")


def _check_secret_fits(data: bytes, auth_type: str) -> None:
    """A change of auth type must suit the stored secret (basic needs user:password). Only that rule: a secret
    stored before today's other rules (whitespace, say) must not block unrelated changes to its credential."""
    if auth_type == "basic" and b":" not in data:
        raise InvalidArgument("the stored secret does not suit auth type 'basic' (a basic-auth secret must be "
                              "'user:password'): rotate it to one that does first")


def _stronger_argon2(configured: Mapping[str, int], existing: list[dict[str, Any]]) -> dict[str, int]:
    """Argon2id settings for a new passphrase slot: the configured cost, raised to any stronger setting the slots
    it replaces had, so a passphrase change never weakens what guards a stolen vault.db."""
    params = dict(configured)
    for old in existing:
        for name, value in old.items():
            if name in params and isinstance(value, int) and value > params[name]:
                params[name] = value
    return params


def _insert_slot(conn: sqlite3.Connection, slot: KeySlot) -> None:
    conn.execute("INSERT INTO key_slots (kind, kdf, params, salt, nonce, wrapped, created_at) "
                 "VALUES (?,?,?,?,?,?,?)",
                 (slot.kind, slot.kdf, json.dumps(slot.params), slot.salt, slot.nonce, slot.wrapped, now_ms()))


def _cache_key(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A row's values with their types: 5 and 5.0 are equal in Python but not as aegisd wrote them."""
    return row, tuple(map(type, row))


def _check_row(row: tuple[Any, ...], vault_id: str, master: MasterKey) -> SealCheck:
    """Open a row of SELECT_SEALED with its own metadata, or say why it does not open: sealed by an older
    aegisd (NOT_ADOPTED) or changed outside aegisd (TAMPERED)."""
    key = master.subkey("secrets")
    try:
        cred, secret = open_row(row, vault_id, key)
    except (SealBroken, ValueError, TypeError, AttributeError):
        return _readable(row, NOT_ADOPTED if adoption.older_credential(row, vault_id, key) is not None else TAMPERED)
    return SealCheck(cred, OK, secret, bytes(row[-2]) + bytes(row[-1]))


def _readable(row: tuple[Any, ...], status: str) -> SealCheck:
    """A row that is not (or cannot now be) authenticated, as it reads, for display. A row too malformed to
    read at all (edited by hand) is shown by its id and name alone, every other field empty (auth and
    inspection unknown), as failing: listed, so it can be removed."""
    try:
        return SealCheck(credential_from_row(row), status)
    except (ValueError, TypeError):
        return SealCheck(Credential(id=str(row[0]), name=str(row[1]), service="", domains=[], auth_type="",
                                    scopes=[], body_inspection=""), TAMPERED)


def open_sealed(conn: sqlite3.Connection, vault_id: str, master: MasterKey, column: str,
                 value: str) -> tuple[Credential, bytes]:
    """Read one credential (by id or name) with its sealed secret, and open it."""
    row = conn.execute(f"{SELECT_SEALED} WHERE {column} = ?", (value,)).fetchone()
    if row is None:
        raise NotFound(f"no credential {'named ' if column == 'name' else 'with id '}{value!r}",
                       reason="credential_not_found")
    check = _check_row(row, vault_id, master)
    if check.status == NOT_ADOPTED:
        raise StorageCorrupt(f"credential {row[1]!r} ({row[0]}) comes from an older aegisd and is not trusted "
                             "yet: check `aegisctl vault adopt`, or remove the row by its id",
                             reason="not_adopted")
    if check.status != OK or check.secret is None:
        raise StorageCorrupt(
            f"credential {row[1]!r} ({row[0]}) fails authentication: its sealed secret, or the metadata sealed "
            "with it (service, allowlist, auth, scopes, limits, inspection, expiry), was changed outside aegisd "
            f"or moved; remove the row (`aegisctl vault remove --id {row[0]}`) and add the credential again as "
            "you intend it",
            reason="tampered")
    return check.credential, check.secret
