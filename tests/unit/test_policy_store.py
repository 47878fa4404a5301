"""The policy directory as aegisd reads it and the policy RPCs that answer about it: what is in the directory
(a FIFO behind a symlink, CRLF line endings, nothing at all), and `policy validate` and `policy test` giving the
answers that loading the files and the gate would give."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from aegisd.api.aegis.v1 import policy_pb2 as pb
from aegisd.control.policy_service import PolicyService
from aegisd.errors import InvalidArgument
from aegisd.gate.admission import WOULD_DENY, check_policy
from aegisd.gate.refusal import Refusal
from aegisd.policy import PolicyStore
from aegisd.policy.pattern import MAX_JUDGED_PATH

BOT = "agent: bot\nrules:\n  - service: svc\n    paths: ['/repos/acme/.*']\n"


def _loaded(policies: Path) -> PolicyStore:
    store = PolicyStore(policies)
    asyncio.run(store.reload("startup"))
    return store


def test_a_symlink_to_a_fifo_is_an_invalid_file_not_a_reload_that_never_ends(tmp_path: Path, policies: Path) -> None:
    """Found by a cold review: opening `bot.yaml -> ../f` (a FIFO) waited for a writer, so aegisd never became
    ready, or a reload held its lock for ever. Read as the policy memory is (non-blocking, then fstat), it is
    one more file that cannot be read: invalid, failing closed."""
    os.mkfifo(tmp_path / "f", 0o600)
    (policies / "bot.yaml").symlink_to("../f")
    (policies / "alice.yaml").write_text(BOT.replace("bot", "alice"))
    store = PolicyStore(policies)
    loading = threading.Thread(target=lambda: asyncio.run(store.reload("startup")), daemon=True)
    loading.start()
    loading.join(10)
    if loading.is_alive():  # the open waits for a writer: be one, so the thread ends
        os.close(os.open(tmp_path / "f", os.O_WRONLY | os.O_NONBLOCK))
        loading.join(10)
        pytest.fail("reading the policy directory waited on a FIFO")
    files = {f.name: f for f in store.snapshot.files}
    assert [str(i) for i in files["bot.yaml"].issues] == ["bot.yaml: cannot read the file: it is a FIFO, not a "
                                                          "regular file"]
    assert files["alice.yaml"].valid and store.current.fail_all == ("bot.yaml",)  # whom it restricts: unknown


@pytest.mark.parametrize("kind", ["FIFO", "directory"])
def test_a_fifo_or_directory_named_as_a_policy_file_fails_closed_not_skipped(policies: Path, kind: str) -> None:
    """Found by a review: a FIFO (or a directory) put in the policy directory under a policy file's name, not
    through a symlink, was left out of the listing, so whatever it was meant to restrict went free unsaid."""
    if kind == "FIFO":
        os.mkfifo(policies / "bot.yaml", 0o600)
    else:
        (policies / "bot.yaml").mkdir()
    (policies / "alice.yaml").write_text(BOT.replace("bot", "alice"))
    store = _loaded(policies)
    files = {f.name: f for f in store.snapshot.files}
    assert [str(i) for i in files["bot.yaml"].issues] == [
        f"bot.yaml: cannot read the file: it is a {kind}, not a regular file"]
    assert files["alice.yaml"].valid and store.current.fail_all == ("bot.yaml",)


def test_a_broken_file_with_crlf_line_endings_fails_closed_for_its_agent_only(policies: Path) -> None:
    """Found by a review: `agent: bot\\r\\n` did not match the agent line, so a broken CRLF file failed every
    agent closed instead of its own."""
    (policies / "bot.yaml").write_bytes(b"agent: bot   # the research bot\r\nrules: [[\r\n")
    (policies / "eve.yaml").write_bytes(b"agent: 'eve'\r\nrules: {\r\n")
    store = _loaded(policies)
    assert store.current.fail_all == ()
    assert {name: policy.invalid for name, policy in store.current.agents.items()} == {
        "bot": ("bot.yaml",), "eve": ("eve.yaml",)}


@pytest.mark.parametrize("how", ["directory unset", "directory emptied"])
def test_dropping_every_policy_is_a_warning(policies: Path, caplog: pytest.LogCaptureFixture, how: str) -> None:
    """Found by a review: a SIGHUP after `[policy] dir` was removed from the config (or emptied) freed every agent
    with one INFO line, "0 files, 0 agents". Policies that were in force and are no more: a WARNING saying so."""
    (policies / "bot.yaml").write_text(BOT)
    store = _loaded(policies)
    with caplog.at_level(logging.INFO, "aegisd.policy"):
        asyncio.run(store.reload("aegisctl"))  # nothing changed: no warning
        assert [r.levelno for r in caplog.records] == [logging.INFO]
        if how == "directory unset":
            store.request_reload("SIGHUP", None, change_directory=True)
        else:
            (policies / "bot.yaml").unlink()
        asyncio.run(store.reload("SIGHUP"))
    last = caplog.records[-1]
    assert last.levelno == logging.WARNING and not store.current.agents
    where = "no policy directory is configured now" if how == "directory unset" else \
        f"the policy directory {policies} has no policy files now"
    assert last.getMessage().endswith(f"0 files, 0 agents; {where}, so every policy was dropped: every agent is "
                                      "governed by its grants and scopes only")


def _service(store: PolicyStore) -> PolicyService:
    """The RPCs over `store`, with no vault to warn about names from (before `aegisctl init`)."""
    runtime: Any = SimpleNamespace(policies=store, store=None, vault=SimpleNamespace(vault_id=None))
    return PolicyService(runtime)


def _validate(store: PolicyStore, **files: str) -> dict[str, list[str]]:
    request = pb.ValidatePoliciesRequest(files=[pb.PolicySource(name=name.replace("__", "/"), content=text.encode())
                                                for name, text in files.items()])
    reply = asyncio.run(PolicyService.Validate.__wrapped__(_service(store), request, None))  # type: ignore[attr-defined]
    return {f.name: [i.message for i in f.issues] for f in reply.files}


def test_validate_checks_the_files_sent_with_the_loaded_files_they_join(policies: Path) -> None:
    """Found by a review: `policy validate` checked only the files sent, so a dry-run file for an agent whose
    loaded file is in enforce mode validated alone and made both invalid once dropped in. The loaded files are
    checked with them, except the one a file sent would replace (same name), so a mode switch validates."""
    (policies / "bot.yaml").write_text(BOT)
    store = _loaded(policies)
    dry_run = BOT.replace("rules:", "mode: dry-run\nrules:")
    issues = _validate(store, new__extra_yaml=dry_run)
    assert issues == {"new/extra_yaml": [f"agent 'bot' has files in different modes: {policies / 'bot.yaml'} "
                                         "(enforce), new/extra_yaml (dry-run); use one mode per agent"]}
    assert store.snapshot.files[0].valid  # the loaded file's own issues are untouched
    assert _validate(store, staging__bot_yaml=dry_run)["staging/bot_yaml"] != []  # another name: both stay
    assert _validate(store, **{"staging__bot.yaml": dry_run}) == {"staging/bot.yaml": []}  # replaces bot.yaml


def _test(store: PolicyStore, method: str, path: str) -> pb.TestPolicyResponse:
    request = pb.TestPolicyRequest(agent="bot", service="svc", method=method, path=path)
    reply: pb.TestPolicyResponse = asyncio.run(
        PolicyService.Test.__wrapped__(_service(store), request, None))  # type: ignore[attr-defined]
    return reply


def test_policy_test_answers_as_the_gate_would(policies: Path) -> None:
    """Found by a review: `policy test` judged paths the gate refuses at its front door (`..`, `//`, `%2f`),
    kept a `#fragment` the gate drops, and took only 7 methods where the gate takes every method its parser
    does (PROPFIND, ...), which a rule without `methods` allows."""
    (policies / "bot.yaml").write_text(BOT)
    store = _loaded(policies)
    for path, said in (("/repos/acme/../../admin", "'.' or '..' segment"), ("//evil.example/x", "starts with '//'"),
                       ("/repos/acme%2f..%2fadmin", "encoded '/'")):
        with pytest.raises(InvalidArgument, match="the gate refuses this path before any policy "
                                                  "\\(400 bad_request\\): ") as refused:
            _test(store, "GET", path)
        assert said in str(refused.value)
    assert _test(store, "GET", "/repos/acme/x#/../../admin").decision == "allowed"
    assert _test(store, "GET", "/repos/acme/x?a=/admin").decision == "allowed"
    assert _test(store, "propfind", "/repos/acme/x").decision == "allowed"
    for method in ("FETCH", "CONNECT", "GET / HTTP/1.1\r\nX: y"):
        with pytest.raises(InvalidArgument, match="is not one the gate takes"):
            _test(store, method, "/repos/acme/x")
    too_long = _test(store, "GET", "/repos/acme/" + "x" * MAX_JUDGED_PATH)
    assert too_long.decision == "denied" and "judges paths of at most 8192 bytes" in too_long.reason


def test_a_path_too_long_to_judge_is_refused_414_in_enforce_mode_and_forwarded_in_dry_run(policies: Path) -> None:
    (policies / "bot.yaml").write_text(BOT)
    store = _loaded(policies)
    agent: Any = SimpleNamespace(name="bot")
    long_path = "/repos/acme/" + "x" * MAX_JUDGED_PATH
    noted: Any = SimpleNamespace(request_id="r1", judged_ms=0, reason="", flags="")
    with pytest.raises(Refusal) as refused:
        check_policy(store.current, noted, agent, "svc", "GET", long_path)
    assert (refused.value.status, refused.value.code) == (414, "path_too_long")
    assert noted.flags == "policy=path_too_long"
    (policies / "bot.yaml").write_text(BOT.replace("rules:", "mode: dry-run\nrules:"))
    asyncio.run(store.reload("aegisctl"))
    noted = SimpleNamespace(request_id="r2", judged_ms=0, reason="", flags="")
    verdict = check_policy(store.current, noted, agent, "svc", "GET", long_path)
    assert verdict is not None and noted.reason == WOULD_DENY and noted.flags == "policy=path_too_long"


def test_a_stop_lets_a_reload_under_way_finish_and_record_itself(policies: Path, tmp_path: Path) -> None:
    """From an operations review: SIGHUP then SIGTERM, and the stop cancelled the watcher at the reload's memory
    write, after the new set was in force but before its log line and ledger event. Now the stop waits for it."""
    from aegisd.policy.memory import PolicyMemory

    (policies / "bot.yaml").write_text(BOT)
    recorded: list[str] = []
    ledger: Any = SimpleNamespace(append_nowait=lambda entry: recorded.append(entry.reason))
    saving, release = threading.Event(), threading.Event()

    class SlowMemory(PolicyMemory):
        def save(self, directory: Path | None, remembered: Any) -> None:
            saving.set()
            release.wait(10)
            super().save(directory, remembered)

    async def main() -> None:
        store = PolicyStore(policies, ledger, memory=SlowMemory(tmp_path / "memory.json"))
        store.start()
        store.request_reload("SIGHUP")
        while not saving.is_set():
            await asyncio.sleep(0.01)
        stopping = asyncio.create_task(store.stop())
        await asyncio.sleep(0.1)
        assert not stopping.done()  # waiting for the reload
        release.set()
        await stopping

    asyncio.run(main())
    assert recorded == ["policy_reloaded"], recorded


def test_a_stop_right_after_a_hangup_returns(policies: Path) -> None:
    """From a review of the stop: a SIGHUP handled in the same loop turn as the stop made asyncio.wait_for (3.11)
    swallow the watcher's cancel, and the watcher then waited for the reload lock the stop held, for ever."""
    (policies / "bot.yaml").write_text(BOT)

    async def main() -> None:
        store = PolicyStore(policies)
        await store.reload("startup")
        store.start()
        await asyncio.sleep(0.05)  # the watcher waits for a wake-up
        store.request_reload("SIGHUP")
        await store.stop()  # in this task, so the stop begins in the SIGHUP's loop turn

    stopping = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    stopping.start()
    stopping.join(10)
    assert not stopping.is_alive(), "the stop hung"


