"""A control request aegisd cannot decode (not protobuf, or a string field that is not UTF-8) is refused cleanly.

grpc decodes a request before aegisd's handler runs; a failure there used to answer UNKNOWN with protobuf's own
text ("Unexpected <class 'google.protobuf.message.DecodeError'>: ...") and put a traceback in aegisd's log. Now:
INVALID_ARGUMENT, a fixed message naming what was wrong (never a byte of the request), `undecodable_request`, and
one line in the log, for unary, server-streaming and client-streaming methods alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from aegisd.api.aegis.v1 import vault_pb2, vault_pb2_grpc
from tests.e2e.support import rpc_reason
from tests.harness import PASSPHRASE, Aegis

MARKER = "undecodable-marker-5c1e"
BAD_UTF8 = b"\x0a" + bytes([len(MARKER) + 2]) + MARKER.encode() + b"\xff\xfe"  # field 1, a string: not UTF-8
NOT_PROTOBUF = b"\xff\xff\xff" + MARKER.encode()  # no valid field tag at all
PREFIX = "the request could not be decoded: "


def _refusal(call: Any, *args: Any) -> grpc.RpcError:
    try:
        result = call(*args, timeout=30)
        if not isinstance(result, bytes):  # a stream: read it
            list(result)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("an undecodable request was answered")


def _assert_refused(error: grpc.RpcError, problem: str) -> str:
    call: Any = error
    assert call.code() == grpc.StatusCode.INVALID_ARGUMENT, (call.code(), call.details())
    assert call.details() == PREFIX + problem, call.details()
    assert rpc_reason(error) == "undecodable_request"
    return str(call.details())


def _raw(channel: grpc.Channel, method: str, kind: str = "unary_unary") -> Any:
    return getattr(channel, kind)(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)


def test_undecodable_requests_are_invalid_argument_and_logged_once_each(unlocked: Aegis) -> None:
    sent, answers = 0, []
    with grpc.insecure_channel(f"unix:{unlocked.socket}") as channel:
        for method, data, problem in [
            ("/aegis.v1.VaultService/Unlock", BAD_UTF8, "a string field is not valid UTF-8"),
            ("/aegis.v1.AgentService/AddAgent", BAD_UTF8, "a string field is not valid UTF-8"),
            ("/aegis.v1.VaultService/Status", NOT_PROTOBUF, "it is not a well-formed aegis.v1.StatusRequest"),
            ("/grpc.health.v1.Health/Check", NOT_PROTOBUF, "it is not a well-formed grpc.health.v1.HealthCheckRequest"),
        ]:
            answers.append(_assert_refused(_refusal(_raw(channel, method), data), problem))
            sent += 1
        for method, data, problem in [  # server-streaming: refused before the first message
            ("/aegis.v1.LedgerService/Follow", NOT_PROTOBUF, "it is not a well-formed aegis.v1.FollowRequest"),
            ("/aegis.v1.LedgerService/Export", b"\x0a" + bytes([len(BAD_UTF8)]) + BAD_UTF8,
             "a string field is not valid UTF-8"),
        ]:
            answers.append(_assert_refused(_refusal(_raw(channel, method, "unary_stream"), data), problem))
            sent += 1
        unlocked.ctl_in_process("lock").ok()  # a restore reads its chunks only into a locked vault
        restore = _raw(channel, "/aegis.v1.BackupService/Restore", "stream_unary")
        chunks: Iterator[bytes] = iter([b"\x12" + BAD_UTF8[1:]])  # field 2, the passphrase: not UTF-8
        answers.append(_assert_refused(_refusal(restore, chunks), "a string field is not valid UTF-8"))
        sent += 1

        # Still serving, and a well-formed request is answered as ever.
        vault = vault_pb2_grpc.VaultServiceStub(channel)
        vault.Unlock(vault_pb2.UnlockRequest(passphrase=PASSPHRASE), timeout=30)
        assert vault.Status(vault_pb2.StatusRequest(), timeout=30).state == vault_pb2.VAULT_STATE_UNLOCKED
    log = unlocked.log()
    assert "Traceback" not in log and "DecodeError" not in log, log
    lines = [line for line in log.splitlines() if "control request could not be decoded" in line]
    assert len(lines) == sent, lines
    assert any("method=aegis.v1.VaultService/Unlock problem=bad_utf8" in line for line in lines), lines
    assert any("method=aegis.v1.VaultService/Status problem=malformed" in line for line in lines), lines
    unlocked.assert_no_leaks([MARKER, PASSPHRASE], answers)
