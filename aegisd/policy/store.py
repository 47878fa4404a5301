"""The live policy set: every *.yaml / *.yml file in the policy directory, reloaded as a whole.

Reloads come from SIGHUP, `aegisctl policy reload` and a poll of the files' mtimes (once a
second: dependency-free, and editors' atomic renames are seen like in-place writes). The poll
applies a change only once the directory looks the same at two polls in a row: a file rewritten
in several writes, or removed and copied back, is never put in force half-way (a rule cut before
its `methods:` allows every method; a file gone frees its agent). SIGHUP and `policy reload` apply
what they read at once: the operator says the directory is ready, and `policy reload` answers with
the set in force. The directory is listed, and files are read and parsed, in a worker thread (50,000
files take half a second to stat); the new set is swapped in on the event loop with one assignment,
so a request sees either the old set or the new one. Each reload is a ledger system event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from aegisd.api.accounts import owner_problem
from aegisd.cancellation import to_thread_to_the_end
from aegisd.ledger import LedgerEntry, LedgerError, LedgerWriter
from aegisd.logs import event
from aegisd.policy.memory import UNKNOWN_AGENT, NotOwned, NotRegular, PolicyMemory, Remembered, read_regular
from aegisd.policy.model import Issue, PolicyFile
from aegisd.policy.parse import MAX_POLICY_BYTES, parse_policy, unexpected
from aegisd.policy.policy_set import PolicySet, compile_set

log = logging.getLogger("aegisd.policy")
POLL_SECONDS = 1.0
STOP_GRACE_SECONDS = 10.0  # the daemon's own stop grace: how long a reload under way may finish
SUFFIXES = (".yaml", ".yml")
# The agents a file names, found even when the YAML around it is broken, so only they fail closed (with the
# agent of the file's last valid version, kept in aegisd's data directory: memory.py); when nobody can be
# told, every agent fails closed.
_AGENT_LINE = re.compile(r"""^agent[ \t]*:[ \t]*["']?([a-z0-9][a-z0-9._-]{0,63})["']?[ \t]*(?:#.*)?\r?$""",
                         re.MULTILINE)  # `\r?`: a file with CRLF line endings too
_MAX_LOGGED_ISSUES = 20

Signature = tuple[tuple[str, int, int, int, int, int], ...]
_UNREADABLE: Signature = (("", -1, -1, -1, -1, -1),)


@dataclass
class Snapshot:
    """What the last reload found, for `aegisctl policy list` and `reload`."""

    directory: Path | None
    files: list[PolicyFile] = field(default_factory=list)
    error: str = ""  # the directory itself could not be read; the previous set stays
    loaded_at_ms: int = 0
    trigger: str = ""
    reloads: int = 0


