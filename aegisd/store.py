"""The vault database: one SQLite file in the data directory, WAL, versioned migrations.

Every sqlite3 error leaves here translated into an AegisError that says what is wrong
with the file or the disk, and every write happens in one transaction, so a failure
never leaves a half-written change behind.

What is deleted is gone from the files, not only from the rows: a retired key slot (its salt and
wrapped master key) opens the vault for whoever holds the retired secret, and a retired credential's
sealed secret opens for whoever gets the master key. So every connection that writes a vault file
overwrites deleted content (`secure_delete`, off in SQLite's default build), each commit folds the
write-ahead log into the file and empties it when it deleted or replaced secret material (the log's frames
hold earlier images of the pages), a vault
is compacted when it is opened (residue an older aegisd left) and after each key slot change, and a
backup's copy is built from the live rows (`VACUUM INTO`), never a page copy with the free space.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aegisd.errors import AegisError, StorageCorrupt, StorageFull, StorageReadOnly, StorageUnavailable

log = logging.getLogger(__name__)

APPLICATION_ID = 0x41454753  # "AEGS": marks the file as an aegis vault
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE key_slots (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('passphrase', 'unlock_key')),
        kdf TEXT NOT NULL,
        params TEXT NOT NULL,
        salt BLOB NOT NULL,
        nonce BLOB NOT NULL,
        wrapped BLOB NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE credentials (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        service TEXT NOT NULL UNIQUE,
        domains TEXT NOT NULL,
        auth_type TEXT NOT NULL,
        header_name TEXT NOT NULL DEFAULT '',
        query_param TEXT NOT NULL DEFAULT '',
        scopes TEXT NOT NULL,
        rate_limit TEXT NOT NULL DEFAULT '',
        body_inspection TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        rotated_at INTEGER NOT NULL,
        expires_at INTEGER,
        nonce BLOB NOT NULL,
        ciphertext BLOB NOT NULL
    );
    CREATE TABLE agents (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        token_hash BLOB NOT NULL UNIQUE,
        rate_limit TEXT NOT NULL DEFAULT '',
        created_at INTEGER NOT NULL,
        rotated_at INTEGER NOT NULL
    );
    CREATE TABLE grants (
        agent_id TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
        credential_id TEXT NOT NULL REFERENCES credentials(id) ON DELETE CASCADE,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (agent_id, credential_id)
    );
    CREATE INDEX grants_by_credential ON grants(credential_id);
    """,
    # 2: webhooks. URL and signing secret are sealed together (AES-GCM, AAD binds the webhook id);
    # only the URL's origin is kept in clear, for `webhook list` while the vault is locked.
    """
    CREATE TABLE webhooks (
        id TEXT PRIMARY KEY,
        origin TEXT NOT NULL,
        events TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        nonce BLOB NOT NULL,
        sealed BLOB NOT NULL
    );
    """,
    # 3: a MAC on each agent and grant row (aegisd.vault.records); NULL in rows written before it.
    """
    ALTER TABLE agents ADD COLUMN mac BLOB;
    ALTER TABLE grants ADD COLUMN mac BLOB;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def translate(exc: sqlite3.Error, path: Path) -> AegisError:
    """Turn a sqlite3 error into a message about the file or disk, never a traceback."""
    name = getattr(exc, "sqlite_errorname", "")
    if name.startswith("SQLITE_FULL") or "disk is full" in str(exc):
        return StorageFull(f"the disk holding {path.parent} is full; free some space and retry")
    if name.startswith("SQLITE_READONLY") or "readonly" in str(exc):
        return StorageReadOnly(f"{path} is read-only; make the data directory writable for aegisd")
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "not a database" in str(exc):
        return StorageCorrupt(f"{path} is corrupt or not an aegis database; restore it from a backup")
    if name.startswith(("SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_PERM")):
        return StorageUnavailable(f"cannot read or write {path}: {exc}")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return StorageUnavailable(f"{path} is locked by another process; is a second aegisd running?")
    return StorageUnavailable(f"database error on {path}: {exc}")


def connect_for_writing(path: Path | str, **kwargs: Any) -> sqlite3.Connection:
    """A connection that may write a vault file: SQLite then overwrites what a write deletes (a row, a cell an
    update moves, a page it frees) with zeros, instead of only marking it free. SQLite's default build does not;
    some (Debian's) do. Raises sqlite3.Error, which the caller translates."""
    conn: sqlite3.Connection = sqlite3.connect(path, **kwargs)
    try:
        if conn.execute("PRAGMA secure_delete = ON").fetchone()[0] != 1:
            raise sqlite3.OperationalError("this SQLite cannot overwrite deleted content (secure_delete)")
    except BaseException:
        conn.close()
        raise
    return conn


BUSY_TIMEOUT_MS = 2000  # how long a write waits for another process's lock on the file

class ReplacedNotOpened(StorageUnavailable):
    """A restore moved its vault file into place, but opening it failed: the file in place is the restored one."""


class VaultStore:
    """Serialised access to the vault database from the daemon's worker threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._reopen = False  # a restored file failed to open: try again at the next use (the disk freed, say)

    def open(self) -> None:
        """Open (creating if absent), check it is ours and intact, and migrate it."""
        fresh = not self.path.exists()
        if fresh:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            os.close(fd)
        try:
            conn = connect_for_writing(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise translate(exc, self.path) from None
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._check_identity(conn)
            self._migrate(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise translate(exc, self.path) from None
        except AegisError:
            conn.close()
            raise
        self._compact(conn)
        self._conn = conn

    def compact(self) -> None:
        """Rebuild the file from its live rows (VACUUM), so nothing deleted before, by this aegisd or an older one
        whose SQLite left deleted content in place, is left in its free space; then empty the write-ahead log.
        After a key slot change, which has committed already: a failure is logged, not raised."""
        with self._lock:
            try:
                conn = self._require()
            except AegisError as exc:
                log.warning("could not compact %s (%s): content deleted before may remain in its free space until "
                            "the next start or key change", self.path, exc.message)
                return
            self._compact(conn)

    def _compact(self, conn: sqlite3.Connection) -> None:
        """At each open (a vault that an older aegisd, or a restored backup, left residue in) and after each key
        slot change. Small (a few ms): the vault holds key slots, credentials, agents and webhooks. A failure (a
        full disk: VACUUM needs about the file's size again) is logged and leaves the file as it was."""
        try:
            conn.execute("VACUUM")
        except sqlite3.Error as exc:
            log.warning("could not compact %s (%s): content deleted before may remain in its free space until the "
                        "next start or key change", self.path, translate(exc, self.path).message)
        finally:  # needs no space: the deleted slot's page images leave the log even when VACUUM could not run
            self._truncate_log(conn)

    def _truncate_log(self, conn: sqlite3.Connection) -> None:
        """Fold the write-ahead log into the file and truncate it to nothing: its frames hold the pages as they were
        before the writes since the last checkpoint (a deleted key slot among them). The commit stands whatever
        happens here; a reader in another process can keep the log from being emptied (then it is logged)."""
        try:  # without waiting: a reader in another process would hold the store's lock (and Status) for 2 s
            conn.execute("PRAGMA busy_timeout = 0")
            try:
                busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            finally:
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except sqlite3.Error as exc:
            log.warning("could not empty %s-wal (%s): earlier page images stay in it until the next write",
                        self.path, translate(exc, self.path).message)
            return
        if busy:
            log.warning("could not empty %s-wal: another process is reading the vault; earlier page images stay in "
                        "it until the next write", self.path)

    def close(self) -> None:
        with self._lock:
            self._reopen = False
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def backup_to(self, dest: Path) -> None:
        """A consistent copy at `dest` (empty or absent), self-contained: no -wal file needed.

        Built from the rows (`VACUUM INTO`, one read transaction under the store's lock), not copied page by page:
        a page copy (SQLite's backup API) carries the file's free space, and with it whatever was deleted without
        being overwritten (a key slot an older aegisd removed). The copy has no free pages and no deleted cells.
        """
        with self._lock:
            conn = self._require()
            try:
                conn.execute("VACUUM INTO ?", (str(dest),))
                target = connect_for_writing(dest)
                try:
                    target.execute("PRAGMA journal_mode = DELETE")  # no -wal beside the copy, whatever SQLite's version
                finally:
                    target.close()
            except sqlite3.Error as exc:
                raise translate(exc, dest) from None

    def check_replaceable(self, staged: Path) -> None:
        """What replace_with needs, checked before a restore replaces anything (the ledger goes first).

        `staged` is opened the way open() will open it after the move (migrated, so that open has little left to
        write), and the file in place must be checkpointable (no other process reading it) in a directory
        aegisd may write. Another process may still open the vault between this and the swap; replace_with
        checks again.
        """
        trial = VaultStore(staged)
        trial.open()
        try:
            with trial.reading() as conn:
                conn.execute("PRAGMA journal_mode = DELETE")  # fold the trial's log in: only the file moves
        finally:
            trial.close()
        with self._lock:
            if self._conn is not None:
                self._checkpoint(self._conn)
        if not os.access(self.path.parent, os.W_OK | os.X_OK):
            raise StorageReadOnly(f"{self.path.parent} is not writable by aegisd, so {self.path.name} cannot be "
                                  "replaced; make the data directory writable for aegisd")

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        """Fold the log into the file and empty it, or raise if another process is reading the file. A commit that
        scrubbed leaves the log empty already (_truncate_log), and a reader holds up no checkpoint of an empty log:
        one frame is written first (the application id, as it is), so a reader elsewhere is found all the same."""
        try:
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.Error as exc:
            raise translate(exc, self.path) from None
        if busy:
            raise StorageUnavailable(f"{self.path} is open in another process, so its log cannot be folded "
                                     "in; close that and run the restore again")

    def replace_with(self, staged: Path) -> None:
        """Swap the database file for `staged` (a validated restore) and open that; readers wait meanwhile.

        The old file is checkpointed into itself and its -wal and -shm removed before the move: SQLite
        would replay an old WAL onto the new file, so a -wal that cannot be removed stops the swap while
        the old file is still whole. If anything before the move fails, the old file is opened again and
        the error is raised; once the move is done, the restored file is the one opened, and if that fails
        ReplacedNotOpened says so and each later use of the store tries to open it again.
        """
        with self._lock:
            if self._conn is not None:
                self._checkpoint(self._conn)
                self._conn.close()
                self._conn = None
            try:
                for suffix in ("-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"{self.path}{suffix}")
                os.replace(staged, self.path)
            except BaseException:
                self.open()
                raise
            try:
                fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                log.error("the restored vault is in place, but syncing %s failed (%s): a power loss now could bring "
                          "back the old one", self.path.parent, exc.strerror or exc)
            try:
                self.open()
            except AegisError as exc:
                self._reopen = True
                log.error("the restored vault is in place but cannot be opened (%s); aegisd tries again at its "
                          "next use", exc.message)
                raise ReplacedNotOpened(exc.message) from None

    @contextlib.contextmanager
    def transaction(self, *, scrub: bool = False) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: all of it commits, or none of it does. `scrub`: it deletes or replaces secret
        material (a sealed secret, a webhook's secret), so the write-ahead log, whose frames hold the pages as they
        were, is emptied after the commit (about 10 ms: it syncs the file), not left until SQLite's own checkpoint."""
        with self._lock:
            conn = self._require()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise translate(exc, self.path) from None
            if scrub:
                self._truncate_log(conn)

    @contextlib.contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._require()
            try:
                yield conn
            except sqlite3.Error as exc:
                raise translate(exc, self.path) from None

    def schema_version(self) -> int:
        with self.reading() as conn:
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            return int(row[0]) if row else 0

    def _require(self) -> sqlite3.Connection:
        if self._conn is None and self._reopen:
            self.open()  # raises why while the restored file still cannot be opened
            self._reopen = False
            log.info("the restored vault %s is open now", self.path)
        if self._conn is None:
            raise StorageUnavailable(f"{self.path} is not open")
        return self._conn

    def _check_identity(self, conn: sqlite3.Connection) -> None:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id not in (0, APPLICATION_ID) or (app_id == 0 and tables):
            raise StorageCorrupt(f"{self.path} is not an aegis vault database; move it away or point "
                                 "--data-dir elsewhere")
        result = conn.execute("PRAGMA quick_check").fetchone()[0]
        if result != "ok":
            raise StorageCorrupt(f"{self.path} failed its integrity check ({result}); restore it from a backup")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            current = int(row[0]) if row else 0
            if current > SCHEMA_VERSION:
                raise StorageCorrupt(f"{self.path} has schema version {current}, newer than this aegisd "
                                     f"understands ({SCHEMA_VERSION}); upgrade aegisd")
            for script in MIGRATIONS[current:]:
                for statement in filter(str.strip, script.split(";")):
                    conn.execute(statement)
            if row is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            else:
                conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
