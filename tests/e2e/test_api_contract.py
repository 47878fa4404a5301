"""The control API on the wire: each failure has a precise gRPC status and a stable reason, and
no response, raw bytes included, carries a secret or the passphrase.

This talks gRPC to the socket directly with the generated stubs (as grpcurl or another client
would), because aegisctl turns statuses into messages and exit codes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from aegisd.api.aegis.v1 import credentials_pb2 as cpb
from aegisd.api.aegis.v1 import credentials_pb2_grpc, vault_pb2, vault_pb2_grpc
from tests.e2e.support import rpc_reason
from tests.harness import PASSPHRASE, Aegis

SECRET = "sk-wire-secret-0f1e2d3c4b5a69788796"


@pytest.fixture
def channel(aegis: Aegis) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"unix:{aegis.socket}") as chan:
        yield chan


def failure(call: Callable[..., Any], request: Any) -> tuple[grpc.StatusCode, str, str]:
    """Call an RPC that must fail; return its status code, reason trailer and details."""
    try:
        call(request, timeout=30)
    except grpc.RpcError as exc:
        err: Any = exc
        return err.code(), rpc_reason(exc), str(err.details())
    raise AssertionError(f"{request!r} unexpectedly succeeded")


def test_error_statuses_and_reasons(aegis: Aegis, channel: grpc.Channel) -> None:
    vault = vault_pb2_grpc.VaultServiceStub(channel)
    creds = credentials_pb2_grpc.CredentialServiceStub(channel)
    add = cpb.AddCredentialRequest(name="wire", service="wire", domains=["api.wire.example"], secret=SECRET)

    assert failure(creds.ListCredentials, cpb.ListCredentialsRequest())[:2] == (
        grpc.StatusCode.FAILED_PRECONDITION, "vault_uninitialized")
    assert failure(vault.Init, vault_pb2.InitRequest(passphrase="weak"))[:2] == (
        grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument")
    vault.Init(vault_pb2.InitRequest(passphrase=PASSPHRASE), timeout=60)
    assert failure(vault.Init, vault_pb2.InitRequest(passphrase=PASSPHRASE))[0] == grpc.StatusCode.ALREADY_EXISTS

    added = creds.AddCredential(add, timeout=30)
    assert failure(creds.AddCredential, add)[:2] == (grpc.StatusCode.ALREADY_EXISTS, "already_exists")
    assert failure(creds.GetCredential, cpb.GetCredentialRequest(name="ghost"))[:2] == (
        grpc.StatusCode.NOT_FOUND, "credential_not_found")
    bad_domain = cpb.AddCredentialRequest(name="broad", service="broad", domains=["*.com"], secret=SECRET)
    code, reason, details = failure(creds.AddCredential, bad_domain)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument") and "too broad" in details
    empty_secret = cpb.AddCredentialRequest(name="empty", service="empty", domains=["e.example"], secret="")
    assert failure(creds.AddCredential, empty_secret)[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert failure(creds.UpdateCredential, cpb.UpdateCredentialRequest(name="wire"))[0] == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert failure(vault.Unlock, vault_pb2.UnlockRequest())[0] == grpc.StatusCode.INVALID_ARGUMENT

    vault.Lock(vault_pb2.LockRequest(), timeout=30)
    other = cpb.AddCredentialRequest(name="other", service="other", domains=["o.example"], secret=SECRET)
    assert failure(creds.AddCredential, other)[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "vault_locked")
    code, reason, details = failure(vault.Unlock, vault_pb2.UnlockRequest(passphrase="not the passphrase at all"))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "wrong_passphrase")
    assert "not the passphrase" not in details
    vault.Unlock(vault_pb2.UnlockRequest(passphrase=PASSPHRASE), timeout=60)
    assert creds.GetCredential(cpb.GetCredentialRequest(name="wire"), timeout=30).id == added.id
    # Found by a cold review: once unlocked, Unlock answered OK to any secret, unchecked and unlogged. It is
    # checked all the same now: a wrong one is refused (and logged like any failed unlock), a right one is OK.
    code, reason, _ = failure(vault.Unlock, vault_pb2.UnlockRequest(passphrase="not the passphrase at all"))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "wrong_passphrase")
    failure(vault.Unlock, vault_pb2.UnlockRequest(unlock_key="garbage"))  # refused too (not an unlock key)
    assert aegis.log().count("vault unlock failed: wrong secret") == 2  # this one and the one while locked
    vault.Unlock(vault_pb2.UnlockRequest(passphrase=PASSPHRASE), timeout=60)
    assert vault.Status(vault_pb2.StatusRequest(), timeout=30).state == vault_pb2.VAULT_STATE_UNLOCKED
    aegis.assert_no_leaks([PASSPHRASE, SECRET])


def test_no_response_carries_a_secret(aegis: Aegis, channel: grpc.Channel) -> None:
    vault = vault_pb2_grpc.VaultServiceStub(channel)
    creds = credentials_pb2_grpc.CredentialServiceStub(channel)
    rotated = "sk-wire-rotated-99887766554433221100"
    replies: list[Any] = [
        vault.Init(vault_pb2.InitRequest(passphrase=PASSPHRASE), timeout=60),
        creds.AddCredential(cpb.AddCredentialRequest(name="wire", service="wire", domains=["w.example"],
                                                     secret=SECRET), timeout=30),
        creds.RotateCredential(cpb.RotateCredentialRequest(name="wire", secret=rotated), timeout=30),
        creds.GetCredential(cpb.GetCredentialRequest(name="wire"), timeout=30),
        creds.ListCredentials(cpb.ListCredentialsRequest(), timeout=30),
        creds.UpdateCredential(cpb.UpdateCredentialRequest(name="wire", set_scopes=True, scopes=["read"]),
                               timeout=30),
        vault.Status(vault_pb2.StatusRequest(), timeout=30),
        vault.Lock(vault_pb2.LockRequest(), timeout=30),
        vault.Unlock(vault_pb2.UnlockRequest(passphrase=PASSPHRASE), timeout=60),
        creds.RemoveCredential(cpb.RemoveCredentialRequest(name="wire"), timeout=30),
    ]
    for reply in replies:
        raw = reply.SerializeToString()
        for needle in (SECRET, rotated, PASSPHRASE):
            assert needle.encode() not in raw, f"{type(reply).__name__} carries a secret"
    aegis.assert_no_leaks([PASSPHRASE, SECRET, rotated])