class PolicyStore:
    def __init__(self, directory: Path | None, ledger: LedgerWriter | None = None,
                 poll_seconds: float = POLL_SECONDS, *, memory: PolicyMemory | None = None) -> None:
        """`memory` keeps `_last_valid` across restarts (the daemon's, in its data directory); without one it
        lives only as long as this store."""
        self.current = PolicySet()
        self.snapshot = Snapshot(directory)
        self._ledger = ledger
        self._poll_seconds = poll_seconds
        self._seen: Signature | None = None  # the directory as the last reload found it
        self._polled: Signature | None = None  # the directory as the last poll found it
        self._memory = memory
        # file name -> the agent its last valid version named (UNKNOWN_AGENT: cannot be told); None until the
        # first reload reads what `memory` kept
        self._last_valid: Remembered | None = None if memory is not None else {}
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._pending = ""
        self._task: asyncio.Task[None] | None = None
        self._loaded = False  # a reload has succeeded: a later failure keeps that set in force

    @property
    def directory(self) -> Path | None:
        """The policy directory in use; None when none is configured (no policies at all)."""
        return self.snapshot.directory

    # -- reloading ---------------------------------------------------------------------------

    async def reload(self, trigger: str, *, settled: Signature | None = None) -> Snapshot:
        """Re-read the whole directory, swap the new set in, and write the ledger event.

        `settled`: the directory as two polls in a row found it. Then do nothing if a reload that ran meanwhile
        already read it, or if the directory no longer looks so when read (a write that landed meanwhile: the
        next polls wait for it to rest in turn).
        """
        async with self._lock:
            if settled is not None and settled == self._seen:
                return self.snapshot
            while True:
                directory, previous_valid = self.snapshot.directory, self._last_valid
                signature, files, error = await asyncio.to_thread(self._read_all, directory)
                if settled is not None and signature == settled and directory is not None:
                    signature = await asyncio.to_thread(_signature_or_unreadable, directory)  # a write mid-read
                if settled is not None and signature != settled:
                    return self.snapshot
                if not error and previous_valid is None and self._memory is not None:
                    previous_valid = await asyncio.to_thread(self._memory.load, directory)
                # A SIGHUP that changed policies_dir while this read (request_reload cannot wait for the lock):
                # what was read is the old directory's, and putting it in force would undo the change. Read again.
                if self.snapshot.directory == directory:
                    break
            previous, governed = self.snapshot, bool(self.current.agents or self.current.fail_all)
            self.snapshot = Snapshot(directory, files if not error else previous.files, error,
                                     time.time_ns() // 1_000_000, trigger, previous.reloads + 1)
            self._seen = signature
            if not error:
                self._loaded = True
                last_valid = _remember(files, previous_valid)
                self.current = compile_set(files)
                self._last_valid = last_valid
                if self._memory is not None:  # in force already: its ledger row must follow even if the caller left
                    await to_thread_to_the_end(self._memory.save, directory, last_valid)
            self._report(self.snapshot, dropped=governed and not error and not files)
            return self.snapshot

    def request_reload(self, trigger: str, directory: Path | None = None, *, change_directory: bool = False) -> None:
        """Ask the watcher to reload soon (from a signal handler: no await there)."""
        if change_directory and directory != self.snapshot.directory:
            self.snapshot.directory = directory
            # What a file's last valid version named belongs to that directory's file, not to a namesake: the next
            # reload reads what the memory kept for the new directory (without one, it starts empty).
            self._last_valid = None if self._memory is not None else {}
            self._polled = None  # what the polls saw was the old directory
        self._pending = trigger
        self._wake.set()

    def _read_all(self, directory: Path | None) -> tuple[Signature | None, list[PolicyFile], str]:
        if directory is None:
            return None, [], ""
        try:
            signature = _signature(directory)
            problem = untrusted(directory)
        except OSError as exc:
            return _UNREADABLE, [], f"cannot read the policy directory {directory}: {exc.strerror or exc}"
        if problem is not None:  # another user could lift a policy: none of what is there is taken
            return signature, [], f"{problem}: {UNTRUSTED_CONSEQUENCE}; {UNTRUSTED_FIX}"
        files = []
        for name, *_ in signature[1:]:  # the first entry is the directory's own
            try:  # a symlink to a FIFO is listed (_signature): opening it must not wait for a writer; one another
                # user may write fails closed, as an invalid file does
                data = read_regular(directory / name, MAX_POLICY_BYTES + 1, follow_symlinks=True, owned=True)
            except (OSError, NotRegular, NotOwned) as exc:
                why = getattr(exc, "strerror", None) or exc
                files.append(PolicyFile(name, issues=[Issue(name, 0, 0, "", f"cannot read the file: {why}")]))
                continue
            try:
                parsed = parse_policy(name, data)
            except Exception as exc:  # parse_policy reports every problem as an issue; should one still escape,
                # only this file is invalid (it fails closed), and the others' changes still apply
                log.error("reading policy file %r failed: %s", name, type(exc).__name__)
                parsed = PolicyFile(name, issues=[Issue(name, 0, 0, "", unexpected(exc))])
            if not parsed.valid:
                parsed.names(*_agents_in_text(data))
            files.append(parsed)
        return signature, files, ""

    def _report(self, snap: Snapshot, *, dropped: bool = False) -> None:
        """Log the reload and write its ledger event. `dropped`: policies were in force and none are now (an
        emptied directory, or a SIGHUP after `[policy] dir` was removed), which is said as a warning, since a
        typo in the config file would otherwise free every agent with one INFO line."""
        if snap.error and self._loaded:
            detail, reason = f"policy reload ({snap.trigger}) failed: {snap.error}; the previous policies stay", \
                "policy_reload_failed"
            log.error("%s", detail)
        elif snap.error:  # the first load: there is no previous set, and the daemon refuses to start with this
            # error, which its own last line says (logged here too, it would be said twice)
            detail, reason = f"policies could not be loaded ({snap.trigger}): {snap.error}", "policy_reload_failed"
            log.debug("%s", detail)
        else:
            invalid = [f for f in snap.files if not f.valid]
            agents = len(self.current.agents)
            detail = f"policies reloaded ({snap.trigger}): {len(snap.files)} files, {agents} agents"
            reason = "policy_reloaded"
            if dropped:
                where = f"the policy directory {snap.directory} has no policy files now" if snap.directory else \
                    "no policy directory is configured now"
                detail += f"; {where}, so every policy was dropped: every agent is governed by its grants and " \
                    "scopes only"
            if invalid:
                reason = "policy_invalid"
                detail += "; invalid, failing closed: " + ", ".join(_failing(f) for f in invalid)
                issues = [issue for f in invalid for issue in f.issues]
                for issue in issues[:_MAX_LOGGED_ISSUES]:
                    log.error("policy error: %s", issue)
                if len(issues) > _MAX_LOGGED_ISSUES:
                    log.error("... and %d more policy errors (see `aegisctl policy list`)",
                              len(issues) - _MAX_LOGGED_ISSUES)
            event(log, logging.WARNING if invalid or dropped else logging.INFO, detail)
        if self._ledger is not None:
            try:
                self._ledger.append_nowait(LedgerEntry.system(detail, reason=reason))
            except LedgerError as exc:
                log.error("cannot record the policy reload in the ledger: %s", exc)

    # -- watching ----------------------------------------------------------------------------

    def start(self) -> None:
        """Begin watching for reload requests and file changes."""
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="aegis-policy-watch")

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop watching (before the ledger closes). A reload under way finishes first, for up to `grace` seconds:
        cancelled at its memory write, it would have put the new policies in force without its log line and ledger
        event; one stuck longer (a hung file system) is cut off, so the ledger is still closed."""
        task, self._task = self._task, None
        if task is None:
            return
        held = False
        try:
            async with asyncio.timeout(grace):
                held = await self._lock.acquire()
        except TimeoutError:
            log.warning("a policy reload still running after %gs was cut off by the stop", grace)
        try:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            if held:
                self._lock.release()

    async def _watch(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that lands as the wait ends (a
            # SIGHUP in the same loop turn as the stop), and the watcher would go on to a reload stop() waits for.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_seconds):
                    await self._wake.wait()
            self._wake.clear()
            trigger, self._pending = self._pending, ""
            try:
                if trigger:
                    await self.reload(trigger)
                else:
                    await self._poll()
            except Exception:  # the watcher must outlive any one bad reload
                log.exception("policy reload failed")

    async def _poll(self) -> None:
        """Reload if the directory differs from what the last reload read and is as the previous poll found it.

        A change is applied only once it has rested for a poll interval (so one to two intervals after the last
        write): until then the set in force stays, and with it the rules, or the failing closed, of a file that
        is half-written or gone, until the next poll finds it so still.
        """
        directory = self.snapshot.directory
        if directory is None:
            return
        signature = await asyncio.to_thread(_signature_or_unreadable, directory)  # not on the gate's event loop
        if directory != self.snapshot.directory:  # a SIGHUP changed policies_dir meanwhile: its reload reads it
            return
        settled, self._polled = signature == self._polled, signature
        if settled and signature != self._seen:
            await self.reload("file change", settled=signature)


def _signature_or_unreadable(directory: Path) -> Signature:
    """The directory's signature as a poll compares it; _UNREADABLE (as the read reports it) if it cannot be listed."""
    try:
        return _signature(directory)
    except OSError:
        return _UNREADABLE


