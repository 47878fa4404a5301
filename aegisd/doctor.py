"""`aegisctl doctor`, daemon side: each check says pass, warn, fail or skip, what it found, and what to do.

Checks only read: nothing here changes state, and a check that crashes becomes a failed check rather
than a failed call. Messages name files, modes and credential names, never a secret.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aegisd.api.accounts import user_name
from aegisd.backup import interrupted
from aegisd.control.socket import group_reach_problem
from aegisd.errors import AegisError
from aegisd.gate.routing import build_route
from aegisd.ledger import SCHEMA_VERSION as LEDGER_SCHEMA_VERSION
from aegisd.ledger import LedgerError, open_reader
from aegisd.ledger.chain import RESTORED
from aegisd.ledger.entry import iso_time
from aegisd.ledger.integrity import describe, hidden_rows_note, integrity_problems
from aegisd.policy.hints import file_warnings, known_names
from aegisd.policy.store import UNTRUSTED_CONSEQUENCE, UNTRUSTED_FIX, untrusted
from aegisd.runtime import Runtime
from aegisd.store import SCHEMA_VERSION as VAULT_SCHEMA_VERSION
from aegisd.vault.credentials import Credential
from aegisd.vault.sealing import NOT_ADOPTED, OK, TAMPERED, UNCHECKED

log = logging.getLogger("aegisd.doctor")
PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"
EXPIRY_WARNING_MS = 7 * 24 * 3600 * 1000
GATE_TIMEOUT_SECONDS = 5.0
_NAMES_SHOWN = 10
# The files whose swap hands aegisd someone else's data: each must be a regular file of the directory's owner.
_DATABASES = tuple(f"{db}{suffix}" for db in ("vault.db", "ledger.db") for suffix in ("", "-wal", "-shm"))
_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    message: str
    hint: str = ""


def _mode(value: int) -> str:
    return f"{stat.S_IMODE(value):04o}"


def data_dir_mode_problem(directory: os.PathLike[str] | str, mode: int) -> str:
    """Why the data directory's mode fails the `data_dir` check (group or others may enter it), or "".
    aegisd warns at start with the same words, so the two never disagree."""
    if mode & 0o077:
        return f"{directory} is mode {_mode(mode)}, not 0700"
    return ""


# The newest restore row since a time, among the rows after the last chained one, read backwards by id (+time_ms:
# not through the time index, which would read every row since that time).
_RESTORED_SINCE = ("SELECT time_ms FROM ledger WHERE id > coalesce((SELECT id FROM ledger WHERE mac IS NOT NULL "
                   "ORDER BY id DESC LIMIT 1), 0) AND +time_ms >= ? AND kind = 'system' AND reason = ? "
                   "ORDER BY id DESC LIMIT 1")


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _unservable(credential: Credential, secret: bytes) -> str:
    """Why the gate cannot build this credential's route (as RoutingState does), or "" if it can."""
    try:
        build_route(credential, secret)
    except Exception as exc:
        return exc.message if isinstance(exc, AegisError) else type(exc).__name__
    return ""


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    return shown + (f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "")


