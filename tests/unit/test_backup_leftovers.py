"""clear_leftovers, which aegisd runs at start: it removes only its own scratch directories, and says only what it
removed (a review found it reported a symlink and a file it had left alone, since rmtree ignored the errors)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from aegisd.backup.staging import clear_leftovers


def test_only_real_scratch_directories_are_removed_and_reported(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / ".backup-abc").mkdir(parents=True)
    (data / ".backup-abc" / "vault.db").write_bytes(b"copy")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    (data / ".backup-link").symlink_to(outside)
    (data / ".restore-file").write_text("not ours")
    assert clear_leftovers(data) == [".backup-abc"]
    assert sorted(p.name for p in data.iterdir()) == [".backup-link", ".restore-file"]
    assert (outside / "keep").read_text() == "keep"


def test_a_directory_that_cannot_be_removed_is_logged_not_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    (data / ".restore-xyz").mkdir(parents=True)
    # rmtree with ignore_errors removes nothing of a directory the file system refuses to change (read-only, or
    # not this user's): as it does then, here for root too.
    monkeypatch.setattr("aegisd.backup.staging.shutil.rmtree", lambda path, ignore_errors=False: None)
    with caplog.at_level(logging.ERROR, logger="aegisd.backup"):
        assert clear_leftovers(data) == []
    assert "cannot remove" in caplog.text and ".restore-xyz" in caplog.text
