"""The backup file: one uncompressed tar holding manifest.json, vault.db and ledger.db, and its checks.

A tar because any system can list and unpack it (`tar tf`), and because it streams: the daemon sends
it a chunk at a time from the snapshot files, manifest first. Nothing in it is in clear that is not
already in clear in the data directory: the secrets stay sealed inside vault.db.

`read_backup` accepts an archive only when every check passes (members, manifest, sizes, SHA-256,
each database opens, is ours, passes `PRAGMA integrity_check` and has a schema this aegisd knows), and
only then are the databases left in the staging directory for the swap. `check_databases` is the part of
those checks that reads the databases; a backup's snapshot runs it too, so no backup is written that a
restore would refuse.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sqlite3
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from aegisd.errors import InvalidArgument
from aegisd.ledger import schema as ledger_schema
from aegisd.ledger.integrity import describe, integrity_problems
from aegisd.store import APPLICATION_ID as VAULT_APPLICATION_ID
from aegisd.store import MIGRATIONS as VAULT_MIGRATIONS
from aegisd.store import SCHEMA_VERSION as VAULT_SCHEMA_VERSION

FORMAT = "aegis-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VAULT_DB = "vault.db"
LEDGER_DB = "ledger.db"
DATABASES = (VAULT_DB, LEDGER_DB)
CHUNK = 1 << 20  # bytes per gRPC message, both ways
MAX_MANIFEST = 1 << 20
# Python's tarfile parses a PAX header in time quadratic in its length (CVE-2024-6232): a 1 MiB one holds the
# daemon for half an hour. Ours carry none; a few KiB is far past any a tar tool writes for our three names.
MAX_EXTENDED_HEADER = 4 << 10
MAX_HEADERS = 12  # three members, each with at most a PAX and a GNU long-name header, with room to spare
# created_ms must be a time iso_time (datetime) can print: up to the end of the year 9999.
MAX_CREATED_MS = 253402300799999
MAX_FIELD = 2**62  # any other count or size: far past real ones, inside SQLite's and protobuf's int64
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE


class InvalidBackup(InvalidArgument):
    """The file is not a whole, intact Aegis backup; nothing was changed."""

    reason = "invalid_backup"


@dataclass(frozen=True)
class Member:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What manifest.json says, once checked against the databases it describes."""

    created_ms: int
    aegisd_version: str
    vault_id: str
    vault_schema_version: int
    ledger_schema_version: int
    members: dict[str, Member]
    counts: dict[str, int] = field(default_factory=dict)
    # Read from ledger.db once it passed its checks, never from manifest.json (which does not hold it): the newest
    # row the chain authenticates, so what a restore records of the backup's age does not rest on the manifest.
    newest_chained: NewestRow | None = None

    def to_json(self) -> bytes:
        return json.dumps({
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_ms": self.created_ms,
            "aegisd_version": self.aegisd_version,
            "vault_id": self.vault_id,
            "vault_schema_version": self.vault_schema_version,
            "ledger_schema_version": self.ledger_schema_version,
            "counts": self.counts,
            "members": {name: {"size": m.size, "sha256": m.sha256} for name, m in self.members.items()},
        }, indent=2).encode() + b"\n"


@dataclass(frozen=True)
class NewestRow:
    """The ledger's newest chained row: its id and time_ms, both covered by its MAC (None: not an integer)."""

    id: int
    time_ms: int | None


@dataclass(frozen=True)
class Contents:
    """What a pair of databases that passed every check holds, in the terms the manifest states it."""

    vault_id: str | None  # None: the vault was never initialised
    vault_schema_version: int
    ledger_schema_version: int
    counts: dict[str, int]
    newest_chained: NewestRow | None


