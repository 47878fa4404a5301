"""Reading a backup file on the client: its manifest for the operator, and a completeness check.

aegisctl checks what it can without the daemon's code (the tar is whole, every member matches the
manifest's size and SHA-256) so a backup interrupted mid-stream is never renamed into place; the
daemon checks everything again, and the databases themselves, before a restore.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

from aegisctl.client import ClientError

MANIFEST = "manifest.json"
DATABASES = ("vault.db", "ledger.db")
CHUNK = 1 << 20


# tarfile parses a PAX header in time quadratic in its length (CVE-2024-6232); an Aegis backup has none
# longer than this, so a longer one is refused before tarfile reads it (the daemon does the same).
MAX_EXTENDED_HEADER = 4 << 10
MAX_HEADERS = 12
_EXTENDED_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                   tarfile.GNUTYPE_LONGLINK)
_BLOCK = tarfile.BLOCKSIZE


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the backup at `path`; ClientError if the file is not an Aegis backup."""
    try:
        _check_headers(path)
        with tarfile.open(path, mode="r:") as tar:
            info = tar.next()
            if info is None or info.name != MANIFEST or not info.isreg() or info.size > CHUNK:
                raise _not_a_backup(path, "it does not start with an Aegis manifest")
            fh = tar.extractfile(info)
            assert fh is not None
            data = json.loads(fh.read())
    except RecursionError:
        raise _not_a_backup(path, "its manifest is nested too deeply to be an Aegis manifest") from None
    except (OSError, tarfile.TarError, EOFError, ValueError) as exc:
        raise _not_a_backup(path, str(exc)) from None
    if not isinstance(data, dict) or data.get("format") != "aegis-backup":
        raise _not_a_backup(path, "its manifest is not an Aegis backup manifest")
    return data


def _check_headers(path: Path) -> None:
    """Walk the tar's header blocks (without tarfile) and refuse an oversized extended header or too many."""
    offset, size_override = 0, None
    with path.open("rb") as fh:
        for _ in range(MAX_HEADERS + 1):
            fh.seek(offset)
            block = fh.read(_BLOCK)
            size = _octal(block[124:136]) if len(block) == _BLOCK and block != bytes(_BLOCK) else None
            if size is None or _octal(block[148:156]) != sum(block[:148]) + 8 * 0x20 + sum(block[156:]):
                return  # the end, or damage that tarfile reports
            kind = block[156:157]
            if kind in _EXTENDED_TYPES:
                if size > MAX_EXTENDED_HEADER:
                    raise _not_a_backup(path, f"it has an extended tar header of {size} bytes (at most "
                                              f"{MAX_EXTENDED_HEADER})")
                if kind in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
                    size_override = _pax_size(fh.read(size))
            else:
                size, size_override = size if size_override is None else size_override, None
            offset += _BLOCK + -(-size // _BLOCK) * _BLOCK
    raise _not_a_backup(path, f"it has more than {MAX_HEADERS} tar headers")


def _octal(field: bytes) -> int | None:
    if field[:1] == b"\x80":  # GNU base-256, for large sizes
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        return None


def _pax_size(records: bytes) -> int | None:
    """A PAX header's `size` record (it overrides the next member's), read in one linear pass."""
    pos = 0
    while pos < len(records):
        space = records.find(b" ", pos, pos + 20)
        if space < 0 or not records[pos:space].isdigit():
            return None
        length = int(records[pos:space])
        if length <= space - pos:
            return None
        record = records[space + 1:pos + length].rstrip(b"\n")
        if record.startswith(b"size=") and record[5:].isdigit():
            return int(record[5:])
        pos += length
    return None


def verify_archive(path: Path) -> dict[str, Any]:
    """read_manifest, plus every database member present, whole, and matching its checksum."""
    manifest = read_manifest(path)
    seen: dict[str, tuple[int, str]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if info.name in DATABASES and info.isreg():
                    fh = tar.extractfile(info)
                    assert fh is not None
                    digest, size = hashlib.sha256(), 0
                    while chunk := fh.read(CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                    seen[info.name] = (size, digest.hexdigest())
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise _not_a_backup(path, f"it is incomplete ({exc})") from None
    members = manifest.get("members", {})
    for name in DATABASES:
        want = members.get(name, {}) if isinstance(members, dict) else {}
        if seen.get(name) != (want.get("size"), want.get("sha256")):
            raise _not_a_backup(path, f"{name} is missing or does not match the manifest")
    return manifest


def _not_a_backup(path: Path, why: str) -> ClientError:
    return ClientError(f"{path} is not a complete Aegis backup: {why}",
                       "check the file name; take a new one with `aegisctl backup FILE`", "invalid_backup")
