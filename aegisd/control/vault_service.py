"""aegis.v1.VaultService: init, unlock, lock, status, and adopting what an older aegisd wrote."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from aegisd import __version__
from aegisd.api.aegis.v1 import vault_pb2 as pb
from aegisd.api.aegis.v1 import vault_pb2_grpc
from aegisd.cancellation import outlive_cancellation, to_thread_to_the_end
from aegisd.control.convert import timestamp
from aegisd.control.errors import rpc
from aegisd.errors import InvalidArgument, WrongPassphrase
from aegisd.runtime import Runtime, derive, key_derivation
from aegisd.vault.adoption import OlderRows
from aegisd.vault.credentials import Credential
from aegisd.vault.passphrase_strength import check_passphrase_strength
from aegisd.vault.unlock_key_format import check_unlock_key, new_unlock_key
from aegisd.vault.vault import PassphraseRequired, VaultChanged

Ctx = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")
STATES = {"uninitialized": pb.VAULT_STATE_UNINITIALIZED, "locked": pb.VAULT_STATE_LOCKED,
          "unlocked": pb.VAULT_STATE_UNLOCKED}


class VaultService(vault_pb2_grpc.VaultServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    @rpc
    async def Init(self, request: pb.InitRequest, context: Ctx) -> pb.InitResponse:
        made_here = request.create_unlock_key and not request.unlock_key
        unlock_key = new_unlock_key() if made_here else request.unlock_key or None
        if unlock_key is not None:
            check_unlock_key(unlock_key)
        vault_id = await key_derivation(functools.partial(self.rt.vault.init, request.passphrase,
                                                          unlock_key is not None, unlock_key))
        self.rt.log_event("vault initialised", vault_id=vault_id)
        return pb.InitResponse(vault_id=vault_id, unlock_key=unlock_key if made_here and unlock_key else "")

    @rpc
    async def Unlock(self, request: pb.UnlockRequest, context: Ctx) -> pb.UnlockResponse:
        which = request.WhichOneof("secret")
        if which is None:
            raise InvalidArgument("give a passphrase or an unlock key")
        try:
            opened = await derive(self.rt.vault, self.rt.vault.unlock, **{which: getattr(request, which)})
        except WrongPassphrase:  # on record, so guessing over the socket shows (the method only, never the input)
            self.rt.log_event("vault unlock failed: wrong secret", via=which, level=logging.WARNING)
            raise
        except VaultChanged:  # the secret was right, but a lock (or a change) came first: on record all the same
            self.rt.log_event("vault unlock abandoned: the vault was locked or changed meanwhile; the secret given "
                              "was correct", via=which, level=logging.WARNING)
            raise
        if opened:
            self.rt.log_event("vault unlocked", via=which)
        return pb.UnlockResponse()

    @rpc
    async def Lock(self, request: pb.LockRequest, context: Ctx) -> pb.LockResponse:
        if await to_thread_to_the_end(self.rt.vault.lock):
            self.rt.log_event("vault locked")
        return pb.LockResponse()

    @rpc
    async def ChangePassphrase(self, request: pb.ChangePassphraseRequest, context: Ctx) -> pb.ChangePassphraseResponse:
        await self._key_slot_change("passphrase changed", self.rt.vault.change_passphrase, request.current,
                                    request.new_passphrase)
        return pb.ChangePassphraseResponse()

    @rpc
    async def ReplaceUnlockKey(self, request: pb.ReplaceUnlockKeyRequest, context: Ctx) -> pb.ReplaceUnlockKeyResponse:
        check_unlock_key(request.unlock_key)
        replaced = await self._key_slot_change("unlock key replaced", self.rt.vault.replace_unlock_key,
                                               request.passphrase, request.unlock_key)
        return pb.ReplaceUnlockKeyResponse(replaced=replaced)

    @rpc
    async def RemoveUnlockKeys(self, request: pb.RemoveUnlockKeysRequest, context: Ctx) -> pb.RemoveUnlockKeysResponse:
        removed = await self._key_slot_change("unlock keys removed", self.rt.vault.remove_unlock_keys,
                                              request.passphrase)
        return pb.RemoveUnlockKeysResponse(removed=removed)

    @rpc
    async def CheckPassphrase(self, request: pb.CheckPassphraseRequest, context: Ctx) -> pb.CheckPassphraseResponse:
        """The rule Init and ChangePassphrase apply, asked alone: aegisctl checks a passphrase after its first
        entry, before it asks for the second."""
        await asyncio.to_thread(check_passphrase_strength, request.passphrase)
        return pb.CheckPassphraseResponse()

    async def _key_slot_change(self, what: str, change: Callable[..., T], passphrase: str, *args: str) -> T:
        """Run a change of what opens the vault (its first argument is the passphrase that proves the caller may),
        then put it in the log and, as a system row, in the ledger. A wrong passphrase is logged like a failed
        unlock, so guessing over the socket shows, and so is a right one whose change a lock or another change
        cut short (VaultChanged)."""
        try:
            result = await derive(self.rt.vault, change, passphrase, *args)
        except WrongPassphrase:
            self.rt.log_event("vault key change refused: wrong passphrase", change=what, level=logging.WARNING)
            raise
        except VaultChanged:  # as for Unlock: a right passphrase must not go unrecorded because a lock raced it
            self.rt.log_event("vault key change abandoned: the vault was locked or changed meanwhile; the passphrase "
                              "given was correct", change=what, level=logging.WARNING)
            raise
        before = f" ({result} before)" if isinstance(result, int) else ""
        self.rt.log_event(f"vault {what}{before}")
        await self.rt.record_change(f"vault {what}{before}", "vault_keys_changed")
        return result

    async def _adopt(self, digest: str) -> OlderRows:
        older = await asyncio.to_thread(self.rt.vault.adopt_older_rows, digest)
        if older:
            self.rt.log_event("older rows adopted", credentials=len(older.credentials),
                              agents=len(older.agents), grants=len(older.grants), mixed=older.mixed)
        return older

    @rpc
    async def Adopt(self, request: pb.AdoptRequest, context: Ctx) -> pb.AdoptResponse:
        if request.dry_run:
            older = await asyncio.to_thread(self.rt.vault.older_rows)
        else:
            if not request.passphrase:  # the socket alone must not make a secret's metadata trusted: its hosts
                raise PassphraseRequired("adopting rows an older aegisd wrote trusts what nothing authenticates "
                                         "(a credential's hosts, its inspection): it needs the vault's passphrase "
                                         "(an aegisctl whose `vault adopt` has no --passphrase-stdin is too old: "
                                         "update it)")
            await self.rt.prove_passphrase(request.passphrase, "adoption")
            # The adoption runs on in its thread if the client goes away: its log line must follow it.
            older = await outlive_cancellation(self._adopt(request.digest))
        return pb.AdoptResponse(
            credentials=[_older_credential(c.credential) for c in older.credentials],
            agents=[pb.OlderAgent(name=a.name, rate_limit=a.rate_limit) for a in older.agents],
            grants=[pb.OlderGrant(agent=g.agent, credential=g.credential) for g in older.grants],
            digest=older.digest(), adopted=not request.dry_run and bool(older), mixed=older.mixed)

    @rpc
    async def Status(self, request: pb.StatusRequest, context: Ctx) -> pb.StatusResponse:
        # In a thread, as every store read: a write under way (a key change's VACUUM) holds the store's lock.
        counts, schema = await asyncio.to_thread(lambda: (self.rt.vault.counts(), self.rt.store.schema_version()))
        return pb.StatusResponse(
            state=STATES[self.rt.vault.state], version=__version__,
            started_at=timestamp(int(self.rt.started_at * 1000)),
            uptime_seconds=time.monotonic() - self.rt.started_monotonic, gate_address=self.rt.config.gate_address,
            vault_id=self.rt.vault.vault_id or "", data_dir=str(self.rt.config.data_dir),
            schema_version=schema, **counts,
        )


def _older_credential(c: Credential) -> pb.OlderCredential:
    return pb.OlderCredential(name=c.name, service=c.service, domains=c.domains, auth_type=c.auth_type,
                              header_name=c.header_name, query_param=c.query_param, scopes=c.scopes,
                              rate_limit=c.rate_limit, body_inspection=c.body_inspection,
                              expires_at_ms=c.expires_at or 0)
