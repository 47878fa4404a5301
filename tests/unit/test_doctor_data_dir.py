"""Doctor's data_dir check: the databases must be regular files (not links) of the directory's owner, and every
file in the directory private. Found by a cold review: a symlinked or another user's vault.db or ledger.db passed."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from aegisd.doctor import FAIL, PASS, Check, Doctor
from aegisd.runtime import Runtime

OTHER_UID = 1234


def check(directory: Path) -> Check:
    runtime = cast(Runtime, SimpleNamespace(config=SimpleNamespace(data_dir=directory)))
    return asyncio.run(Doctor(runtime).data_dir())


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "data"
    directory.mkdir(mode=0o700)
    for name in ("vault.db", "ledger.db", "ledger.db-wal", "ledger.db-shm"):
        (directory / name).touch(mode=0o600)
    return directory


def test_private_regular_files_pass(data_dir: Path) -> None:
    assert check(data_dir).status == PASS


@pytest.mark.parametrize("name", ["vault.db", "ledger.db", "ledger.db-wal", "vault.db-shm"])
def test_a_link_in_place_of_a_database_fails(data_dir: Path, name: str) -> None:
    target = data_dir.parent / "elsewhere"
    target.touch(mode=0o600)
    (data_dir / name).unlink(missing_ok=True)
    (data_dir / name).symlink_to(target)
    result = check(data_dir)
    assert result.status == FAIL and result.message == f"not regular files: {name} (a symbolic link)", result
    assert "put the real file in place" in result.hint and "chmod" not in result.hint, result


def test_a_fifo_or_a_directory_in_place_of_a_database_fails(data_dir: Path) -> None:
    (data_dir / "vault.db").unlink()
    os.mkfifo(data_dir / "vault.db", 0o600)
    (data_dir / "ledger.db-shm").unlink()
    (data_dir / "ledger.db-shm").mkdir(mode=0o700)
    result = check(data_dir)
    assert result.message == "not regular files: ledger.db-shm (a directory), vault.db (a FIFO)", result


def test_a_link_by_another_name_is_left_alone(data_dir: Path) -> None:
    """Only the databases must not be links: aegisd opens nothing else in the directory by a fixed name here."""
    (data_dir / "notes").symlink_to(data_dir / "vault.db")
    assert check(data_dir).status == PASS


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_a_file_of_another_user_fails(data_dir: Path) -> None:
    os.chown(data_dir / "ledger.db-wal", OTHER_UID, OTHER_UID)
    os.chmod(data_dir / "vault.db", 0o640)
    result = check(data_dir)
    assert result.status == FAIL, result
    assert result.message == (f"files readable or writable by others: vault.db (0640); files not owned by uid 0, "
                              f"the owner of {data_dir}: ledger.db-wal (uid {OTHER_UID})"), result
    assert "chmod 600" in result.hint and "chown root each file named" in result.hint, result