def file_digest(path: Path) -> Member:
    """Size and SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return Member(size, digest.hexdigest())


def tar_stream(manifest: Manifest, directory: Path, mtime: int) -> Iterator[bytes]:
    """The archive in chunks of at most CHUNK bytes, read from `directory` as it goes (constant memory)."""
    sent = 0

    def piece(data: bytes) -> bytes:
        nonlocal sent
        sent += len(data)
        return data

    def header(name: str, size: int) -> bytes:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime, info.type = size, 0o600, mtime, tarfile.REGTYPE
        return info.tobuf(format=tarfile.PAX_FORMAT)

    def padding(size: int) -> bytes:
        return bytes(-size % _BLOCK)

    body = manifest.to_json()
    yield piece(header(MANIFEST, len(body)) + body + padding(len(body)))
    for name in DATABASES:
        expected = manifest.members[name].size
        yield piece(header(name, expected))
        read = 0
        with (directory / name).open("rb") as fh:
            while chunk := fh.read(CHUNK):
                read += len(chunk)
                yield piece(chunk)
        if read != expected:
            raise OSError(f"snapshot {name} changed size while it was sent")
        yield piece(padding(expected))
    end = bytes(2 * _BLOCK)
    yield piece(end + bytes(-(sent + len(end)) % _RECORD))


def read_backup(archive: Path, staging: Path) -> Manifest:
    """Check everything about `archive`, leaving its databases in `staging` (fsynced) if it passes."""
    try:
        with _BoundedTar.open(archive, mode="r:") as tar:
            members = _members(tar)
            manifest = _manifest(tar, members[MANIFEST])
            for name in DATABASES:
                _extract(tar, members[name], manifest.members[name], staging / name)
    except (tarfile.TarError, EOFError) as exc:
        raise InvalidBackup(f"the backup is not a complete tar archive (truncated or damaged: {exc})") from None
    found = check_databases(staging, " in the backup")
    if found.vault_id is None:
        raise InvalidBackup("the backup holds no vault (it was taken before `aegisctl init`)")
    if found.vault_id != manifest.vault_id or found.vault_schema_version != manifest.vault_schema_version:
        raise InvalidBackup("the backup's vault does not match its manifest")
    if found.ledger_schema_version != manifest.ledger_schema_version:
        raise InvalidBackup("the backup's ledger does not match its manifest")
    _check_counts(manifest.counts, found.counts)
    return Manifest(manifest.created_ms, manifest.aegisd_version, manifest.vault_id, manifest.vault_schema_version,
                    manifest.ledger_schema_version, manifest.members, found.counts, found.newest_chained)


def check_databases(directory: Path, where: str) -> Contents:
    """Every check a restore makes of vault.db and ledger.db in `directory` by reading them, and what they hold.

    InvalidBackup names the file and `where` it is (" in the backup"). A backup's snapshot runs the same checks on
    its copies (where ""), so that a backup is refused when it is taken, not when it is needed."""
    vault_version, vault_id, counts = _check_vault(directory / VAULT_DB, f"{VAULT_DB}{where}")
    ledger_version, counts["ledger_rows"], newest = _check_ledger(directory / LEDGER_DB, f"{LEDGER_DB}{where}")
    return Contents(vault_id, vault_version, ledger_version, counts, newest)


class _BoundedHeader(tarfile.TarInfo):
    """tarfile's own header parsing, refusing (before tarfile reads it) an extended header past
    MAX_EXTENDED_HEADER, more than MAX_HEADERS headers in all, and GNU sparse headers (an old-GNU sparse member,
    whose extension blocks tarfile reads without bound, or a `GNU.sparse.*` PAX record, whose values tarfile
    parses with int() and split()): Aegis writes none. The bound sits in the methods tarfile itself
    calls, so it sees exactly the headers tarfile parses (a hand-written walk of the blocks drifted from it).
    InvalidBackup is no tarfile.HeaderError, so tarfile passes it on rather than reading it as the end."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> Self:
        # Every header, extended ones (which tarfile reads by recursing into this) included.
        if not isinstance(tar, _BoundedTar):
            raise TypeError("a bounded header is read only through _BoundedTar")
        tar.headers += 1
        if tar.headers > MAX_HEADERS:
            raise InvalidBackup(f"the backup has more than {MAX_HEADERS} tar headers; an Aegis backup has "
                                "three members")
        return super().fromtarfile(tar)

    def _proc_pax(self, tar: tarfile.TarFile) -> tarfile.TarInfo:  # PAX headers, extended and global
        self._refuse_if_large()
        if _SPARSE_KEY in _peek(tar, self._block(self.size)):  # type: ignore[attr-defined]
            raise InvalidBackup(_SPARSE_REFUSED)
        return super()._proc_pax(tar)  # type: ignore[misc, no-any-return]

    def _proc_gnulong(self, tar: tarfile.TarFile) -> tarfile.TarInfo:  # GNU long names and links, read whole
        self._refuse_if_large()
        return super()._proc_gnulong(tar)  # type: ignore[misc, no-any-return]

    def _proc_sparse(self, tar: tarfile.TarFile) -> tarfile.TarInfo:  # an old-GNU sparse member, before its blocks
        raise InvalidBackup(_SPARSE_REFUSED)

    def _refuse_if_large(self) -> None:
        if not 0 <= self.size <= MAX_EXTENDED_HEADER:  # a base-256 size can be negative: tarfile reads to the end
            raise InvalidBackup(f"the backup has an extended tar header of {self.size} bytes (at most "
                                f"{MAX_EXTENDED_HEADER}); an Aegis backup has none that large: it was edited")