def test_a_reload_stuck_past_the_grace_is_cut_off_and_the_stop_returns(policies: Path, tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A reload stuck on a hung file system must not keep the ledger from being closed at a stop."""
    from aegisd.policy.memory import PolicyMemory

    (policies / "bot.yaml").write_text(BOT)
    saving, release = threading.Event(), threading.Event()

    class StuckMemory(PolicyMemory):
        def save(self, directory: Path | None, remembered: Any) -> None:
            saving.set()
            release.wait(10)

    async def main() -> None:
        store = PolicyStore(policies, memory=StuckMemory(tmp_path / "memory.json"))
        store.start()
        store.request_reload("SIGHUP")
        while not saving.is_set():
            await asyncio.sleep(0.01)
        await asyncio.wait_for(store.stop(grace=0.2), 10)
        release.set()  # the thread, which asyncio.run waits for at its end

    try:
        with caplog.at_level(logging.WARNING):
            asyncio.run(main())
    finally:
        release.set()
    assert "a policy reload still running after 0.2s was cut off by the stop" in caplog.text


def test_the_poll_applies_a_change_only_once_two_polls_find_it(policies: Path) -> None:
    """Found by a cold review: the poll applied a file as soon as its mtime changed, so one rewritten in place and
    read after `- service: svc` (every method and path allowed), or removed before it was copied back (its agent
    ungoverned), was put in force. The end-to-end test races the daemon's own poll; here each poll is one call."""
    cut = "agent: bot\nrules:\n  - service: svc\n"
    (policies / "bot.yaml").write_text(BOT)
    bot = policies / "bot.yaml"

    def allows_admin(store: PolicyStore) -> bool | None:
        verdict = store.current.judge("bot", "svc", "DELETE", "/admin", 0)
        return None if verdict is None else verdict.allowed  # None: ungoverned

    async def main() -> None:
        store = PolicyStore(policies)
        await store.reload("startup")
        await store._poll()  # the poll's first look: as the startup read it
        bot.write_text(cut)  # half-written
        await store._poll()
        assert allows_admin(store) is False
        with bot.open("a") as f:
            f.write("    paths: ['/repos/acme/.*']\n")
        await store._poll()
        assert allows_admin(store) is False and store.snapshot.reloads == 1  # still moving: not applied
        await store._poll()
        assert store.snapshot.reloads == 2 and store.snapshot.trigger == "file change"  # at rest: applied
        bot.unlink()
        await store._poll()
        assert allows_admin(store) is False  # gone at one poll: the agent keeps its rules
        bot.write_text(cut)
        await store._poll()
        await store._poll()
        assert allows_admin(store) is True and store.snapshot.reloads == 3  # the file as it now rests
        bot.unlink()
        await store._poll()
        assert allows_admin(store) is True
        await store._poll()
        assert allows_admin(store) is None and store.snapshot.reloads == 4  # still gone: dropped
        bot.write_text(BOT)
        await store.reload("aegisctl")  # an operator's reload applies what it reads at once
        assert allows_admin(store) is False and store.snapshot.reloads == 5

    asyncio.run(main())


def test_the_directory_is_listed_off_the_event_loop(policies: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a review: the poll listed the directory and stat'ed every file on the gate's event loop (50,000
    files: half a second, every second, with every agent waiting). It runs in a worker thread now."""
    import aegisd.policy.store as store_module

    (policies / "bot.yaml").write_text(BOT)
    real_signature = store_module._signature
    listed_on: list[int] = []

    def signature(directory: Path) -> Any:
        listed_on.append(threading.get_ident())
        return real_signature(directory)

    monkeypatch.setattr(store_module, "_signature", signature)

    async def main() -> None:
        store = PolicyStore(policies, poll_seconds=0.01)
        await store.reload("startup")
        store.start()
        try:
            (policies / "bot.yaml").write_text(BOT + "# changed\n")  # for the watcher to find and reload
            async with asyncio.timeout(20):
                while store.snapshot.reloads < 2:
                    await asyncio.sleep(0.01)
        finally:
            await store.stop()

    asyncio.run(main())
    assert listed_on and threading.get_ident() not in listed_on
