"""The policy memory on disk: what a restart keeps of each file's last valid agent, written atomically and
only on a change, one mapping per policy directory (by its resolved path); a damaged file, a symlink or a
FIFO in its place, or a failing disk never crashes (or holds up) a reload, and never frees an agent."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import threading
from pathlib import Path

import pytest

from aegisd.policy import MEMORY_FILE, PolicyMemory, PolicyStore
from aegisd.policy.memory import MAX_DIRECTORIES, MAX_MEMORY_BYTES
from aegisd.policy.model import PolicyFile

ALICE = "agent: alice\nrules:\n  - service: svc\n"
SWAPPED = "agent: mallory\nrules: [[\n"


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


def _stored(memory_path: Path) -> list[tuple[str, dict[str, str]]]:
    """What the memory file holds: (policy directory, its mapping), most recent first."""
    value = json.loads(memory_path.read_text())
    assert value["version"] == 2 and set(value) == {"version", "directories"}
    return [(entry["policies_dir"], entry["files"]) for entry in value["directories"]]


def test_a_symlink_repointed_while_stopped_keeps_the_memory_of_the_path_configured(
        tmp_path: Path, memory_path: Path) -> None:
    """Found by a review: keyed only by the resolved path, a policies directory given as a symlink that a deploy
    re-points to a new release while aegisd is stopped lost its memory, and a file broken in the new release
    freed the agent it restricted. A directory not found by its resolved path is found by the path configured."""
    first, second = tmp_path / "r1", tmp_path / "r2"
    first.mkdir()
    second.mkdir()
    (first / "alice.yaml").write_text(ALICE)
    (second / "alice.yaml").write_text(SWAPPED)
    link = tmp_path / "policies"
    link.symlink_to(first)
    _started(link, memory_path)
    link.unlink()
    link.symlink_to(second)
    store = _started(link, memory_path)
    assert (_decision(store, "alice"), _decision(store, "mallory")) == ("invalid", "invalid")
    assert _stored(memory_path)[0] == (str(second.resolve()), {"alice.yaml": "alice"})


def test_the_most_recent_entry_for_the_configured_path_wins(tmp_path: Path, memory_path: Path) -> None:
    """Found by a review: blue names alice, a deploy points the symlink at green (naming bob), then, while
    aegisd is stopped, back at a new release in blue whose file is broken. A running aegisd would have carried
    bob over; the older entry under blue's resolved path must not win over the newer one for the path."""
    blue, green = tmp_path / "blue", tmp_path / "green"
    for release in (blue, green):
        release.mkdir()
    (blue / "alice.yaml").write_text(ALICE)
    (green / "alice.yaml").write_text(ALICE.replace("agent: alice", "agent: mallory"))
    link = tmp_path / "policies"
    link.symlink_to(blue)
    _started(link, memory_path)
    link.unlink()
    link.symlink_to(green)
    _started(link, memory_path)
    link.unlink()
    link.symlink_to(blue)
    (blue / "alice.yaml").write_text("agent: carol\nrules: [broken\n")
    store = _started(link, memory_path)
    assert _decision(store, "mallory") == "invalid" and _decision(store, "carol") == "invalid"


def test_a_memory_nested_too_deeply_is_unreadable_not_a_crash(policies: Path, memory_path: Path) -> None:
    """Found by a review: json.loads raised RecursionError on deeply nested text, which stopped aegisd starting."""
    memory_path.write_bytes(b"[" * 200_000)
    (policies / "alice.yaml").write_text(SWAPPED)
    store = _started(policies, memory_path)
    assert (_decision(store, "alice"), _decision(store, "carol")) == ("invalid", "invalid")  # every agent: unknown


def test_a_restart_keeps_the_last_valid_agent_of_a_broken_file(policies: Path, memory_path: Path) -> None:
    (policies / "alice.yaml").write_text(ALICE)
    _started(policies, memory_path)
    assert memory_path.stat().st_mode & 0o777 == 0o600
    assert json.loads(memory_path.read_text()) == {
        "version": 2, "directories": [{"policies_dir": str(policies.resolve()), "configured": str(policies),
                                       "files": {"alice.yaml": "alice"}}]}
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


def test_the_memory_of_another_directory_is_ignored_and_kept(tmp_path: Path, policies: Path,
                                                              memory_path: Path) -> None:
    (policies / "alice.yaml").write_text(ALICE)
    _started(policies, memory_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "alice.yaml").write_text(SWAPPED)
    (elsewhere / "bob.yaml").write_text(ALICE.replace("alice", "bob"))
    store = _started(elsewhere, memory_path)
    assert (_decision(store, "alice"), _decision(store, "mallory")) == ("ungoverned", "invalid")
    assert _stored(memory_path) == [(str(elsewhere.resolve()), {"bob.yaml": "bob"}),
                                    (str(policies.resolve()), {"alice.yaml": "alice"})]
    # Found by a review: starting on another directory replaced the first one's memory, so a file broken there
    # meanwhile freed its agent once aegisd was back on it.
    (policies / "alice.yaml").write_text(SWAPPED)
    assert _decision(_started(policies, memory_path), "alice") == "invalid"
    assert [directory for directory, _ in _stored(memory_path)] == [str(policies.resolve()),
                                                                    str(elsewhere.resolve())]


