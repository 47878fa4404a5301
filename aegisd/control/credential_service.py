"""aegis.v1.CredentialService: secrets go in through Add and Rotate and never come out."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from aegisd.api.aegis.v1 import credentials_pb2 as pb
from aegisd.api.aegis.v1 import credentials_pb2_grpc
from aegisd.cancellation import outlive_cancellation, to_thread_to_the_end
from aegisd.control import convert
from aegisd.control.errors import rpc
from aegisd.runtime import Runtime
from aegisd.vault.credentials import Credential, check_lookup, check_new_domains, validate_name
from aegisd.vault.domains import AllowedHost
from aegisd.vault.vault import now_ms

Ctx = grpc.aio.ServicerContext[Any, Any]


class CredentialService(credentials_pb2_grpc.CredentialServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    @rpc
    async def AddCredential(self, request: pb.AddCredentialRequest, context: Ctx) -> pb.Credential:
        now = now_ms()
        entries = check_new_domains(list(request.domains), request.allow_plain_http)
        cred = Credential(
            id="", name=request.name, service=request.service, domains=list(request.domains),
            auth_type=convert.auth_from_pb(request.auth_type), header_name=request.header_name,
            query_param=request.query_param, scopes=list(request.scopes) or ["*"],
            rate_limit=request.rate_limit, body_inspection=convert.inspection_from_pb(request.body_inspection),
            expires_at=convert.expiry(request.ttl_seconds, now),
        )
        added = await to_thread_to_the_end(self.rt.vault.add_credential, cred, request.secret)
        self.rt.log_event("credential added", credential=added.name, service=added.service)
        self._warn_about(added.name, entries)
        return convert.credential_to_pb(added, now)

    def _warn_about(self, name: str, entries: list[AllowedHost]) -> None:
        """Log what an operator accepted but should know: the credential's name and the host, never its secret."""
        for entry in entries:
            if entry.is_plain_http_off_host:
                self.rt.log_event("credential allowlist entry uses plain http to a host off this machine "
                                  "(accepted with --allow-plain-http): the secret crosses the network unencrypted",
                                  credential=name, entry=str(entry), level=logging.WARNING)
            if entry.is_link_local_or_metadata:
                self.rt.log_event("credential allowlist entry is a link-local or cloud metadata address: check "
                                  "it is meant", credential=name, entry=str(entry), level=logging.WARNING)

    @rpc
    async def ListCredentials(self, request: pb.ListCredentialsRequest, context: Ctx
                              ) -> pb.ListCredentialsResponse:
        checks = await asyncio.to_thread(self.rt.vault.checked_credentials)
        now = now_ms()
        return pb.ListCredentialsResponse(credentials=[convert.credential_to_pb(c.credential, now, c.status)
                                                       for c in checks])

    @rpc
    async def GetCredential(self, request: pb.GetCredentialRequest, context: Ctx) -> pb.Credential:
        check = await asyncio.to_thread(self.rt.vault.check_credential, check_lookup(request.name))
        return convert.credential_to_pb(check.credential, now_ms(), check.status)

    @rpc
    async def UpdateCredential(self, request: pb.UpdateCredentialRequest, context: Ctx) -> pb.Credential:
        validate_name(request.name)  # first: a wrong passphrase is logged naming it
        now = now_ms()
        changes = convert.credential_changes(request, now)
        entries = check_new_domains(changes["domains"], request.allow_plain_http) if "domains" in changes else []
        if request.passphrase:
            await self.rt.prove_passphrase(request.passphrase, "credential update", credential=request.name)
        # The write runs on in its thread if the client goes away: its log line and ledger row must follow it.
        cred = await outlive_cancellation(self._update(request.name, changes, bool(request.passphrase)))
        self._warn_about(cred.name, entries)
        return convert.credential_to_pb(cred, now)

    async def _update(self, name: str, changes: dict[str, Any], with_passphrase: bool) -> Credential:
        """Apply `changes`, then log them and record a widening (made with the passphrase) in the ledger."""
        cred, widened = await asyncio.to_thread(self.rt.vault.update_credential, name, changes, with_passphrase)
        self.rt.log_event("credential updated", credential=cred.name, fields=",".join(sorted(changes)))
        if widened:
            detail = f"credential {cred.name!r} widened with the passphrase: {'; '.join(widened)}"
            self.rt.log_event(detail, level=logging.WARNING)
            await self.rt.record_change(detail, "credential_widened")
        return cred

    @rpc
    async def RotateCredential(self, request: pb.RotateCredentialRequest, context: Ctx) -> pb.Credential:
        cred = await to_thread_to_the_end(self.rt.vault.rotate_credential, check_lookup(request.name), request.secret)
        self.rt.log_event("credential rotated", credential=cred.name)
        return convert.credential_to_pb(cred, now_ms())

    @rpc
    async def RemoveCredential(self, request: pb.RemoveCredentialRequest, context: Ctx
                               ) -> pb.RemoveCredentialResponse:
        check_lookup(request.name, "credential id" if request.by_id else "credential name")
        grants = await to_thread_to_the_end(self.rt.vault.remove_credential, request.name, request.by_id)
        if request.by_id:
            self.rt.log_event("credential row removed", id=request.name, grants_removed=grants)
        else:
            self.rt.log_event("credential removed", credential=request.name, grants_removed=grants)
        return pb.RemoveCredentialResponse(grants_removed=grants)
