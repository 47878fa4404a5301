"""AegisClient: the only way aegisctl talks to aegisd, over the control socket.

Every gRPC failure becomes a ClientError whose message says what went wrong and what to do
next, keyed by the daemon's stable `aegis-reason` trailer.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc

from aegisctl.paths import UnsafePath, safe_directory
from aegisd.api import socket_target
from aegisd.api.accounts import group_name, user_name
from aegisd.api.aegis.v1 import (
    agents_pb2,
    agents_pb2_grpc,
    backup_pb2_grpc,
    credentials_pb2,
    credentials_pb2_grpc,
    doctor_pb2_grpc,
    ledger_pb2_grpc,
    policy_pb2_grpc,
    vault_pb2,
    vault_pb2_grpc,
    webhooks_pb2_grpc,
)

T = TypeVar("T")
DEFAULT_TIMEOUT = 30.0
# The daemon keeps its replies to a few MiB (ledger pages are cut by size); the margin over gRPC's 4 MiB
# default is for whatever an older or future daemon sends, so a large reply is never refused here.
MAX_RECEIVE_BYTES = 64 << 20

# The vault's states by their API value, as aegisctl names them.
VAULT_STATES = {vault_pb2.VAULT_STATE_UNINITIALIZED: "uninitialized", vault_pb2.VAULT_STATE_LOCKED: "locked",
                vault_pb2.VAULT_STATE_UNLOCKED: "unlocked"}

# What to do next, per daemon reason code.
HINTS = {
    "vault_locked": "run `aegisctl unlock` first",
    "vault_uninitialized": "run `aegisctl init` to create the vault",
    "wrong_passphrase": "check the passphrase (or unlock key) and try again",
    "no_unlock_key": "`aegisctl unlock` asks for the passphrase; `aegisctl unlock-key new --out FILE` makes a key",
    "credential_not_found": "see `aegisctl vault list` for the names",
    "storage_full": "free disk space in the data directory, then retry",
    "storage_read_only": "make the data directory writable by aegisd, then retry",
    "storage_corrupt": "restore the data directory from a backup",
    "shutting_down": "run it again once aegisd is back",
    "already_exists": "pick another name, or change the existing one with `update`",
    "service_taken": "use another --service, or give the credential named above another one (`aegisctl vault "
                     "update NAME --service OTHER`) or remove it (`aegisctl vault remove NAME`)",
    "vault_exists": "it is set up already: `aegisctl unlock` opens it, `aegisctl status` shows its state",
    "agent_not_found": "see `aegisctl agent list` for the names",
    "agent_exists": "pick another name, or `aegisctl agent regenerate NAME` for a new token",
    "grant_not_found": "see the agent's grants with `aegisctl agent show AGENT`",
    "webhook_not_found": "see `aegisctl webhook list` for the ids",
    "vault_unlocked": "run `aegisctl lock` first, then retry",
    "invalid_backup": "nothing was changed; use another backup, or take a new one with `aegisctl backup FILE`",
    "ledger_tampered": "`aegisctl ledger verify` names the first bad row; keep a copy of ledger.db as evidence",
    "tampered": "remove the row by the id shown (`--id`) and add it again as you intend it, or restore a good backup",
    "not_adopted": "`aegisctl vault adopt` lists what an older aegisd wrote; check it, then adopt it",
    "older_rows_changed": "run `aegisctl vault adopt` again and check the new list",
    "remove_by_name": "it is intact: remove it by its name",
    "passphrase_required": "run it on a terminal, where aegisctl asks for the passphrase, or pipe the passphrase in "
                           "with --passphrase-stdin",
}


class ClientError(Exception):
    """A failed call, with the message to show and the hint for the next step."""

    def __init__(self, message: str, hint: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.reason = reason


OWN_SOCKET_DIRECTORY = ("use a directory of your own, e.g. $XDG_RUNTIME_DIR/aegis: start aegisd with --socket "
                        "$XDG_RUNTIME_DIR/aegis/aegisd.sock (it creates the directory closed to others) and point "
                        "AEGIS_SOCKET (or --socket) at it")


def _shared_directory_hint(directory: Path, info: os.stat_result) -> str:
    """What to do about a socket directory others can write to: close it, when it is the user's own and not meant
    to be shared; a shared sticky one (/tmp) or someone else's is not the user's to close."""
    if info.st_mode & stat.S_ISVTX:
        return f"{directory} is a shared sticky directory (like /tmp): leave its mode alone and {OWN_SOCKET_DIRECTORY}"
    if info.st_uid != os.geteuid():
        return f"{directory} belongs to uid {info.st_uid}, not to you: {OWN_SOCKET_DIRECTORY}"
    return (f"run `chmod g-w,o-w {directory}` (then restart aegisd so a socket nobody could have swapped is in "
            f"place), or {OWN_SOCKET_DIRECTORY}")


def _unsearchable(directory: Path) -> Path:
    """The first directory, from / down to `directory` itself, that this user may not search (the one that made a
    lookup below it fail with "permission denied"); `directory` if none is found (it changed since)."""
    effective = os.access in os.supports_effective_ids
    path = directory.absolute()
    for step in (*reversed(path.parents), path):
        if not os.access(step, os.X_OK, effective_ids=effective):
            return step
    return directory


def _denied(path: Path) -> ClientError:
    """The control socket cannot be looked at: name the directory on the way that refuses this user, which is not
    always the socket's own (a 0700 data directory or $XDG_RUNTIME_DIR above a group-shared socket's)."""
    blocker = _unsearchable(path.parent)
    try:
        info = os.stat(blocker)
        detail = (f": mode {stat.S_IMODE(info.st_mode):04o}, owner {user_name(info.st_uid)}, "
                  f"group {group_name(info.st_gid)}")
        lets_its_group = bool(info.st_mode & 0o010) and info.st_gid not in {os.getegid(), *os.getgroups()}
    except OSError:
        detail, lets_its_group = "", False
    where = f"its directory {blocker}" if blocker == path.parent else f"{blocker}, above its directory,"
    if blocker == path.parent or lets_its_group:  # the caller is simply not in the group that may pass
        hint = "run as the daemon's user or a member of its socket group"
    else:
        hint = (f"run as the daemon's user. Members of its socket group get in only through directories that let the "
                f"group pass, and {blocker} does not: aegisd's log and `aegisctl doctor` (run as the daemon's user) "
                "say what to change, usually a --socket in a directory the group can reach")
    return ClientError(f"no permission to use the control socket {path} ({where} cannot be searched{detail})", hint)


class AegisClient:
    def __init__(self, socket_path: Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._channel: grpc.Channel | None = None

    def __enter__(self) -> AegisClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    @property
    def vault(self) -> vault_pb2_grpc.VaultServiceStub:
        return vault_pb2_grpc.VaultServiceStub(self._connect())

    @property
    def credentials(self) -> credentials_pb2_grpc.CredentialServiceStub:
        return credentials_pb2_grpc.CredentialServiceStub(self._connect())

    @property
    def agents(self) -> agents_pb2_grpc.AgentServiceStub:
        return agents_pb2_grpc.AgentServiceStub(self._connect())

    @property
    def ledger(self) -> ledger_pb2_grpc.LedgerServiceStub:
        return ledger_pb2_grpc.LedgerServiceStub(self._connect())

    @property
    def webhooks(self) -> webhooks_pb2_grpc.WebhookServiceStub:
        return webhooks_pb2_grpc.WebhookServiceStub(self._connect())

    @property
    def policies(self) -> policy_pb2_grpc.PolicyServiceStub:
        return policy_pb2_grpc.PolicyServiceStub(self._connect())

    @property
    def doctor(self) -> doctor_pb2_grpc.DoctorServiceStub:
        return doctor_pb2_grpc.DoctorServiceStub(self._connect())

    @property
    def backup(self) -> backup_pb2_grpc.BackupServiceStub:
        return backup_pb2_grpc.BackupServiceStub(self._connect())

    def stream(self, responses: Iterable[T]) -> Iterator[T]:
        """Iterate a server stream, translating failures into ClientError."""
        try:
            yield from responses
        except grpc.RpcError as exc:
            if cast(grpc.Call, exc).code() == grpc.StatusCode.CANCELLED:
                return
            raise self._translate(exc) from None

    def call(self, method: Callable[..., T], request: Any, timeout: float | None = None) -> T:
        """Invoke one RPC, translating failures into ClientError."""
        try:
            return method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise self._translate(exc) from None

    # -- convenience wrappers used by several commands ---------------------------------------

    def status(self) -> vault_pb2.StatusResponse:
        return self.call(self.vault.Status, vault_pb2.StatusRequest())

    def require_state(self, wanted: str) -> None:
        """Fail now, before the user is asked for a secret, unless the vault is in the `wanted` state (a secret
        typed or pasted only to hear "locked" or "exists" is one handled for nothing)."""
        state = VAULT_STATES.get(self.status().state, "unknown")
        if state == wanted:
            return
        if state == "uninitialized":
            raise ClientError("there is no vault yet", HINTS["vault_uninitialized"], "vault_uninitialized")
        if wanted == "uninitialized":
            raise ClientError(f"a vault already exists (it is {state})", HINTS["vault_exists"], "vault_exists")
        raise ClientError(f"the vault is {state}", HINTS.get(f"vault_{state}", ""), f"vault_{state}")

    def require_initialized(self) -> None:
        """Fail now, before the user is asked for a secret, if there is no vault (locked or unlocked will do)."""
        if self.status().state == vault_pb2.VAULT_STATE_UNINITIALIZED:
            raise ClientError("there is no vault yet", HINTS["vault_uninitialized"], "vault_uninitialized")

    def weak_passphrase(self, passphrase: str) -> str | None:
        """Why aegisd would refuse `passphrase` as a new one (its rule, asked of it: too short, too guessable), or
        None if it would take it. An aegisd without the check answers None: Init or ChangePassphrase checks."""
        try:
            self.call(self.vault.CheckPassphrase, vault_pb2.CheckPassphraseRequest(passphrase=passphrase),
                      timeout=120)
        except ClientError as exc:
            if exc.reason == "invalid_argument":
                return exc.message
            if exc.reason == "unimplemented":
                return None
            raise
        return None

    def get_credential(self, name: str) -> credentials_pb2.Credential:
        return self.call(self.credentials.GetCredential, credentials_pb2.GetCredentialRequest(name=name))

    def get_agent(self, name: str) -> agents_pb2.Agent:
        return self.call(self.agents.GetAgent, agents_pb2.GetAgentRequest(name=name))

    # -- internals ---------------------------------------------------------------------------

    def _connect(self) -> grpc.Channel:
        if self._channel is None:
            self._check_socket()
            self._channel = grpc.insecure_channel(socket_target(self.socket_path),
                                                  options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)])
        return self._channel

    def _check_socket(self) -> None:
        """Before anything is sent, make sure the path holds a socket nobody but root, this user or aegisd's user
        could have put there.

        aegisctl sends passphrases and keys over this socket: a symlink, a socket in a directory that a group or
        everyone can write, or a path that another user's directory or link leads through may be someone else's
        server in aegisd's place (paths.safe_directory). The socket's owner is not checked: under the packaged
        service the daemon runs as a dynamic user and operators are in its group."""
        path = self.socket_path
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            raise ClientError(f"aegisd is not running: no control socket at {path}",
                              "start it with `aegisd` (or `make run`), or point --socket / AEGIS_SOCKET at it"
                              ) from None
        except PermissionError:
            raise _denied(path) from None
        except ValueError:  # a NUL, which no system call takes
            raise ClientError(f"the control socket path {str(path)!r} contains a NUL character",
                              "point --socket / AEGIS_SOCKET at aegisd's control socket") from None
        except OSError as exc:
            raise ClientError(f"cannot look at the control socket {path}: {exc.strerror}") from None
        if stat.S_ISLNK(info.st_mode):
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            raise ClientError(f"refusing to use the control socket {path}: it is a symbolic link (to {target}), and "
                              "aegisd never makes one; nothing was sent",
                              "point --socket / AEGIS_SOCKET at aegisd's socket itself, and find out who put the "
                              "link there")
        if not stat.S_ISSOCK(info.st_mode):
            raise ClientError(f"refusing to use {path}: it is not a socket; nothing was sent",
                              "point --socket / AEGIS_SOCKET at aegisd's control socket")
        directory = path.parent
        try:
            real = safe_directory(directory)
            dir_info = os.lstat(real)
        except UnsafePath as exc:
            raise ClientError(f"refusing to use the control socket {path}: {exc.message}; nothing was sent",
                              f"run `chmod g-w,o-w {exc.chmod}`, or {OWN_SOCKET_DIRECTORY}" if exc.chmod
                              else OWN_SOCKET_DIRECTORY) from None
        except OSError as exc:
            raise ClientError(f"cannot check the control socket's directory {directory}: {exc.strerror}") from None
        dir_mode = stat.S_IMODE(dir_info.st_mode)
        if dir_mode & 0o022:
            who = " and ".join(w for w, bit in (("group", 0o020), ("world", 0o002)) if dir_mode & bit)
            raise ClientError(f"refusing to use the control socket {path}: its directory {directory} is "
                              f"{who}-writable (mode {dir_mode:04o}), so anyone who can write there could have put "
                              "their own server in aegisd's place; nothing was sent",
                              _shared_directory_hint(directory, dir_info))
        if not os.access(path, os.R_OK | os.W_OK):
            raise ClientError(f"no permission to use the control socket {path}",
                              "run as the daemon's user or a member of its socket group")

    def _translate(self, exc: grpc.RpcError) -> ClientError:
        call = cast(grpc.Call, exc)
        code = call.code()
        details = call.details() or ""
        reason = next((str(m[1]) for m in call.trailing_metadata() or () if m[0] == "aegis-reason"), "")
        if code == grpc.StatusCode.UNAVAILABLE and not reason:
            return ClientError(f"cannot reach aegisd at {self.socket_path}",
                               "is it running? start it with `aegisd` (or `make run`)", "unavailable")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ClientError("aegisd did not answer in time", "check `aegisd`'s log; retry", "timeout")
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return ClientError("this aegisd does not support that command", "upgrade aegisd", "unimplemented")
        return ClientError(details or code.name.lower(), HINTS.get(reason, ""), reason)