_SPARSE_KEY = b"GNU.sparse."
_SPARSE_REFUSED = "the backup has a GNU sparse tar header, which an Aegis backup never has: it was edited"


def _peek(tar: tarfile.TarFile, size: int) -> bytes:
    """The next `size` bytes of the archive (an extended header's records, at most MAX_EXTENDED_HEADER rounded up
    to a block), leaving tarfile's position where it was."""
    fileobj = tar.fileobj
    assert fileobj is not None
    here = fileobj.tell()
    try:
        return bytes(fileobj.read(size))
    finally:
        fileobj.seek(here)


class _BoundedTar(tarfile.TarFile):
    tarinfo = _BoundedHeader
    headers = 0  # read so far, by _BoundedHeader.fromtarfile

    def next(self) -> tarfile.TarInfo | None:
        """tarfile's next header; its own parsing errors other than TarError (ValueError from a malformed number in
        a PAX record, an offset past any a file can have) are an invalid backup too, not an internal error."""
        try:
            return super().next()
        except (ValueError, IndexError, OverflowError) as exc:
            raise InvalidBackup(f"the backup is not a complete tar archive (truncated or damaged: {exc})") from None


# The methods _BoundedHeader hooks must be ones this Python's tarfile has, or the bounds would silently be gone.
if not all(callable(getattr(tarfile.TarInfo, name, None)) for name in ("_proc_pax", "_proc_gnulong", "_proc_sparse",
                                                                      "_block")):
    raise ImportError("this Python's tarfile has no TarInfo._proc_pax, _proc_gnulong, _proc_sparse or _block to bound")


