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


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the backup at `path`; ClientError if the file is not an Aegis backup."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            info = tar.next()
            if info is None or info.name != MANIFEST or not info.isreg() or info.size > CHUNK:
                raise _not_a_backup(path, "it does not start with an Aegis manifest")
            fh = tar.extractfile(info)
            assert fh is not None
            data = json.loads(fh.read())
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