def test_the_same_directory_by_another_path_keeps_its_memory(tmp_path: Path, policies: Path, memory_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a review: the memory was keyed by the path as configured, so a symlink to the policy directory
    on one start and its real path on the next (or a relative path) lost it, and a file broken in between
    freed its agent. It is keyed by the resolved path."""
    alias = tmp_path / "policies-link"
    alias.symlink_to(policies)
    (policies / "alice.yaml").write_text(ALICE)
    _started(alias, memory_path)
    assert _stored(memory_path) == [(str(policies.resolve()), {"alice.yaml": "alice"})]
    (policies / "alice.yaml").write_text(SWAPPED)
    assert _decision(_started(policies, memory_path), "alice") == "invalid"
    monkeypatch.chdir(tmp_path)
    assert _decision(_started(Path("policies-link"), memory_path), "alice") == "invalid"
    assert _decision(_started(Path("policies"), memory_path), "alice") == "invalid"
    assert len(_stored(memory_path)) == 1


def test_a_sighup_away_and_back_keeps_the_memory(tmp_path: Path, policies: Path, memory_path: Path) -> None:
    """Found by a review: a SIGHUP switching policies_dir from A to B and back to A found A's memory gone."""
    (policies / "alice.yaml").write_text(ALICE)
    store = _started(policies, memory_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "bob.yaml").write_text(ALICE.replace("alice", "bob"))
    store.request_reload("SIGHUP", elsewhere, change_directory=True)
    asyncio.run(store.reload("SIGHUP"))
    assert (_decision(store, "alice"), _decision(store, "bob")) == ("ungoverned", "allowed")
    (policies / "alice.yaml").write_text(SWAPPED)  # broken while aegisd looked elsewhere
    store.request_reload("SIGHUP", policies, change_directory=True)
    asyncio.run(store.reload("SIGHUP"))
    assert (_decision(store, "alice"), _decision(store, "bob")) == ("invalid", "ungoverned")
    assert _decision(_started(policies, memory_path), "alice") == "invalid"  # and after a restart


def test_the_most_recent_directories_are_kept(tmp_path: Path, memory_path: Path) -> None:
    directories = []
    for number in range(MAX_DIRECTORIES + 1):
        directory = tmp_path / f"policies-{number}"
        directory.mkdir()
        (directory / "alice.yaml").write_text(ALICE)
        directories.append(directory)
        _started(directory, memory_path)
    assert [d for d, _ in _stored(memory_path)] == [str(d.resolve()) for d in reversed(directories[1:])]
    for directory in directories:
        (directory / "alice.yaml").write_text(SWAPPED)
    assert _decision(_started(directories[1], memory_path), "alice") == "invalid"
    assert _decision(_started(directories[0], memory_path), "alice") == "ungoverned"  # the oldest was dropped


def test_a_version_1_memory_is_still_read(tmp_path: Path, policies: Path, memory_path: Path) -> None:
    """What an aegisd before the per-directory memory wrote: the mapping of the one directory it names, as
    configured then (here a symlink to it), read as that directory's."""
    alias = tmp_path / "policies-link"
    alias.symlink_to(policies)
    memory_path.write_text(json.dumps({"version": 1, "policies_dir": str(alias), "files": {"alice.yaml": "alice"}}))
    memory_path.chmod(0o600)
    (policies / "alice.yaml").write_text(SWAPPED)
    store = _started(policies, memory_path)
    assert (_decision(store, "alice"), _decision(store, "mallory")) == ("invalid", "invalid")
    (policies / "alice.yaml").write_text(ALICE.replace("alice", "bob"))
    asyncio.run(store.reload("aegisctl"))  # a change: written in the new format
    assert _stored(memory_path) == [(str(policies.resolve()), {"alice.yaml": "bob"})]


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_symlink_or_fifo_in_place_of_the_memory_is_not_read(tmp_path: Path, policies: Path, memory_path: Path,
                                                              kind: str, caplog: pytest.LogCaptureFixture) -> None:
    """Hardening: a FIFO would hold up the start (an open for reading waits for a writer) and a symlink points
    at a file that is not aegisd's; either is unreadable (every invalid file fails closed for every agent) and
    is replaced, not followed, by the next write."""
    (policies / "alice.yaml").write_text(SWAPPED)
    target = tmp_path / "elsewhere.json"
    if kind == "symlink":
        target.write_text(json.dumps({"version": 2, "directories": [
            {"policies_dir": str(policies.resolve()), "files": {"alice.yaml": "mallory"}}]}))
        memory_path.symlink_to(target)
    else:
        os.mkfifo(memory_path, 0o600)
    loaded: list[object] = []
    with caplog.at_level(logging.WARNING, "aegisd.policy"):
        loading = threading.Thread(target=lambda: loaded.append(PolicyMemory(memory_path).load(policies)),
                                   daemon=True)
        loading.start()
        loading.join(10)
        if loading.is_alive():  # the open waits for a writer: be one, so the thread ends
            os.close(os.open(memory_path, os.O_WRONLY | os.O_NONBLOCK))
            loading.join(10)
            pytest.fail("loading the policy memory waited on a FIFO")
    assert loaded == [None]
    described = "a symbolic link" if kind == "symlink" else "a FIFO"
    assert f"cannot use the policy memory {memory_path}: it is {described}, not the regular file" in caplog.text
    store = _started(policies, memory_path)
    assert store.current.fail_all == ("alice.yaml",) and _decision(store, "carol") == "invalid"
    assert not memory_path.is_symlink() and memory_path.is_file()  # replaced by aegisd's own file
    assert _stored(memory_path) == [(str(policies.resolve()), {"alice.yaml": ""})]
    if kind == "symlink":
        assert json.loads(target.read_text())["directories"][0]["files"] == {"alice.yaml": "mallory"}


def test_a_sighup_changing_the_directory_during_a_reload_is_kept(tmp_path: Path, policies: Path,
                                                                  memory_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a review: a reload in progress (a poll) captured the old directory and, done, put its set in
    force under it, overwriting the directory a SIGHUP had set meanwhile: the old directory stayed in force
    though the reload was logged. The reload reads the new directory instead."""
    (policies / "alice.yaml").write_text(ALICE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "bob.yaml").write_text(ALICE.replace("alice", "bob"))
    entered, release = threading.Event(), threading.Event()
    real_read = PolicyStore._read_all

    def slow_read(self: PolicyStore, directory: Path | None) -> tuple[object, list[PolicyFile], str]:
        if directory == policies and not entered.is_set():
            entered.set()
            assert release.wait(10)
        return real_read(self, directory)

    async def scenario() -> PolicyStore:
        store = PolicyStore(policies, memory=PolicyMemory(memory_path))
        monkeypatch.setattr(PolicyStore, "_read_all", slow_read)
        polling = asyncio.create_task(store.reload("file change"))
        assert await asyncio.to_thread(entered.wait, 10)
        store.request_reload("SIGHUP", elsewhere, change_directory=True)
        release.set()
        snapshot = await polling
        assert snapshot.directory == elsewhere
        return store

    store = asyncio.run(scenario())
    assert store.directory == elsewhere and [f.name for f in store.snapshot.files] == ["bob.yaml"]
    assert (_decision(store, "alice"), _decision(store, "bob")) == ("ungoverned", "allowed")
    assert _stored(memory_path) == [(str(elsewhere.resolve()), {"bob.yaml": "bob"})]


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
    b'{"version": 3, "directories": []}',
    b'{"version": 2, "policies_dir": null, "files": {}}',
    b'{"version": 2, "directories": [{"policies_dir": null, "files": {}}]}',
    b'{"version": 2, "directories": [{"policies_dir": "/p", "files": {}}, {"policies_dir": "/p", "files": {}}]}',
    b'{"version": 2, "directories": [{"policies_dir": "/p", "files": {"alice.yaml": 7}}]}',
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
    assert _stored(memory_path) == [(str(policies.resolve()), {"alice.yaml": "", "bob.yaml": "bob"})]
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
    assert _stored(memory_path) == [(str(policies.resolve()), {"alice.yaml": "alice", "bob.yaml": "bob"})]


def test_a_failed_first_load_does_not_claim_previous_policies_stay(tmp_path: Path, memory_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """At start-up there are none: the daemon refuses to start with the error, which it says itself."""
    store = PolicyStore(tmp_path / "nowhere", memory=PolicyMemory(memory_path))
    with caplog.at_level(logging.DEBUG, "aegisd.policy"):
        assert "cannot read the policy directory" in asyncio.run(store.reload("startup")).error
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.DEBUG, f"policies could not be loaded (startup): cannot read the policy directory "
                        f"{tmp_path / 'nowhere'}: No such file or directory")]
    (tmp_path / "nowhere").mkdir()
    asyncio.run(store.reload("SIGHUP"))
    (tmp_path / "nowhere").rmdir()
    caplog.clear()
    asyncio.run(store.reload("SIGHUP"))  # once a set is in force, a failure keeps it, and says so
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        f"policy reload (SIGHUP) failed: cannot read the policy directory {tmp_path / 'nowhere'}: No such file or "
        "directory; the previous policies stay"]