class Doctor:
    """Runs every check against the live daemon."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.config = runtime.config

    async def diagnose(self) -> list[Check]:
        checks: list[tuple[str, Callable[[], Awaitable[Check]]]] = [
            ("vault", self.vault),
            ("data_dir", self.data_dir),
            ("socket", self.socket),
            ("database", self.database),
            ("restore", self.restore),
            ("schema", self.schema),
            ("credentials_decrypt", self.credentials_decrypt),
            ("credentials_expiry", self.credentials_expiry),
            ("agents_authentic", self.agents_authentic),
            ("older_rows", self.older_rows),
            ("webhooks", self.webhooks),
            ("gate", self.gate),
            ("policies", self.policies),
            ("ledger_chain", self.ledger_chain),
        ]
        results = []
        for name, check in checks:
            try:
                results.append(await check())
            except Exception as exc:  # one broken check must not hide the others
                log.exception("doctor check %s crashed", name)
                results.append(Check(name, FAIL, f"the check itself failed ({type(exc).__name__})",
                                     "see aegisd's log"))
        return results

    async def vault(self) -> Check:
        state = self.rt.vault.state
        if state == "uninitialized":
            return Check("vault", WARN, "no vault has been created yet", "run `aegisctl init`")
        if state == "locked":
            return Check("vault", WARN, "the vault is locked: the gate refuses every request (503 vault_locked)",
                         "run `aegisctl unlock`")
        counts = await asyncio.to_thread(self.rt.vault.counts)
        return Check("vault", PASS, f"unlocked: {counts['credentials']} credentials, {counts['agents']} agents")

    async def data_dir(self) -> Check:
        return await asyncio.to_thread(self._data_dir)

    def _data_dir(self) -> Check:
        """The directory aegisd's own and 0700; every file in it private and of the directory's owner; and the
        databases (with their -wal and -shm) regular files, not links: the owner of a link's target, or of a
        file, can swap or read what aegisd keeps there (lstat throughout: nothing here follows a link)."""
        directory = self.config.data_dir
        info = directory.stat()
        owner = info.st_uid
        problems, hints = [], []
        if owner != os.geteuid():
            problems.append(f"{directory} belongs to uid {owner}, not aegisd's uid {os.geteuid()}")
            hints.append(f"as root: chown {user_name(os.geteuid())} {directory}")
        mode_problem = data_dir_mode_problem(directory, info.st_mode)
        loose, foreign, irregular = [], [], []
        for path in sorted(directory.iterdir()):
            entry = path.lstat()
            if path.name in _DATABASES and not stat.S_ISREG(entry.st_mode):
                irregular.append(f"{path.name} ({_kind(entry.st_mode)})")
            if not stat.S_ISREG(entry.st_mode):
                continue
            if entry.st_mode & 0o077:
                loose.append(f"{path.name} ({_mode(entry.st_mode)})")
            if entry.st_uid != owner:
                foreign.append(f"{path.name} (uid {entry.st_uid})")
        if mode_problem:
            problems.append(mode_problem)
        if loose:
            problems.append(f"files readable or writable by others: {_names(loose)}")
        if mode_problem or loose:
            hints.append(f"as aegisd's user: chmod 700 {directory}, and chmod 600 each file named")
        if foreign:
            problems.append(f"files not owned by uid {owner}, the owner of {directory}: {_names(foreign)}")
            hints.append(f"find who changed their owner (it can swap or read them), then as root: chown "
                         f"{user_name(owner)} each file named")
        if irregular:
            problems.append(f"not regular files: {_names(irregular)}")
            hints.append("stop aegisd and put the real file in place of each one named, or restore the last good "
                         "backup (`aegisctl restore FILE`): whoever controls what a link points to can swap or read "
                         "aegisd's data")
        if problems:
            return Check("data_dir", FAIL, "; ".join(problems), "; ".join(hints))
        return Check("data_dir", PASS, f"{directory} is 0700 and its files are private")

    async def socket(self) -> Check:
        return await asyncio.to_thread(self._socket)

    def _socket(self) -> Check:
        path, wanted = self.config.socket_path, self.config.socket_mode
        info = path.lstat()
        problems = []
        if not stat.S_ISSOCK(info.st_mode):
            problems.append(f"{path} is not a socket")
        elif stat.S_IMODE(info.st_mode) != wanted:
            problems.append(f"{path} is mode {_mode(info.st_mode)}, configured {wanted:04o}")
        if self.config.socket_group:
            gid = grp.getgrnam(self.config.socket_group).gr_gid
            if info.st_gid != gid:
                problems.append(f"{path} is not in group {self.config.socket_group}")
        if problems:
            return Check("socket", FAIL, "; ".join(problems),
                         "something changed the socket's permissions: restart aegisd to recreate them, and find "
                         "what chmods it")
        # As aegisd warns at start: the group cannot pass a directory above the socket. Still usable by aegisd's
        # user, so a warning.
        unreachable = (group_reach_problem(path, self.config.socket_group, self.config.data_dir)
                       if self.config.socket_group else None)
        if unreachable:
            return Check("socket", WARN, *unreachable)
        # A directory aegisd did not create keeps its mode; the socket's own mode is what guards it, so a
        # wider directory is worth tightening, not a failure.
        parent = path.parent.stat()
        narrow = "0750" if self.config.socket_group else "0700"
        if parent.st_mode & (0o027 if self.config.socket_group else 0o077):
            return Check("socket", WARN, f"{path} is mode {wanted:04o}, but its directory {path.parent} is mode "
                         f"{_mode(parent.st_mode)}, wider than {narrow}",
                         f"chmod {narrow} {path.parent} (or give aegisd a --socket in a directory of its own)")
        return Check("socket", PASS, f"{path} is mode {wanted:04o}")

    async def database(self) -> Check:
        vault_result = await asyncio.to_thread(self._quick_check_vault)
        ledger_result = await asyncio.to_thread(self._integrity_check_ledger)
        bad = [f"{name}: {result}" for name, result in (("vault.db", vault_result), ("ledger.db", ledger_result))
               if result != "ok"]
        if bad:
            return Check("database", FAIL, "integrity check failed: " + "; ".join(bad),
                         "stop aegisd, keep a copy of the data directory, and restore the last good backup "
                         "(`aegisctl restore FILE`)")
        return Check("database", PASS, "vault.db passes PRAGMA quick_check, ledger.db PRAGMA integrity_check")

    async def restore(self) -> Check:
        """A restore a crash cut off while it swapped files (backup/interrupted.py)."""
        note = await asyncio.to_thread(interrupted.cut_off, self.config.data_dir)
        if note is None:
            return Check("restore", PASS, "no restore was cut off")
        return Check("restore", FAIL, note, interrupted.way_out(self.config.data_dir))

    def _quick_check_vault(self) -> str:
        try:
            with self.rt.store.reading() as conn:
                return str(conn.execute("PRAGMA quick_check").fetchone()[0])
        except AegisError as exc:
            return exc.message

    def _integrity_check_ledger(self) -> str:
        """The full check, not quick_check: only it compares each index with the table, and an index rebuilt
        without some rows hides them from every filtered read while the chain verifies. It costs 2 to 3 s per
        million rows, less than ledger_chain's walk, which therefore leaves it to this check."""
        try:
            conn = open_reader(self.config.data_dir / "ledger.db")
        except LedgerError as exc:
            return str(exc)
        try:
            problems = integrity_problems(conn)
            if not problems:
                return "ok"
            note = hidden_rows_note(problems)
            return describe(problems) + (f" ({note})" if note else "")
        except sqlite3.Error as exc:
            return str(exc)
        finally:
            conn.close()

    async def schema(self) -> Check:
        vault_version = await asyncio.to_thread(self.rt.store.schema_version)
        ledger_version = await asyncio.to_thread(self._ledger_version)
        found = f"vault schema {vault_version}, ledger schema {ledger_version}"
        if (vault_version, ledger_version) != (VAULT_SCHEMA_VERSION, LEDGER_SCHEMA_VERSION):
            return Check("schema", FAIL, f"{found}; this aegisd expects {VAULT_SCHEMA_VERSION} and "
                         f"{LEDGER_SCHEMA_VERSION}", "restart aegisd so it migrates its databases")
        return Check("schema", PASS, found)

    def _ledger_version(self) -> int | str:
        try:
            conn = open_reader(self.config.data_dir / "ledger.db")
        except LedgerError as exc:
            return str(exc)
        try:
            return int(conn.execute("SELECT version FROM schema_version").fetchone()[0])
        finally:
            conn.close()

    async def credentials_decrypt(self) -> Check:
        if self.rt.vault.state != "unlocked":
            return Check("credentials_decrypt", SKIP, "needs the vault unlocked")
        return await asyncio.to_thread(self._credentials_decrypt)

    def _credentials_decrypt(self) -> Check:
        creds = self.rt.vault.checked_credentials()
        broken = [f"{c.credential.name} ({c.credential.id})" for c in creds if c.status == TAMPERED]
        waiting = sum(c.status == NOT_ADOPTED for c in creds)  # an older aegisd's: the older_rows check reports those
        if broken:
            self.rt.vault.notify("credentials")  # an edit made behind aegisd's back: the gate's table catches up now
            return Check("credentials_decrypt", FAIL, f"{len(broken)} of {len(creds)} credentials fail to decrypt "
                         f"(the secret or the metadata sealed with it was changed outside aegisd, or moved), so the "
                         f"gate does not serve them: {_names(broken)}",
                         "remove each row by its id (`aegisctl vault remove --id ID`) and add the credential again as "
                         "you intend it, or restore a good backup")
        unservable = [f"{c.credential.name} ({reason})" for c in creds
                      if c.status == OK and c.secret is not None and (reason := _unservable(c.credential, c.secret))]
        if unservable:
            return Check("credentials_decrypt", FAIL, f"{len(unservable)} of {len(creds)} credentials decrypt but "
                         f"their stored settings no longer build a route, so the gate does not serve them: "
                         f"{_names(unservable)}", "set each one's settings again with `aegisctl vault update`")
        adopt = f" ({waiting} of them from an older aegisd, waiting to be adopted)" if waiting else ""
        return Check("credentials_decrypt", PASS, f"all {len(creds)} credentials decrypt{adopt}")

    async def agents_authentic(self) -> Check:
        if self.rt.vault.state != "unlocked":
            return Check("agents_authentic", SKIP, "needs the vault unlocked")
        bad = await asyncio.to_thread(self.rt.agents.unauthentic)
        if bad:
            await asyncio.to_thread(self.rt.vault.notify, "agents")  # as for credentials: the gate catches up now
            return Check("agents_authentic", FAIL, f"{len(bad)} agent or grant rows fail authentication (changed "
                         f"outside aegisd), so the gate ignores them: {_names(bad)}",
                         "remove such an agent row by its id (`aegisctl agent remove --id ID`) and add the agent "
                         "again; for a grant AGENT->CREDENTIAL, `aegisctl revoke AGENT CREDENTIAL`, then grant it "
                         "again if it is meant; or restore a good backup")
        counts = await asyncio.to_thread(self.rt.vault.counts)
        return Check("agents_authentic", PASS, f"all {counts['agents']} agents and {counts['grants']} grants "
                     "authenticate")

    async def older_rows(self) -> Check:
        if self.rt.vault.state != "unlocked":
            return Check("older_rows", SKIP, "needs the vault unlocked")
        older = await asyncio.to_thread(self.rt.vault.older_rows)
        if older.unadoptable:
            return Check("older_rows", FAIL, f"{len(older.unadoptable)} agent rows without a MAC fail today's checks, "
                         f"so they can be neither served nor adopted: {_names(older.unadoptable)}",
                         "remove each by its id (`aegisctl agent remove --id ID`) and add the agent again")
        if older:
            return Check("older_rows", FAIL, f"{older.summary()} from an older aegisd are not served until adopted",
                         "`aegisctl vault adopt` lists them; check them, then adopt them")
        return Check("older_rows", PASS, "nothing from an older aegisd waits to be adopted")

    async def webhooks(self) -> Check:
        hooks = self.rt.webhooks
        if self.rt.vault.state != "unlocked" or hooks is None:
            return Check("webhooks", SKIP, "needs the vault unlocked")
        count, bad = await asyncio.to_thread(hooks.registry.failing)
        if bad:
            await asyncio.to_thread(hooks.reload)  # as for credentials: what is delivered catches up with the edit now
            return Check("webhooks", FAIL, f"{len(bad)} of {count} webhooks fail authentication (their URL, origin or "
                         f"events were changed outside aegisd), so nothing is sent to them: {_names(bad)}",
                         "remove each (`aegisctl webhook remove ID`) and add it again as you intend it, or restore a "
                         "good backup")
        return Check("webhooks", PASS, f"all {count} webhooks authenticate")

    async def credentials_expiry(self) -> Check:
        if self.rt.vault.state == "uninitialized":
            return Check("credentials_expiry", SKIP, "no vault yet")
        checks = await asyncio.to_thread(self.rt.vault.checked_credentials)
        creds = [c.credential for c in checks if c.status in (OK, UNCHECKED)]  # failing rows: credentials_decrypt
        now = int(time.time() * 1000)
        expired = [c.name for c in creds if c.expires_at is not None and c.expires_at <= now]
        soon = [c.name for c in creds if c.expires_at is not None and now < c.expires_at <= now + EXPIRY_WARNING_MS]
        if expired:
            more = f"; expiring within 7 days: {_names(soon)}" if soon else ""
            return Check("credentials_expiry", FAIL, f"expired, so the gate refuses them: {_names(expired)}{more}",
                         "rotate in a new secret and extend it: `aegisctl vault rotate NAME`, then "
                         "`aegisctl vault update NAME --ttl 90d`")
        if soon:
            return Check("credentials_expiry", WARN, f"expiring within 7 days: {_names(soon)}",
                         "rotate and extend them before they expire (`aegisctl vault rotate NAME`, "
                         "`aegisctl vault update NAME --ttl 90d`)")
        return Check("credentials_expiry", PASS, f"none of {len(creds)} credentials expired or expiring within 7 days")

    async def gate(self) -> Check:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.config.gate_host,  # noqa: S104
                                                                        self.config.gate_host)
        url = f"http://{f'[{host}]' if ':' in host else host}:{self.config.gate_port}/_aegis/health"
        import aiohttp  # here: the daemon answers doctor runs, and should not hold aiohttp (~14 MiB) for them

        timeout = aiohttp.ClientTimeout(total=GATE_TIMEOUT_SECONDS)
        try:
            async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session, \
                    session.get(url, allow_redirects=False) as response:
                status, ours = response.status, "X-Aegis-Request-Id" in response.headers
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return Check("gate", FAIL, f"the gate does not answer at {url}: {type(exc).__name__}",
                         "see aegisd's log; is something else holding the gate's port, or a firewall in the way?")
        if status == 200 and ours:
            return Check("gate", PASS, f"the gate answers at {url}")
        if ours and not self.config.health_enabled:
            return Check("gate", PASS, f"the gate answers at http://{host}:{self.config.gate_port} "
                         "(its health endpoint is turned off)")
        return Check("gate", FAIL, f"{url} answered {status}{'' if ours else ' without an Aegis request id'}: "
                     "something other than this aegisd is answering", "check which process listens on the port")

    async def policies(self) -> Check:
        snap = self.rt.policies.snapshot
        if snap.directory is None:
            return Check("policies", SKIP, "no policy directory configured: grants and scopes alone apply")
        try:  # the live directory, not the last reload's: a chmod since then changes no file, so no reload saw it
            problem = await asyncio.to_thread(untrusted, snap.directory)
        except OSError:
            problem = None  # unreadable: the snapshot says so
        if problem is not None:
            return Check("policies", FAIL, f"{problem}: {UNTRUSTED_CONSEQUENCE}",
                         f"{UNTRUSTED_FIX}, then `aegisctl policy reload`")
        if snap.error:
            return Check("policies", FAIL, snap.error, f"make {snap.directory} readable by aegisd, then "
                         "`aegisctl policy reload`")
        invalid = [f for f in snap.files if not f.valid]
        if invalid:
            issues = [str(issue) for f in invalid for issue in f.issues]
            return Check("policies", FAIL, f"{len(invalid)} of {len(snap.files)} policy files are invalid, so their "
                         f"agents are refused (fail closed): {_names(issues)}",
                         "fix them (`aegisctl policy list` shows every issue); they reload on save")
        # Valid, but naming an agent or a service the vault does not have: loaded and harmless to the gate,
        # yet usually a typo that leaves the intended agent ungoverned (policy/hints.py).
        known = await asyncio.to_thread(known_names, self.rt.store, self.rt.vault.vault_id is not None)
        warnings = [str(warning) for f in snap.files for warning in file_warnings(f, known, brief=True)]
        if warnings:
            return Check("policies", WARN, f"{len(snap.files)} policy files in {snap.directory}, all valid, but some "
                         f"name an agent or a service this vault does not have (a misspelt agent leaves the one "
                         f"meant ungoverned): {_names(warnings)}",
                         "fix a misspelt `agent:` or `service:` (they reload on save); a file for an agent you have "
                         "not created yet governs it from its creation (`aegisctl agent add NAME`)")
        return Check("policies", PASS, f"{len(snap.files)} policy files in {snap.directory}, all valid")

    def _key_unknown_since(self) -> str:
        """Since when the chain key is unknown: aegisd's start, or a restore after it (a restore drops the key: the
        restored ledger's chain belongs to the vault restored with it). The restore's row, written without the key,
        is among the rows after the last chained one (only the refusals of the locked gate follow it), so only those
        are read; if the ledger cannot be read, a wording true of both."""
        started_ms = int(self.rt.started_at * 1000)
        try:
            conn = open_reader(self.config.data_dir / "ledger.db")
        except LedgerError:
            return "aegisd started or a backup was restored"
        try:
            row = conn.execute(_RESTORED_SINCE, (started_ms, RESTORED)).fetchone()
        except sqlite3.Error:
            return "aegisd started or a backup was restored"
        finally:
            conn.close()
        if row is None:
            return "aegisd started"
        try:
            return f"a backup was restored at {iso_time(row[0])}"
        except (TypeError, ValueError, OverflowError, OSError):  # not the writer's row
            return "a backup was restored"

    async def ledger_chain(self) -> Check:
        key = self.rt.ledger_key()
        if key is None:
            since = await asyncio.to_thread(self._key_unknown_since)
            return Check("ledger_chain", WARN, f"cannot verify: the vault has not been unlocked since {since} (the "
                         "chain key derives from it)", "run `aegisctl unlock`, then `aegisctl doctor` again")
        await self.rt.ledger.settle()  # the rows written before the unlock are chained by now
        # What the writer saw done to its file (replaced, removed, its newest row cut) fails the check as it fails
        # `ledger verify`, even if what the path holds now verifies; so does a file without the writer's newest row.
        tampered = self.rt.ledger.tampered
        if tampered:
            return Check("ledger_chain", FAIL, tampered, "keep ledger.db as evidence and find out who can write the "
                         "data directory; `aegisctl ledger verify` shows the same until aegisd is restarted or a "
                         "backup restored")
        try:
            # The database check above runs the integrity check on ledger.db: not twice.
            result, _ = await self.rt.ledger.verify_file(key, check_database=False)
        except LedgerError as exc:
            return Check("ledger_chain", FAIL, str(exc), "see `aegisctl ledger verify`")
        if result.unchained_only:
            return Check("ledger_chain", FAIL, result.reason,
                         "look at those rows (`aegisctl ledger show`); once reviewed, `aegisctl ledger prune --before "
                         "TIME --include-unchained` lets them go")
        if not result.ok:
            where = f"first bad row {result.first_bad_id}: " if result.first_bad_id else ""
            return Check("ledger_chain", FAIL, f"{where}{result.reason}",
                         "keep a copy of ledger.db as evidence and investigate; `aegisctl ledger verify` shows "
                         "the same result")
        return Check("ledger_chain", PASS, result.reason)
