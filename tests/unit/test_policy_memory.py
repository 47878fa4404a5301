"""The policy memory on disk: what a restart keeps of each file's last valid agent, written atomically and
only on a change, tied to its policy directory; a damaged file or a failing disk never crashes a reload, and
a damaged file never frees an agent."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
from pathlib import Path

import pytest

from aegisd.policy import MEMORY_FILE, PolicyMemory, PolicyStore
from aegisd.policy.memory import MAX_MEMORY_BYTES

ALICE = "agent: alice\nrules:\n  - service: svc\n"
SWAPPED = "agent: mallory\nrules: [[\n"


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    return directory


@pytest.fixture
def memory_path(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    return data / MEMORY_FILE


def _started(policies: Path, memory_path: Path) -> PolicyStore:
    """A store as a fresh aegisd builds it, after its startup load."""
    store = PolicyStore(policies, memory=PolicyMemory(memory_path))
    asyncio.run(store.reload("startup"))
    return store


def _decision(store: PolicyStore, agent: str) -> str:
    verdict = store.current.judge(agent, "svc", "GET", "/", 0)
    return "ungoverned" if verdict is None else verdict.miss or "allowed"


def test_a_restart_keeps_the_last_valid_agent_of_a_broken_file(policies: Path, memory_path: Path) -> None:
    (policies / "alice.yaml").write_text(ALICE)
    _started(policies, memory_path)
    assert memory_path.stat().st_mode & 0o777 == 0o600
    assert json.loads(memory_path.read_text()) == {"version": 1, "policies_dir": str(policies),
                                                   "files": {"alice.yaml": "alice"}}
    (policies / "alice.yaml").write_text(SWAPPED)
    store = _started(policies, memory_path)
    assert (_decision(store, "alice"), _decision(store, "mallory"), _decision(store, "carol")) == \
        ("invalid", "invalid", "ungoverned")
    assert store.snapshot.files[0].agent == "mallory, alice"
    # Still remembered by the next start: a broken file keeps its last valid agent until it is valid again.
    assert _decision(_started(policies, memory_path), "alice") == "invalid"


def test_written_only_when_the_mapping_changes(policies: Path, memory_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[str] = []
    real_replace = os.replace

    def counting_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        writes.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", counting_replace)
    store = _started(policies, memory_path)
    assert not memory_path.exists() and writes == []  # nothing to remember: no file at all
    (policies / "alice.yaml").write_text(ALICE)
    for _ in range(3):
        asyncio.run(store.reload("aegisctl"))
    assert writes == [MEMORY_FILE]
    _started(policies, memory_path)  # a restart that finds the same mapping writes nothing either
    assert writes == [MEMORY_FILE]
    assert [p.name for p in memory_path.parent.iterdir()] == [MEMORY_FILE]  # no staged file left behind


def test_the_memory_of_another_directory_is_ignored_and_replaced(tmp_path: Path, policies: Path,
                                                                 memory_path: Path) -> None:
    (policies / "alice.yaml").write_text(ALICE)
    _started(policies, memory_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "alice.yaml").write_text(SWAPPED)
    store = _started(elsewhere, memory_path)
    assert (_decision(store, "alice"), _decision(store, "mallory")) == ("ungoverned", "invalid")
    assert json.loads(memory_path.read_text())["policies_dir"] == str(elsewhere)


def test_a_sighup_keeps_the_memory_unless_the_directory_changes(tmp_path: Path, policies: Path,
                                                                memory_path: Path) -> None:
    (policies / "alice.yaml").write_text(ALICE)
    store = _started(policies, memory_path)
    (policies / "alice.yaml").write_text(SWAPPED)
    store.request_reload("SIGHUP", policies, change_directory=True)
    asyncio.run(store.reload("SIGHUP"))
    assert _decision(store, "alice") == "invalid"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "alice.yaml").write_text(SWAPPED)
    store.request_reload("SIGHUP", elsewhere, change_directory=True)
    asyncio.run(store.reload("SIGHUP"))
    assert _decision(store, "alice") == "ungoverned"


@pytest.mark.parametrize("content", [
    b'{"version": 1, "files": {"alice.yaml": ',  # cut short
    b"\xff\xfe not utf-8",
    b'["version", 1]',
    b'{"version": 2, "policies_dir": null, "files": {}}',
    b'{"version": 1, "policies_dir": 7, "files": {}}',
    b'{"version": 1, "policies_dir": null, "files": {"alice.yaml": "Not An Agent"}}',
    b'{"version": 1, "policies_dir": null, "files": {"../alice.yaml": "alice"}}',
    b" " * MAX_MEMORY_BYTES + b"{}",
])
def test_an_unreadable_memory_fails_every_agent_closed_while_a_file_is_invalid(
        policies: Path, memory_path: Path, content: bytes, caplog: pytest.LogCaptureFixture) -> None:
    (policies / "alice.yaml").write_text(SWAPPED)
    (policies / "bob.yaml").write_text(ALICE.replace("alice", "bob"))
    memory_path.write_bytes(content)
    with caplog.at_level(logging.WARNING, "aegisd.policy"):
        store = _started(policies, memory_path)
    assert f"cannot use the policy memory {memory_path}" in caplog.text
    assert store.current.fail_all == ("alice.yaml",)
    assert {_decision(store, agent) for agent in ("alice", "bob", "carol", "mallory")} == {"invalid"}
    # Rewritten, and saying so: the next start fails closed the same way without a warning.
    assert json.loads(memory_path.read_text())["files"] == {"alice.yaml": "", "bob.yaml": "bob"}
    caplog.clear()
    assert _started(policies, memory_path).current.fail_all == ("alice.yaml",)
    assert "policy memory" not in caplog.text
    # Once the file is valid again, only its own agent is governed by it.
    (policies / "alice.yaml").write_text(ALICE)
    store = _started(policies, memory_path)
    assert (store.current.fail_all, _decision(store, "carol")) == ((), "ungoverned")


def test_an_unreadable_memory_changes_nothing_while_every_file_is_valid(policies: Path, memory_path: Path) -> None:
    (policies / "alice.yaml").write_text(ALICE)
    memory_path.mkdir()  # not even a file
    store = _started(policies, memory_path)
    assert (store.current.fail_all, _decision(store, "alice"), _decision(store, "carol")) == \
        ((), "allowed", "ungoverned")


@pytest.mark.parametrize("failure", [errno.ENOSPC, errno.EROFS])
def test_a_failed_write_keeps_the_memory_and_the_reload(policies: Path, memory_path: Path, failure: int,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    (policies / "alice.yaml").write_text(ALICE)
    store = _started(policies, memory_path)
    written = memory_path.read_text()

    def failing_write(fd: int, data: bytes) -> int:
        raise OSError(failure, os.strerror(failure))

    monkeypatch.setattr(os, "write", failing_write)
    (policies / "alice.yaml").write_text(SWAPPED)
    (policies / "bob.yaml").write_text(ALICE.replace("alice", "bob"))
    with caplog.at_level(logging.WARNING, "aegisd.policy"):
        snapshot = asyncio.run(store.reload("aegisctl"))
    assert not snapshot.error and f"cannot write the policy memory {memory_path}" in caplog.text
    assert (_decision(store, "alice"), _decision(store, "bob")) == ("invalid", "allowed")
    assert memory_path.read_text() == written
    assert [p.name for p in memory_path.parent.iterdir()] == [MEMORY_FILE]  # the staged file was removed
    monkeypatch.undo()
    asyncio.run(store.reload("aegisctl"))  # the disk has room again: the same mapping is written now
    assert json.loads(memory_path.read_text())["files"] == {"alice.yaml": "alice", "bob.yaml": "bob"}
