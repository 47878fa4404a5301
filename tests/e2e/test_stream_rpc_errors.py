"""Server-streaming RPCs fail like unary ones: the daemon's status, its `aegis-reason` trailer and its own
message, never gRPC's "Unexpected <class ...>" UNKNOWN. Called on the wire with the generated stubs, as
another client would (aegisctl bounds --lines itself, so it never sends such a request)."""

from __future__ import annotations

from typing import Any

import grpc

from aegisd.api.aegis.v1 import ledger_pb2, ledger_pb2_grpc
from tests.e2e.support import rpc_reason
from tests.harness import Aegis


def test_follow_with_too_large_a_backlog_is_invalid_argument(aegis: Aegis) -> None:
    with grpc.insecure_channel(f"unix:{aegis.socket}") as channel:
        ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
        try:
            next(iter(ledger.Follow(ledger_pb2.FollowRequest(backlog=200_000), timeout=30)))
        except grpc.RpcError as exc:
            err: Any = exc
        else:
            raise AssertionError("Follow(backlog=200000) streamed a record")
    reason = rpc_reason(err)
    assert (err.code(), reason) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument"), err
    assert err.details() == "limit must be between 1 and 100000"
    assert "Traceback" not in aegis.log() and "Unexpected" not in aegis.log()
    assert aegis.stop() == 0
