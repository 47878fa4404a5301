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
from typing import Any, Self

from aegisctl.client import ClientError

MANIFEST = "manifest.json"
DATABASES = ("vault.db", "ledger.db")
CHUNK = 1 << 20


# tarfile parses a PAX header in time quadratic in its length (CVE-2024-6232); an Aegis backup has none
# longer than this, so tarfile is stopped before it reads a longer one (the daemon does the same).
MAX_EXTENDED_HEADER = 4 << 10
MAX_HEADERS = 12


class _Refused(Exception):
    """Not an Exception tarfile knows, so it passes this on rather than reading it as the archive's end."""


class _BoundedHeader(tarfile.TarInfo):
    """tarfile's own parsing, stopped at an oversized extended header, too many headers or a GNU sparse header
    (an old-GNU sparse member or a `GNU.sparse.*` PAX record, which an Aegis backup never has), as in aegisd."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> Self:  # every header, extended ones included
        if not isinstance(tar, _BoundedTar):
            raise TypeError("a bounded header is read only through _BoundedTar")
        tar.headers += 1
        if tar.headers > MAX_HEADERS:
            raise _Refused(f"it has more than {MAX_HEADERS} tar headers")
        return super().fromtarfile(tar)

    def _proc_pax(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        self._refuse_if_large()
        fileobj = tar.fileobj
        assert fileobj is not None
        here = fileobj.tell()
        records = fileobj.read(self._block(self.size))  # type: ignore[attr-defined]
        fileobj.seek(here)
        if b"GNU.sparse." in records:
            raise _Refused(_SPARSE)
        return super()._proc_pax(tar)  # type: ignore[misc, no-any-return]

    def _proc_gnulong(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        self._refuse_if_large()
        return super()._proc_gnulong(tar)  # type: ignore[misc, no-any-return]

    def _proc_sparse(self, tar: tarfile.TarFile) -> tarfile.TarInfo:  # before its extension blocks are read
        raise _Refused(_SPARSE)

    def _refuse_if_large(self) -> None:
        if not 0 <= self.size <= MAX_EXTENDED_HEADER:
            raise _Refused(f"it has an extended tar header of {self.size} bytes (at most {MAX_EXTENDED_HEADER})")


_SPARSE = "it has a GNU sparse tar header, which an Aegis backup never has"


class _BoundedTar(tarfile.TarFile):
    tarinfo = _BoundedHeader
    headers = 0

    def next(self) -> tarfile.TarInfo | None:
        """tarfile's next header, its parsing errors other than TarError (a malformed number in a PAX record, an
        offset past any a file can have) refused like the rest rather than shown as a traceback."""
        try:
            return super().next()
        except (ValueError, IndexError, OverflowError) as exc:
            raise _Refused(f"its tar headers are damaged ({exc})") from None


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the backup at `path`; ClientError if the file is not an Aegis backup."""
    try:
        with _BoundedTar.open(path, mode="r:") as tar:
            info = tar.next()
            if info is None or info.name != MANIFEST or not info.isreg() or info.size > CHUNK:
                raise _not_a_backup(path, "it does not start with an Aegis manifest")
            fh = tar.extractfile(info)
            assert fh is not None
            data = json.loads(fh.read())
    except _Refused as exc:
        raise _not_a_backup(path, str(exc)) from None
    except RecursionError:
        raise _not_a_backup(path, "its manifest is nested too deeply to be an Aegis manifest") from None
    except (OSError, tarfile.TarError, EOFError, ValueError) as exc:
        raise _not_a_backup(path, str(exc)) from None
    if not isinstance(data, dict) or data.get("format") != "aegis-backup":
        raise _not_a_backup(path, "its manifest is not an Aegis backup manifest")
    return data


def verify_archive(path: Path) -> dict[str, Any]:
    """read_manifest, plus every database member present, whole, and matching its checksum."""
    manifest = read_manifest(path)
    seen: dict[str, tuple[int, str]] = {}
    try:
        with _BoundedTar.open(path, mode="r:") as tar:
            for info in tar:
                if info.name in DATABASES and info.isreg():
                    fh = tar.extractfile(info)
                    assert fh is not None
                    digest, size = hashlib.sha256(), 0
                    while chunk := fh.read(CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                    seen[info.name] = (size, digest.hexdigest())
    except _Refused as exc:
        raise _not_a_backup(path, str(exc)) from None
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