UNTRUSTED_CONSEQUENCE = "another local user could rewrite or remove a policy and so lift an agent's limits"
UNTRUSTED_FIX = "make it aegisd's user's or root's, and chmod go-w it"


def untrusted(directory: Path) -> str | None:
    """Why another local user could change the policy directory (its owner or mode, or a directory above it that
    they own or may write and that is not sticky), or None. Both the path as configured and the one its symlinks
    lead to are walked: a link under another user's directory could be pointed elsewhere (each link itself, in
    a directory of the first walk, can be changed only by that directory's owner)."""
    for path in dict.fromkeys((directory.absolute(), directory.resolve())):
        problem = owner_problem(os.stat(path))
        if problem is not None:
            return f"the policy directory {path} {problem}"
        for above in path.parents:
            if above.is_symlink():  # only its owner can change a link (its mode means nothing): /tmp on macOS
                owner = os.lstat(above).st_uid
                problem = None if owner in (os.geteuid(), 0) else f"is a symbolic link of uid {owner}"
            else:
                problem = owner_problem(os.stat(above), sticky_ok=True)
            if problem is not None:
                return f"{above}, above the policy directory {path}, {problem}"
    return None


def _signature(directory: Path) -> Signature:
    """Name, mtime, size, inode, owner and mode of every policy file, and the directory's own owner and mode: any
    edit, rename or removal changes it, and so does a `chmod` that makes a file or the directory trusted (or not)."""
    own = directory.stat()
    found: list[tuple[str, int, int, int, int, int]] = [("", 0, 0, 0, own.st_uid, own.st_mode)]
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(SUFFIXES):
                continue
            try:
                if not entry.is_file():  # a FIFO, a directory, a socket, a device, or a symlink to one or to nothing:
                    found.append((entry.name, 0, 0, 0, 0, 0))  # listed, so reading it fails closed, never skipped
                    continue
                info = entry.stat()
            except FileNotFoundError:
                continue
            found.append((entry.name, info.st_mtime_ns, info.st_size, info.st_ino, info.st_uid, info.st_mode))
    return tuple(sorted(found))


