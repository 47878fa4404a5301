"""Key derivations queued on the control socket hold nothing else up, and keep their race with `lock`.

Unlocks and key changes derive Argon2id keys one at a time. They used to wait for their turn in threads of aegisd's
default pool, which every store read, the metrics scrape and the gate's redaction compiles share: a few unlocks at
once filled it, and `status`, `vault list` and /_aegis/metrics waited until the derivations were done. Checked by
order, never by time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import grpc
import pytest

from aegisd.api.aegis.v1 import credentials_pb2, credentials_pb2_grpc, vault_pb2, vault_pb2_grpc
from tests.e2e.gate_support import request
from tests.e2e.support import rpc_reason
from tests.harness import PASSPHRASE, Aegis, new_aegis

SECRET = "sk-key-derivations-0123456789abcdef"
# Argon2id at 128 MiB (two passes): about 0.4 s a derivation here, long beside a status call, and the memory of one
# derivation only (they run one at a time).
COSTLY_KDF = {"AEGIS_KDF_MEMORY_MIB": "128", "AEGIS_KDF_ITERATIONS": "2"}
# The threads of aegisd's default pool (asyncio's default executor, Python's ThreadPoolExecutor default): the same
# machine, so the same number as in the daemon.
DEFAULT_POOL = min(32, (os.cpu_count() or 1) + 4)


@pytest.fixture
def costly() -> Iterator[Aegis]:
    instance = new_aegis()
    try:
        instance.start(env=COSTLY_KDF)
        instance.init()
        instance.add_credential("svc", SECRET, "--service", "svc", "--domains", "svc.example")
        yield instance
    finally:
        instance.cleanup()


def test_status_listings_and_metrics_do_not_wait_for_queued_unlocks(costly: Aegis) -> None:
    """More wrong unlocks at once than the default pool has threads. Once the first has been answered (so all of
    them are in aegisd, waiting for their turn), a status call, a listing and a metrics scrape come back while
    nearly all the others still wait. Before, the scrape and both calls queued behind the unlocks: they came back
    only once all but (pool size - 1) of the unlocks had been answered."""
    guesses = DEFAULT_POOL + 5
    with grpc.insecure_channel(f"unix:{costly.socket}") as channel:
        vault = vault_pb2_grpc.VaultServiceStub(channel)
        first_answered = threading.Event()
        unlocks = [vault.Unlock.future(vault_pb2.UnlockRequest(passphrase=f"wrong guess number {i}"), timeout=120)
                   for i in range(guesses)]
        try:
            for unlock in unlocks:
                unlock.add_done_callback(lambda _: first_answered.set())
            assert first_answered.wait(120)
            status = vault.Status(vault_pb2.StatusRequest(), timeout=120)
            listed = credentials_pb2_grpc.CredentialServiceStub(channel).ListCredentials(
                credentials_pb2.ListCredentialsRequest(), timeout=120)
            metrics = request(costly.gate_port, "GET", "/_aegis/metrics", timeout=120)
            waiting = sum(not unlock.done() for unlock in unlocks)
            # At least DEFAULT_POOL + 2 of the guesses - 1 still waiting: two answered (at most) while the three calls
            # ran, and not as few as the DEFAULT_POOL (or one more, answered but not yet read) the old queue left.
            assert waiting >= DEFAULT_POOL + 2, (
                f"status, a listing and a metrics scrape came back only once {guesses - waiting} of {guesses} queued "
                "unlocks were answered: they waited on the key derivations")
        finally:
            for unlock in unlocks:
                unlock.cancel()  # type: ignore[no-untyped-call]  # a queued derivation is dropped
    assert status.state == vault_pb2.VAULT_STATE_UNLOCKED and status.credentials == 1
    assert [c.name for c in listed.credentials] == ["svc"]
    assert metrics.status == 200 and b'aegis_credentials_total{status="active"} 1.0' in metrics.body
    assert "vault unlock failed: wrong secret" in costly.log()  # each guess answered is still on record
    costly.assert_no_leaks([PASSPHRASE, SECRET])


def test_a_lock_sent_while_an_unlock_waits_its_turn_wins(costly: Aegis) -> None:
    """A right unlock queued behind wrong ones, then a lock: the lock came while the unlock was in progress (waiting
    its turn is part of it), so the unlock fails, `vault_changed`, the vault stays locked, and the log says the
    secret was right. The vault is read when the call comes in, not when its derivation begins."""
    costly.ctl_in_process("lock").ok()
    with grpc.insecure_channel(f"unix:{costly.socket}") as channel:
        vault = vault_pb2_grpc.VaultServiceStub(channel)
        answered = threading.Semaphore(0)
        wrong = [vault.Unlock.future(vault_pb2.UnlockRequest(passphrase=f"wrong guess number {i}"), timeout=120)
                 for i in range(3)]
        for unlock in wrong:
            unlock.add_done_callback(lambda _: answered.release())
        assert answered.acquire(timeout=120)
        right = vault.Unlock.future(vault_pb2.UnlockRequest(passphrase=PASSPHRASE), timeout=120)  # behind two
        assert answered.acquire(timeout=120)  # the right one has been in aegisd for a derivation's time by now
        assert not right.done()
        vault.Lock(vault_pb2.LockRequest(), timeout=120)
        with pytest.raises(grpc.RpcError) as refused:
            right.result()
        for unlock in wrong:
            with pytest.raises(grpc.RpcError):
                unlock.result()
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value
        assert rpc_reason(refused.value) == "vault_changed"
        assert vault.Status(vault_pb2.StatusRequest(), timeout=120).state == vault_pb2.VAULT_STATE_LOCKED
    assert "vault unlock abandoned: the vault was locked or changed meanwhile; the secret given was correct" in (
        costly.log())
    costly.assert_no_leaks([PASSPHRASE, SECRET])


DEADLINES = (0.02, 0.05, 0.1, 0.2, 0.4)  # short enough to cut a call off while its derivation runs, one of them


def settled(vault: vault_pb2_grpc.VaultServiceStub) -> None:
    """Every derivation queued before this has finished: one more, uncut, behind them (the queue is first in,
    first out). Its wrong passphrase changes nothing."""
    with pytest.raises(grpc.RpcError) as refused:
        vault.RemoveUnlockKeys(vault_pb2.RemoveUnlockKeysRequest(passphrase="not the passphrase at all"), timeout=120)
    assert rpc_reason(refused.value) == "wrong_passphrase", refused.value


def test_a_call_cut_off_during_its_derivation_is_still_logged_and_recorded(costly: Aegis) -> None:
    """Found by a cold review at the 27th stop: a call whose client went away (a short deadline) once its derivation
    had begun took effect without a trace. The vault unlocked with no "vault unlocked" line, and an unlock key was
    minted with no log line and no ledger row, so anyone holding the socket could guess or change keys unseen. Its
    outcome is logged and recorded now, as an uncut call's is. (A call cut off while it still waits its turn never
    runs: the loop below tries shorter deadlines first, until one lands during the derivation.)"""
    costly.ctl_in_process("lock").ok()
    unlocked_lines = costly.log().count("vault unlocked")
    with grpc.insecure_channel(f"unix:{costly.socket}") as channel:
        vault = vault_pb2_grpc.VaultServiceStub(channel)
        for deadline in DEADLINES:
            with pytest.raises(grpc.RpcError) as cut:
                vault.Unlock(vault_pb2.UnlockRequest(passphrase=PASSPHRASE), timeout=deadline)
            assert cut.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, cut.value
            settled(vault)
            if vault.Status(vault_pb2.StatusRequest(), timeout=120).state == vault_pb2.VAULT_STATE_UNLOCKED:
                break
        else:
            pytest.fail(f"no cut-off unlock ran its derivation, with deadlines of {DEADLINES} s")
        assert costly.log().count("vault unlocked") == unlocked_lines + 1, costly.log()

        key = "aegis-unlock-" + "A" * 43
        for deadline in DEADLINES:
            with pytest.raises(grpc.RpcError) as cut:
                vault.ReplaceUnlockKey(vault_pb2.ReplaceUnlockKeyRequest(passphrase=PASSPHRASE, unlock_key=key),
                                       timeout=deadline)
            assert cut.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, cut.value
            settled(vault)
            if "vault unlock key replaced" in costly.log():
                break
        else:
            pytest.fail(f"no cut-off key change ran its derivation, with deadlines of {DEADLINES} s")
    costly.ctl_in_process("lock").ok()
    costly.ctl_in_process("unlock", "--unlock-key-stdin", input=key + "\n").ok()  # the change did happen
    rows = costly.ctl_in_process("ledger", "show", "--json", "--limit", "50").ok().out
    assert rows.count('"vault_keys_changed"') == 1, rows
    costly.assert_no_leaks([PASSPHRASE, SECRET, key])


def test_a_widening_cut_off_during_its_passphrase_proof_is_made_only_with_its_record(costly: Aegis) -> None:
    """Found by the review of the fix above: a credential update that widens the credential proves the passphrase
    first, and that proof now returned to a call cut off meanwhile, which then made the change and died before
    logging it: a widening with no log line and no ledger row. A call cut off during its proof now changes nothing,
    and one cut off during its write still logs and records it: whatever the deadline, every widening made is on
    record."""
    made = 0
    with grpc.insecure_channel(f"unix:{costly.socket}") as channel:
        credentials = credentials_pb2_grpc.CredentialServiceStub(channel)
        vault = vault_pb2_grpc.VaultServiceStub(channel)
        for n, deadline in enumerate((*DEADLINES, 120)):
            domain = f"wider{n}.example"
            try:
                credentials.UpdateCredential(credentials_pb2.UpdateCredentialRequest(
                    name="svc", set_domains=True, domains=["svc.example", domain], passphrase=PASSPHRASE),
                    timeout=deadline)
            except grpc.RpcError as cut:
                assert cut.code() == grpc.StatusCode.DEADLINE_EXCEEDED, cut
            settled(vault)
            now = credentials.GetCredential(credentials_pb2.GetCredentialRequest(name="svc"), timeout=120)
            made += domain in now.domains
    assert made >= 1  # the last call, uncut, at least
    rows = costly.ctl_in_process("ledger", "show", "--json", "--limit", "100").ok().out
    assert costly.log().count("widened with the passphrase") == made == rows.count('"credential_widened"'), made
    costly.assert_no_leaks([PASSPHRASE, SECRET])