def _members(tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    found: dict[str, tarfile.TarInfo] = {}
    for info in tar:
        if info.name in found:
            raise InvalidBackup(f"the backup holds {info.name} twice")
        if info.name not in (MANIFEST, *DATABASES):
            raise InvalidBackup(f"the backup holds an unexpected member {info.name!r}; is it an Aegis backup?")
        if not info.isreg():
            raise InvalidBackup(f"{info.name} in the backup is not a regular file")
        found[info.name] = info
    missing = [name for name in (MANIFEST, *DATABASES) if name not in found]
    if missing:
        raise InvalidBackup(f"the backup is missing {', '.join(missing)} (truncated, or not an Aegis backup)")
    return found


def _manifest(tar: tarfile.TarFile, info: tarfile.TarInfo) -> Manifest:
    if info.size > MAX_MANIFEST:
        raise InvalidBackup("the backup's manifest is implausibly large")
    fh = tar.extractfile(info)
    assert fh is not None  # a regular file, checked above
    raw = fh.read()
    if len(raw) != info.size:
        raise InvalidBackup("the backup's manifest is truncated")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise InvalidBackup("the backup's manifest is not valid JSON") from None
    except RecursionError:  # nesting deeper than any manifest has
        raise InvalidBackup("the backup's manifest is nested too deeply to be an Aegis manifest") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InvalidBackup("the manifest does not describe an Aegis backup")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise InvalidBackup(f"the backup has format version {version}, newer than this aegisd reads "
                                f"({FORMAT_VERSION}); upgrade aegisd")
        raise InvalidBackup(f"the backup has an unknown format version {version!r}")
    try:
        members = {name: Member(_int(data["members"][name]["size"]), _hex(data["members"][name]["sha256"]))
                   for name in DATABASES}
        return Manifest(_int(data["created_ms"], MAX_CREATED_MS), _version(data.get("aegisd_version", "")),
                        _text(data["vault_id"]), _int(data["vault_schema_version"]),
                        _int(data["ledger_schema_version"]), members, _counts(data.get("counts", {})))
    except (KeyError, TypeError, ValueError):
        raise InvalidBackup("the backup's manifest is missing fields or has malformed ones") from None


def _int(value: Any, limit: int = MAX_FIELD) -> int:
    """A non-negative integer no larger than `limit`: bounded here so nothing later (a time printed, an int64
    field) fails on it once the restore has begun."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise ValueError("not a non-negative integer in range")
    return value


COUNTED = ("credentials", "agents", "grants", "ledger_rows")  # what the manifest counts, as aegisctl shows them


def _counts(value: Any) -> dict[str, int]:
    """The manifest's counts (optional, and each of them too): checked against the databases once they are read."""
    if not isinstance(value, dict):
        raise ValueError("counts is not an object")
    return {name: _int(value[name]) for name in COUNTED if name in value}


def _check_counts(stated: dict[str, int], found: dict[str, int]) -> None:
    """aegisctl asks the operator to confirm the restore showing the manifest's counts: they must be the files'."""
    wrong = [name for name in COUNTED if name in stated and stated[name] != found[name]]
    if wrong:
        said = ", ".join(f"{stated[name]} {name.replace('_', ' ')}" for name in wrong)
        held = ", ".join(f"{found[name]} {name.replace('_', ' ')}" for name in wrong)
        raise InvalidBackup(f"the backup's manifest does not match its databases: it counts {said}, they hold "
                            f"{held}: it was edited")


def _version(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 100:
        raise ValueError("not a version string")
    return value


def _hex(value: Any) -> str:
    if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError("not a SHA-256 hex digest")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 200:
        raise ValueError("not a string")
    return value


def _extract(tar: tarfile.TarFile, info: tarfile.TarInfo, expected: Member, dest: Path) -> None:
    if info.size != expected.size:
        raise InvalidBackup(f"{info.name} in the backup is {info.size} bytes, its manifest says {expected.size}")
    source = tar.extractfile(info)
    assert source is not None
    digest = hashlib.sha256()
    size = 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if size != expected.size:
        raise InvalidBackup(f"{info.name} in the backup is truncated ({size} of {expected.size} bytes)")
    if digest.hexdigest() != expected.sha256:
        raise InvalidBackup(f"{info.name} in the backup does not match its SHA-256 checksum: the file is damaged")


def _open(path: Path, subject: str) -> sqlite3.Connection:
    try:
        return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise InvalidBackup(f"{subject} cannot be opened: {exc}") from None


def _require_writable_format(path: Path, subject: str) -> None:
    """SQLite opens a file whose header's format versions (bytes 18, 19) are past 2 read-only, or not at all:
    every read-only check here would pass, and only aegisd's open after the swap would fail."""
    with path.open("rb") as fh:
        header = fh.read(20)
    if header.startswith(b"SQLite format 3\0") and len(header) == 20 and not (header[18] in (1, 2)
                                                                             and header[19] in (1, 2)):
        raise InvalidBackup(f"{subject} has a header SQLite would open read-only (file format versions "
                            f"{header[18]} and {header[19]}, where aegisd writes 1 or 2): it was edited")


def _intact(conn: sqlite3.Connection, what: str, subject: str, app_id: int) -> int:
    """Ours, intact, and a schema version we can migrate from; returns that version. `what` is the file's name,
    `subject` how the messages name it."""
    if conn.execute("PRAGMA application_id").fetchone()[0] != app_id:
        raise InvalidBackup(f"{subject} is not an Aegis database")
    # The whole check, index contents against their tables included: an index missing a row would hide it from
    # every filtered `ledger show` while `ledger verify`, which walks the table, calls the ledger intact.
    if problems := integrity_problems(conn):
        raise InvalidBackup(f"{subject} fails its integrity check ({describe(problems)})")
    # aegisd makes neither. A trigger would run inside aegisd's own writes to the restored file (putting back
    # a key slot or a grant that aegisd deletes), and a view could stand where a table is read.
    made = conn.execute("SELECT type FROM sqlite_master WHERE type IN ('trigger', 'view') LIMIT 1").fetchone()
    if made is not None:
        raise InvalidBackup(f"{subject} holds a {made[0]}, which aegisd never makes: it was edited")
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    if row is None or not isinstance(row[0], int):
        raise InvalidBackup(f"{subject} has no schema version")
    version = int(row[0])
    if version < 1:
        raise InvalidBackup(f"{subject} has no valid schema version")
    # Nothing else of the file's schema is trusted either: a foreign key's ON DELETE action, a column default
    # or a conflict clause acts during aegisd's own writes just as a trigger would. The schema must be exactly
    # what aegisd's own migrations make for that version.
    if version <= _newest(what) and _schema(conn) != _expected_schema(what, version):
        raise InvalidBackup(f"{subject} has a schema aegisd did not make (a table, index or "
                            "constraint added, removed or changed): it was edited")
    if conn.execute("PRAGMA foreign_key_check").fetchone() is not None:
        raise InvalidBackup(f"{subject} has rows whose references do not hold: it was edited")
    # An id counter near the largest integer SQLite holds would make the next row's id overflow: the restored
    # ledger could take no row, and the gate would forward nothing.
    if _has_table(conn, "sqlite_sequence") and conn.execute(
            "SELECT 1 FROM sqlite_sequence WHERE typeof(seq) != 'integer' OR seq < 0 OR seq > ?",
            (ID_COUNTER_LIMIT,)).fetchone() is not None:
        raise InvalidBackup(f"{subject} has an id counter out of range: it was edited")
    return version


ID_COUNTER_LIMIT = 2**53  # far past any real count of rows, far below where an id overflows


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


Schema = frozenset[tuple[str, str, str, str | None]]


def _schema(conn: sqlite3.Connection) -> Schema:
    return frozenset(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))


def _newest(what: str) -> int:
    return VAULT_SCHEMA_VERSION if what == VAULT_DB else ledger_schema.SCHEMA_VERSION


@functools.cache
def _expected_schema(what: str, version: int) -> Schema:
    """The schema aegisd's migrations give a new file at `version`, made in memory the way the stores make it."""
    conn = sqlite3.connect(":memory:")
    try:
        if what == VAULT_DB:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            for script in VAULT_MIGRATIONS[:version]:
                for statement in filter(str.strip, script.split(";")):
                    conn.execute(statement)
        else:
            for step in ledger_schema.MIGRATIONS[:version]:
                for sql in step:
                    conn.execute(sql)
        return _schema(conn)
    finally:
        conn.close()


MAC_SIZE = 32  # HMAC-SHA256: every row MAC and checkpoint MAC aegisd writes, and a checkpoint's prev_mac


def _require_writable_tip(conn: sqlite3.Connection, subject: str) -> NewestRow | None:
    """What the ledger's writer builds the next row from must be something it can use, or the restored ledger
    could take no row and the gate would forward nothing: the next id (the counter, checked in _intact, and the
    largest id, which the writer also goes past), the MAC of the newest chained row (the next row chains from it)
    and, for a ledger with no chained row left, each prune checkpoint's MACs (the newest one's prev_mac is the
    chain's origin). Only the newest chained row's MAC is read, not every row's: the same walk the writer makes,
    from the end of the id index back past the rows with no MAC (a few), so its cost does not grow with the ledger
    (the integrity check before it reads every page anyway). An older row's MAC of another type is a chain that
    `aegisctl ledger verify` reports; it does not stop the writer. Checkpoints are a handful, so all are read.
    Returns that newest chained row (None if there is none)."""
    (max_id,) = conn.execute("SELECT max(id) FROM ledger").fetchone()
    if max_id is not None and not 0 < max_id <= ID_COUNTER_LIMIT:
        raise InvalidBackup(f"{subject} has a row id out of range ({max_id}): it was edited")
    tip = conn.execute("SELECT id, typeof(mac), length(mac), time_ms FROM ledger WHERE mac IS NOT NULL "
                       "ORDER BY id DESC LIMIT 1").fetchone()
    if tip is not None and (tip[1] != "blob" or tip[2] != MAC_SIZE):
        raise InvalidBackup(f"{subject} has a newest chained row (id {tip[0]}) whose MAC is not the "
                            f"{MAC_SIZE}-byte value aegisd writes (a {tip[1]} of {tip[2]} bytes): it was edited")
    bad = conn.execute("SELECT id FROM checkpoints WHERE typeof(prev_mac) != 'blob' OR length(prev_mac) != ? "
                       "OR typeof(mac) != 'blob' OR length(mac) != ? ORDER BY id LIMIT 1",
                       (MAC_SIZE, MAC_SIZE)).fetchone()
    if bad is not None:
        raise InvalidBackup(f"{subject} has a prune checkpoint (id {bad[0]}) whose MACs are not the "
                            f"{MAC_SIZE}-byte values aegisd writes: it was edited")
    if tip is None:
        return None
    return NewestRow(tip[0], tip[3] if isinstance(tip[3], int) else None)


def _check_vault(path: Path, subject: str) -> tuple[int, str | None, dict[str, int]]:
    """vault.db's checks; its schema version, vault id (None before `aegisctl init`) and counts."""
    _require_writable_format(path, subject)
    conn = _open(path, subject)
    try:
        version = _intact(conn, VAULT_DB, subject, VAULT_APPLICATION_ID)
        if version > VAULT_SCHEMA_VERSION:
            raise InvalidBackup(f"{subject} has schema version {version}, newer than this aegisd knows "
                                f"({VAULT_SCHEMA_VERSION}); upgrade aegisd")
        row = conn.execute("SELECT value FROM meta WHERE key = 'vault_id'").fetchone()
        counts = {table: int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608 - constant
                  for table in ("credentials", "agents", "grants")}
        return version, None if row is None else str(row[0]), counts
    except sqlite3.Error as exc:
        raise InvalidBackup(f"{subject} cannot be read: {exc}") from None
    finally:
        conn.close()


def _check_ledger(path: Path, subject: str) -> tuple[int, int, NewestRow | None]:
    """ledger.db's checks; its schema version, row count and newest chained row. Its header is checked as the
    vault's is: a ledger SQLite opens read-only passes every read, and once in place takes no row, so the gate
    would forward nothing until another restore."""
    _require_writable_format(path, subject)
    conn = _open(path, subject)
    try:
        version = _intact(conn, LEDGER_DB, subject, ledger_schema.APPLICATION_ID)
        if version > ledger_schema.SCHEMA_VERSION:
            raise InvalidBackup(f"{subject} has schema version {version}, newer than this aegisd knows "
                                f"({ledger_schema.SCHEMA_VERSION}); upgrade aegisd")
        newest = _require_writable_tip(conn, subject)
        return version, int(conn.execute("SELECT count(*) FROM ledger").fetchone()[0]), newest
    except sqlite3.Error as exc:
        raise InvalidBackup(f"{subject} cannot be read: {exc}") from None
    finally:
        conn.close()
