"""The mark a restore leaves while it swaps files: whatever another hand put at its path, reading it never crashes,
hangs or follows a link (its review: nested JSON crashed aegisd's start, a FIFO hung it)."""

from __future__ import annotations

import os
from pathlib import Path

from aegisd.backup import interrupted


def test_the_mark_says_what_was_cut_off_and_goes_when_cleared(tmp_path: Path) -> None:
    assert interrupted.cut_off(tmp_path) is None
    assert interrupted.mark(tmp_path, 1_690_000_000_000, "v-1", 1_700_000_000_000)
    note = interrupted.cut_off(tmp_path)
    assert note is not None and "of a backup of vault v-1 taken 2023-07-22T04:26:40.000Z" in note, note
    assert (tmp_path / interrupted.MARK).stat().st_mode & 0o777 == 0o600
    assert not interrupted.mark(tmp_path, 1, "v-2", 2)  # an earlier one is kept as it is
    assert "v-1" in (interrupted.cut_off(tmp_path) or "")
    interrupted.clear(tmp_path)
    assert interrupted.cut_off(tmp_path) is None


def test_whatever_lies_at_the_marks_path_is_reported_unreadable(tmp_path: Path) -> None:
    path = tmp_path / interrupted.MARK
    for make in (lambda: path.write_bytes(b"[" * 4000), lambda: path.write_bytes(b"x" * 100_000),
                 lambda: os.mkfifo(path), lambda: path.symlink_to(tmp_path / "elsewhere"), lambda: path.mkdir()):
        make()
        note = interrupted.cut_off(tmp_path)
        assert note is not None and note.startswith("a restore was cut off by a stop"), note
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()