def _remember(files: list[PolicyFile], previous: Remembered | None) -> Remembered:
    """The agent each file's last valid version named, and each invalid file made to fail closed for it too.

    An invalid file fails closed for its last valid agent, whomever else it names now: an edit that swaps or
    adds an `agent:` line must not free the agent it restricted. It keeps that agent over later reloads until
    it is valid again. With `previous` None (the memory could not be read) no invalid file's last valid agent
    can be told, so each fails closed for every agent, and keeps doing so until it is valid again.
    """
    remembered: Remembered = {}
    for policy_file in files:
        if policy_file.valid:
            remembered[policy_file.name] = policy_file.agents[0]
            continue
        agent = UNKNOWN_AGENT if previous is None else previous.get(policy_file.name)
        if agent is None:
            continue
        remembered[policy_file.name] = agent
        if agent == UNKNOWN_AGENT:
            policy_file.agents.clear()  # names no agent, so compile_set fails every agent closed for it
        else:
            policy_file.names(agent)
    return remembered


def _agents_in_text(data: bytes) -> list[str]:
    """Every agent a top-level `agent:` line of an invalid file names: when its YAML is broken, no line can be
    told to be the one in force, so each of them fails closed."""
    return [match.group(1) for match in _AGENT_LINE.finditer(data.decode("utf-8", "replace"))]


def _failing(policy_file: PolicyFile) -> str:
    if not policy_file.agents:
        return f"{policy_file.name} (every agent)"
    return f"{policy_file.name} (agent{'s' if len(policy_file.agents) > 1 else ''} {policy_file.agent})"
