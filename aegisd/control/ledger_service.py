"""aegis.v1.LedgerService: read, follow and verify the audit trail."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from aegisd.api.aegis.v1 import ledger_pb2 as pb
from aegisd.api.aegis.v1 import ledger_pb2_grpc
from aegisd.control.errors import rpc
from aegisd.errors import FailedPrecondition, InvalidArgument, StorageUnavailable
from aegisd.ledger import LedgerError, LedgerRow, query_rows, verify
from aegisd.runtime import Runtime

Ctx = grpc.aio.ServicerContext[Any, Any]
MAX_LIMIT = 100_000


def record(row: LedgerRow) -> pb.LedgerRecord:
    return pb.LedgerRecord(
        id=row.id, time_ms=row.time_ms, request_id=row.request_id, agent=row.agent, credential=row.credential,
        service=row.service, method=row.method, path=row.path, target_host=row.target_host,
        decision=row.decision, reason=row.reason, status=row.status, duration_ms=row.duration_ms,
        bytes_in=row.bytes_in, bytes_out=row.bytes_out, kind=row.kind, flags=row.flags, detail=row.detail)


def _filters(f: pb.LedgerFilter) -> dict[str, Any]:
    return {"agent": f.agent or None, "service": f.service or None, "credential": f.credential or None,
            "denied_only": f.blocked, "since_ms": f.since_ms or None, "until_ms": f.until_ms or None}


def _matches(row: LedgerRow, f: pb.LedgerFilter) -> bool:
    return ((not f.agent or row.agent == f.agent) and (not f.service or row.service == f.service)
            and (not f.credential or row.credential == f.credential)
            and (not f.blocked or row.decision == "denied")
            and (not f.since_ms or row.time_ms >= f.since_ms) and (not f.until_ms or row.time_ms < f.until_ms))


class LedgerService(ledger_pb2_grpc.LedgerServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.path = runtime.config.data_dir / "ledger.db"

    async def _query(self, f: pb.LedgerFilter, limit: int) -> list[LedgerRow]:
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidArgument(f"limit must be between 1 and {MAX_LIMIT}")
        try:
            return await asyncio.to_thread(query_rows, self.path, limit=limit, **_filters(f))
        except LedgerError as exc:
            raise StorageUnavailable(str(exc)) from None

    @rpc
    async def ListEntries(self, request: pb.ListEntriesRequest, context: Ctx) -> pb.ListEntriesResponse:
        rows = await self._query(request.filter, request.limit or 100)
        return pb.ListEntriesResponse(records=[record(r) for r in rows])

    async def Follow(self, request: pb.FollowRequest, context: Ctx) -> AsyncIterator[pb.LedgerRecord]:
        with self.rt.ledger.subscribe() as live:
            last_id = 0
            if request.backlog:
                for row in reversed(await self._query(request.filter, request.backlog)):
                    last_id = row.id
                    yield record(row)
            async for row in live:
                if row.id > last_id and _matches(row, request.filter):
                    yield record(row)

    @rpc
    async def Verify(self, request: pb.VerifyRequest, context: Ctx) -> pb.VerifyResponse:
        key = self.rt.ledger_key()
        if key is None:
            raise FailedPrecondition("the ledger key derives from the vault: unlock it once to verify",
                                     reason="vault_locked")
        try:
            result = await asyncio.to_thread(verify, self.path, key)
        except LedgerError as exc:
            raise StorageUnavailable(str(exc)) from None
        return pb.VerifyResponse(ok=result.ok, rows_checked=result.rows_checked,
                                 first_bad_id=result.first_bad_id or 0, reason=result.reason)
