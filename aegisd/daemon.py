"""The daemon's life: harden, open storage, auto-unlock, serve, and shut down cleanly.

SIGTERM/SIGINT stop accepting, let in-flight calls finish, close the database and exit 0;
SIGHUP re-reads the config file and the policies and applies what can change without a restart.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import signal
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from aegisd import __version__
from aegisd.agents import AgentRegistry
from aegisd.api.accounts import user_name
from aegisd.backup import clear_leftovers, interrupted
from aegisd.config import (
    UNLOCK_CREDENTIAL_NAME,
    Config,
    ConfigError,
    changed_settings,
    load_config,
    startup_warnings,
)
from aegisd.control.server import ControlServer
from aegisd.doctor import data_dir_mode_problem
from aegisd.errors import log_safe
from aegisd.gate.agent_connection import AgentConnections
from aegisd.gate.pipeline import GatePipeline
from aegisd.gate.routing import RoutingState
from aegisd.gate.server import GateServer
from aegisd.gate.upstream import UpstreamPool
from aegisd.hardening import harden_process
from aegisd.ledger import LedgerEntry, LedgerError, LedgerWriter
from aegisd.logs import event, set_level
from aegisd.metrics import GateMetrics
from aegisd.outcomes import OutcomeSink
from aegisd.policy import MEMORY_FILE, PolicyMemory, PolicyStore
from aegisd.runtime import Runtime
from aegisd.sdnotify import ServiceManager
from aegisd.store import VaultStore
from aegisd.vault.crypto import argon2_settings
from aegisd.vault.vault import Vault
from aegisd.webhooks import Webhooks

log = logging.getLogger("aegisd")
# The Config fields a SIGHUP applies to the running daemon (see _reload); a change to any other needs a restart.
APPLIED_ON_RELOAD = frozenset({"log_level", "policies_dir"})


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


class Daemon:
    def __init__(self, config: Config, flags: Mapping[str, Any]) -> None:
        self.config = config
        self._flags = flags
        self._stop = asyncio.Event()
        self._manager = ServiceManager()
        self._data_lock: int | None = None
        self._policies: PolicyStore | None = None
        self._vault: Vault | None = None

    async def run(self) -> int:
        harden_process()
        self._install_stop_signals()
        for warning in startup_warnings(self.config):
            log.warning("%s", warning)
        self._prepare_data_dir()
        _clear_backup_leftovers(self.config.data_dir)
        store = VaultStore(self.config.data_dir / "vault.db")
        store.open()
        self._vault = vault = Vault(store, argon2_settings(self.config.kdf_memory_mib, self.config.kdf_iterations))
        ledger = LedgerWriter(self.config.data_dir / "ledger.db")
        try:
            await ledger.start()
        except LedgerError as exc:
            store.close()
            raise StartupError(str(exc)) from None
        _report_cut_off_restore(self.config.data_dir, ledger)
        runtime = Runtime(self.config, store, vault, AgentRegistry(store, vault), ledger)
        runtime.policies = self._policies = policies = PolicyStore(
            self.config.policies_dir, ledger, memory=PolicyMemory(self.config.data_dir / MEMORY_FILE))
        routing = RoutingState(vault, runtime.agents)
        vault.add_listener(routing.on_vault_event)
        vault.add_listener(lambda event_name: _key_ledger(vault, ledger, event_name))
        vault.add_listener(self._vault_status)
        runtime.webhooks = webhooks = Webhooks(self.config, store, vault)
        webhooks.start()
        self._auto_unlock(vault)
        upstream = UpstreamPool(connect_timeout=self.config.connect_timeout, read_timeout=self.config.read_timeout,
                                total_timeout=self.config.total_timeout)
        connections = AgentConnections(self.config.max_connections)
        metrics = (GateMetrics(vault, ledger, webhooks.dispatcher, connections) if self.config.metrics_enabled
                   else None)
        outcomes = OutcomeSink(routing, metrics, webhooks)
        gate = GateServer(GatePipeline(self.config, routing, ledger, upstream, outcomes, policies),
                          self.config.gate_host, self.config.gate_port, connections)
        control = ControlServer(runtime)
        control_running = served = False
        try:
            await _load_policies(policies)
            await control.start()
            control_running = True
            await gate.start()
            _handle_sighup(self._reload)
            self._manager.ready(self._status_line())
            self._manager.start_watchdog()
            event(log, logging.INFO, "aegisd started", version=__version__, socket=self.config.socket_path,
                  gate=self.config.gate_address, vault=runtime.vault.state)
            served = True
            await self._stop.wait()
            _ignore_sighup()  # no reload while stopping
            self._manager.stopping()
            event(log, logging.INFO, "aegisd stopping")
            control.health.stop()  # health watchers hear NOT_SERVING now, not after the gate's drain
            stopping_by = time.monotonic() + self.config.stop_grace  # the gate and the control calls share it
            await gate.stop(self.config.stop_grace)
            await ledger.settle()  # the summary rows the gate's stop queued (refusals it left out), committed too
            ledger.end_subscriptions()  # so `ledger follow` has every row of the run before it ends
            control_running = False
            await control.stop(max(stopping_by - time.monotonic(), 0.0))
        finally:
            _ignore_sighup()
            if control_running:  # a start that failed after the control server started (the gate port taken):
                # stop grpc's server while the loop runs, else its finaliser runs after the loop has closed and
                # prints a traceback under aegisd's own error
                try:
                    await control.stop(0)
                except Exception as exc:  # the start's own error is the one to report
                    log.error("control: stopping after a failed start failed: %s", log_safe(exc))
            control.socket.release()
            await policies.stop()
            await webhooks.close()
            await upstream.close()
            await ledger.close(served=served)  # a failed start: no account of rows a run that never was kept
            store.close()
        event(log, logging.INFO, "aegisd stopped")
        return 0

    def _status_line(self) -> str:
        state = self._vault.state if self._vault is not None else "not open"
        return f"vault {state}; gate {self.config.gate_address}"

    def _vault_status(self, event_name: str) -> None:
        """Keep systemd's STATUS= (`systemctl status`) on the vault's state as it locks and unlocks."""
        if event_name in ("locked", "unlocked"):
            self._manager.status(self._status_line())

    def _install_stop_signals(self) -> None:
        """From the first moment: a SIGTERM or Ctrl-C during start-up then stops aegisd cleanly once it has
        started, rather than as asyncio's KeyboardInterrupt traceback; a SIGHUP (whose default is to exit) is
        ignored until the reload handler is in place (the command ignores it before this too)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def _reload(self) -> None:
        """SIGHUP: the log level and the policies from a fresh read of the settings. Whatever happens, systemd
        hears READY again: a reload that never ended would leave the unit `reloading` until its timeout."""
        if self._stop.is_set():  # a SIGHUP whose callback was queued before the stop took the handler off
            return
        self._manager.reloading()
        try:
            self._apply_reload()
        finally:
            self._manager.reloaded(self._status_line())

    def _apply_reload(self) -> None:
        policies_dir = self._policies.directory if self._policies is not None else None
        try:
            fresh = load_config(self._flags)
        except ConfigError as exc:
            log.error("reload failed, keeping the running settings: %s", exc)
        else:
            # A reload applies exactly the fields in APPLIED_ON_RELOAD. Every other one is compared with what the
            # daemon runs with (self.config, from the start), so a new setting can never be silently ignored.
            set_level(fresh.log_level)
            policies_dir = fresh.policies_dir
            restart_needed = changed_settings(self.config, fresh, APPLIED_ON_RELOAD)
            if restart_needed:
                log.warning("reload: %s changed; restart aegisd to apply", ", ".join(restart_needed))
            event(log, logging.INFO, "configuration reloaded", log_level=fresh.log_level)
        if self._policies is not None:
            self._policies.request_reload("SIGHUP", policies_dir, change_directory=True)

    def _prepare_data_dir(self) -> None:
        data_dir = self.config.data_dir
        try:
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = data_dir.stat()
        except OSError as exc:
            raise StartupError(f"cannot create data directory {data_dir}: {exc.strerror}") from None
        if info.st_uid != os.geteuid():  # its owner could swap vault.db or ledger.db, whatever the mode says
            raise StartupError(f"data directory {data_dir} belongs to uid {info.st_uid}, not to aegisd's user "
                               f"(uid {os.geteuid()}), so its owner could replace the vault or the ledger; "
                               f"`chown -R {user_name(os.geteuid())} {data_dir}` if it is aegisd's, or choose a "
                               "directory of its own (--data-dir)")
        if info.st_mode & 0o022:
            raise StartupError(f"data directory {data_dir} is writable by other users; chmod 700 it")
        loose = data_dir_mode_problem(data_dir, info.st_mode)
        if loose:  # served, but `aegisctl doctor` fails it: say so now rather than at the first doctor run
            log.warning("data directory %s: group or other users have access to it, and `aegisctl doctor` fails "
                        "it. Fix: chmod 700 %s", loose, data_dir)
        try:
            fd = os.open(data_dir / "aegisd.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            if exc.errno == errno.EROFS:
                raise StartupError(f"data directory {data_dir} is on a read-only file system; aegisd must be "
                                   "able to write there") from None
            raise StartupError(f"cannot open {data_dir / 'aegisd.lock'}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StartupError(f"another aegisd is already using data directory {data_dir}") from None
        self._data_lock = fd
        _make_databases_private(data_dir)

    def _auto_unlock(self, vault: Vault) -> None:
        """Unlock from the first unlock-key source present; on any failure start locked."""
        for source, key in _unlock_key_sources(self.config):
            if vault.state == "uninitialized":
                log.warning("an unlock key was found in %s but no vault exists yet; run aegisctl init", source)
                return
            try:
                vault.unlock(unlock_key=key)
            except Exception as exc:  # whatever it was, start locked rather than not at all
                log.error("auto-unlock from %s failed (%s); starting locked", source, log_safe(exc))
            else:
                event(log, logging.INFO, "vault unlocked", via=source)
            return


def _report_cut_off_restore(data_dir: Path, ledger: LedgerWriter) -> None:
    """A restore a crash cut off while it swapped files: logged, and recorded in the ledger (once it has its key),
    at every start until a restore completes or the operator removes the mark (doctor says so too)."""
    note = interrupted.cut_off(data_dir)
    if note is not None:
        log.error("%s; %s", note, interrupted.way_out(data_dir))
        ledger.append_nowait(LedgerEntry.system(note, reason="backup_restore_interrupted"))


def _clear_backup_leftovers(data_dir: Path) -> None:
    """Remove what a backup or restore cut off by a crash left in the data directory (a copy of vault.db, key slots
    included, among it). Safe only now: the data directory's lock is held, so no other aegisd's backup is running."""
    removed = clear_leftovers(data_dir)
    if removed:
        log.warning("removed %d scratch director%s a backup or restore cut off by a stop left in %s: %s",
                    len(removed), "y" if len(removed) == 1 else "ies", data_dir, ", ".join(removed))


# The files whose mode decides who can read the vault's key slots and the ledger: SQLite gives a -wal and -shm the
# mode of their database, so a copy restored or made by hand with a loose mode spreads to them.
PRIVATE_FILES = ("vault.db", "vault.db-wal", "vault.db-shm", "ledger.db", "ledger.db-wal", "ledger.db-shm")


def _make_databases_private(data_dir: Path) -> None:
    """Make each database file 0600 if group or others had access to it: every local user could otherwise copy
    vault.db and guess the passphrase offline. aegisd's own files; said once, with what it was."""
    for name in PRIVATE_FILES:
        path = data_dir / name
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.error("cannot check the mode of %s: %s", path, exc.strerror)
            continue
        if not stat.S_ISREG(info.st_mode) or not info.st_mode & 0o077:
            continue
        try:
            os.chmod(path, 0o600)
        except OSError as exc:
            log.error("%s is open to group or other users (mode %o) and could not be made 0600: %s", path,
                      stat.S_IMODE(info.st_mode), exc.strerror)
            continue
        log.warning("%s was open to group or other users (mode %o); made it 0600", path, stat.S_IMODE(info.st_mode))


def _handle_sighup(reload: Callable[[], None]) -> None:
    """Run `reload` on the event loop at each SIGHUP. A Python handler, not the loop's: taking a loop's handler off
    (as a stop, or closing the loop, does) puts back SIGHUP's default, which is to exit, and a SIGHUP that another
    thread (grpc's, the ledger writer's) took in that moment ended aegisd by signal. A Python handler is replaced by
    SIG_IGN in one step, and the loop wakes for it through the wakeup fd its SIGTERM handler set."""
    loop = asyncio.get_running_loop()
    signal.signal(signal.SIGHUP, lambda _signum, _frame: loop.call_soon_threadsafe(reload))


def _ignore_sighup() -> None:
    """Ignore SIGHUP from now on (a stop reloads nothing); never by way of its default, which is to exit."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


async def _load_policies(policies: PolicyStore) -> None:
    """First load, then watch. A configured directory that cannot be read stops the start: with no
    previous set to keep, going on would serve every agent without the policies meant for it."""
    snapshot = await policies.reload("startup")
    if snapshot.error:
        raise StartupError(f"{snapshot.error}; fix the path (--policies-dir, AEGIS_POLICIES_DIR or [policy] dir)")
    policies.start()


def _key_ledger(vault: Vault, ledger: LedgerWriter, event_name: str) -> None:
    """The ledger's chain key derives from the master key; it stays set after a later lock."""
    if event_name == "unlocked" and not ledger.has_key:
        ledger.set_key(bytes(vault.master().subkey("ledger")))


def _unlock_key_sources(config: Config) -> list[tuple[str, str]]:
    """Unlock keys in order of preference: systemd credential, config file, environment."""
    found: list[tuple[str, str]] = []
    paths: list[tuple[Path, bool, bool]] = []
    if config.credentials_directory:
        paths.append((config.credentials_directory / UNLOCK_CREDENTIAL_NAME, False, True))
    if config.unlock_key_file:
        paths.append((config.unlock_key_file, True, False))
    for path, must_exist, from_systemd in paths:
        key = _read_key_file(path, must_exist, from_systemd)
        if key:
            found.append((str(path), key))
    env_key = os.environ.pop("AEGIS_UNLOCK_KEY", "")  # popped: never inherited by anything we start
    if env_key:
        found.append(("AEGIS_UNLOCK_KEY", env_key.strip()))
    return found


def _read_key_file(path: Path, must_exist: bool, from_systemd: bool) -> str | None:
    """The key's first line, or None (logged) when the file cannot be trusted or read.

    An operator's file must be private (0600 or stricter). systemd's credential may show the group's `r`: systemd
    256 and later write it 0400 and grant the service's user read access by an ACL, whose mask then shows as the
    group bits (0440), on a read-only mount only the unit sees. Beyond that it must be private too."""
    try:
        info = path.stat()
    except FileNotFoundError:
        if must_exist:
            log.error("unlock key file %s does not exist; starting locked", path)
        return None
    mode = stat.S_IMODE(info.st_mode)
    if from_systemd and mode & 0o026:
        log.error("unlock key credential %s is readable by others or writable by group or others (mode %o); "
                  "starting locked", path, mode)
        return None
    if not from_systemd and mode & 0o077:
        log.error("unlock key file %s is readable by group or others; chmod 600 it. Starting locked", path)
        return None
    try:
        lines = path.read_text().strip().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        log.error("unlock key file %s cannot be read (%s); starting locked", path, exc)
        return None
    return lines[0].strip() if lines else None
