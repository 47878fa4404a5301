"""Secrets on disk: AES-256-GCM bound to vault id, credential id and metadata, checked on the real files.

The daemon writes the vault through aegisctl; with the daemon stopped the database file is
edited with sqlite3, and what the edit did is read back with the daemon's own classes
(no RPC ever decrypts a secret, so this is the gate-independent way to look).
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

import grpc
import pytest

from aegisd.api.aegis.v1 import vault_pb2, vault_pb2_grpc
from aegisd.errors import StorageCorrupt
from aegisd.vault.crypto import SealBroken, seal, secret_aad_v1, unseal
from aegisd.vault.sealing import OK, TAMPERED, seal_secret
from tests.e2e.gate_support import request
from tests.e2e.support import open_secret, open_vault, rpc_reason
from tests.harness import PASSPHRASE, Aegis
from tests.upstreams import Upstream

SECRETS = {
    "alpha": "sk-alpha-sealed-secret-1111111111",
    "bravo": "sk-bravo-sealed-secret-2222222222",
    "charlie": "sk-charlie-sealed-secret-3333333333",
}


def populate(aegis: Aegis) -> dict[str, str]:
    """Start, init, add the three credentials, stop; returns name -> credential id."""
    aegis.start()
    aegis.init()
    for name, secret in SECRETS.items():
        aegis.add_credential(name, secret, "--service", name, "--domains", f"api.{name}.example")
    ids = {c["name"]: c["id"] for c in json.loads(aegis.ctl_in_process("vault", "list", "--json").ok().out)}
    assert aegis.stop() == 0
    return ids


def sealed(db: Path, credential_id: str) -> tuple[bytes, bytes]:
    conn = sqlite3.connect(db)
    try:
        row = conn.execute("SELECT nonce, ciphertext FROM credentials WHERE id = ?", (credential_id,)).fetchone()
    finally:
        conn.close()
    assert row is not None
    return bytes(row[0]), bytes(row[1])


def write_sealed(db: Path, credential_id: str, nonce: bytes, ciphertext: bytes) -> None:
    conn = sqlite3.connect(db)
    try:
        conn.execute("UPDATE credentials SET nonce = ?, ciphertext = ? WHERE id = ?",
                     (nonce, ciphertext, credential_id))
        conn.commit()
    finally:
        conn.close()


def test_swapped_ciphertexts_are_detected_not_decrypted(fresh: Aegis) -> None:
    ids = populate(fresh)
    db = fresh.data_dir / "vault.db"
    with open_vault(fresh.data_dir) as vault:  # control: untouched rows open to their own secrets
        assert {n: open_secret(vault, i) for n, i in ids.items()} == {n: s.encode() for n, s in SECRETS.items()}

    alpha, bravo = sealed(db, ids["alpha"]), sealed(db, ids["bravo"])
    write_sealed(db, ids["alpha"], *bravo)
    write_sealed(db, ids["bravo"], *alpha)

    # The daemon still starts, unlocks and lists: the metadata is intact.
    fresh.start()
    fresh.ctl_in_process("unlock", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    listed = json.loads(fresh.ctl_in_process("vault", "list", "--json").ok().out)
    assert sorted(c["name"] for c in listed) == sorted(SECRETS)
    assert fresh.stop() == 0

    with open_vault(fresh.data_dir) as vault:
        for name in ("alpha", "bravo"):
            with pytest.raises(StorageCorrupt) as caught:
                open_secret(vault, ids[name])
            assert f"vault remove --id {ids[name]}" in caught.value.message
            assert not any(secret in caught.value.message for secret in SECRETS.values())
        assert open_secret(vault, ids["charlie"]) == SECRETS["charlie"].encode()

    # Swapping back restores both: the ciphertexts were detected, not destroyed.
    write_sealed(db, ids["alpha"], *alpha)
    write_sealed(db, ids["bravo"], *bravo)
    with open_vault(fresh.data_dir) as vault:
        assert open_secret(vault, ids["alpha"]) == SECRETS["alpha"].encode()
        assert open_secret(vault, ids["bravo"]) == SECRETS["bravo"].encode()
    fresh.assert_no_leaks([PASSPHRASE, *SECRETS.values()])


def test_flipped_bit_is_detected(fresh: Aegis) -> None:
    ids = populate(fresh)
    db = fresh.data_dir / "vault.db"
    nonce, ciphertext = sealed(db, ids["charlie"])
    write_sealed(db, ids["charlie"], nonce, bytes([ciphertext[0] ^ 0x01]) + ciphertext[1:])
    with open_vault(fresh.data_dir) as vault:
        with pytest.raises(StorageCorrupt):
            open_secret(vault, ids["charlie"])
        assert open_secret(vault, ids["alpha"]) == SECRETS["alpha"].encode()
    fresh.assert_no_leaks([PASSPHRASE, *SECRETS.values()])


def test_every_seal_has_a_fresh_nonce_and_rotate_reseals(fresh: Aegis) -> None:
    ids = populate(fresh)
    db = fresh.data_dir / "vault.db"
    before = {name: sealed(db, cid) for name, cid in ids.items()}
    assert len({nonce for nonce, _ in before.values()}) == len(ids)
    assert all(len(nonce) == 12 for nonce, _ in before.values())

    new_secret = "sk-alpha-rotated-secret-4444444444"
    fresh.start()
    fresh.ctl_in_process("unlock", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    fresh.ctl_in_process("vault", "rotate", "alpha", "--secret-stdin", input=new_secret + "\n").ok()
    assert fresh.stop() == 0

    nonce, ciphertext = sealed(db, ids["alpha"])
    assert nonce != before["alpha"][0] and ciphertext != before["alpha"][1]
    assert sealed(db, ids["bravo"]) == before["bravo"]
    with open_vault(fresh.data_dir) as vault:
        assert open_secret(vault, ids["alpha"]) == new_secret.encode()
        assert open_secret(vault, ids["bravo"]) == SECRETS["bravo"].encode()
    fresh.assert_no_leaks([PASSPHRASE, new_secret, *SECRETS.values()])


def test_secret_stdin_reads_only_the_first_line(fresh: Aegis) -> None:
    fresh.start()
    fresh.init()
    fresh.ctl("vault", "add", "multi", "--service", "multi", "--domains", "m.example", "--secret-stdin",
              input="sk-first-line-secret-0101\nsk-second-line-secret-0202\n").ok()
    cid = json.loads(fresh.ctl_in_process("vault", "show", "multi", "--json").ok().out)["id"]
    assert fresh.stop() == 0
    with open_vault(fresh.data_dir) as vault:
        assert open_secret(vault, cid) == b"sk-first-line-secret-0101"
    fresh.assert_no_leaks([PASSPHRASE, "sk-first-line-secret-0101", "sk-second-line-secret-0202"])


@pytest.mark.parametrize(("env", "cost"), [
    ({"AEGIS_KDF_MEMORY_MIB": "", "AEGIS_KDF_ITERATIONS": ""}, (65536, 3)),  # the default
    ({"AEGIS_KDF_MEMORY_MIB": "24", "AEGIS_KDF_ITERATIONS": "4"}, (24576, 4)),
], ids=["default", "configured"])
def test_key_slots_hold_no_key_in_clear_and_record_their_parameters(fresh: Aegis, env: dict[str, str],
                                                                    cost: tuple[int, int]) -> None:
    fresh.start(env=env)
    key_file = fresh.root / "unlock.key"
    fresh.init(PASSPHRASE, "--unlock-key-out", str(key_file))
    assert fresh.stop() == 0
    unlock_key = key_file.read_text().strip()
    slots = key_slots(fresh)
    assert [(kind, kdf) for kind, kdf, _ in slots] == [("passphrase", "argon2id"), ("unlock_key", "hkdf-sha256")]
    assert slots[0][2] == {"memory_kib": cost[0], "iterations": cost[1], "lanes": 4}
    fresh.assert_no_leaks([PASSPHRASE, unlock_key])


def test_a_passphrase_change_keeps_a_costlier_slot_s_cost_and_takes_a_costlier_config(fresh: Aegis) -> None:
    """The configured cost is for new slots; a passphrase change never makes a stolen vault.db cheaper to attack."""
    fresh.start(env={"AEGIS_KDF_MEMORY_MIB": "24", "AEGIS_KDF_ITERATIONS": "2"})
    fresh.init()
    assert fresh.stop() == 0
    fresh.start(env={"AEGIS_KDF_MEMORY_MIB": "19", "AEGIS_KDF_ITERATIONS": "3"})
    second = PASSPHRASE + " and then some"
    fresh.ctl_in_process("passphrase", "--passphrase-stdin", input=f"{PASSPHRASE}\n{second}\n").ok()
    assert key_slots(fresh)[0][2] == {"memory_kib": 24576, "iterations": 3, "lanes": 4}
    fresh.ctl_in_process("lock").ok()
    fresh.ctl_in_process("unlock", "--passphrase-stdin", input=second + "\n").ok()
    fresh.assert_no_leaks([PASSPHRASE, second])


@pytest.mark.parametrize(("env", "message"), [
    ({"AEGIS_KDF_MEMORY_MIB": "18"}, "kdf_memory_mib '18' (from AEGIS_KDF_MEMORY_MIB) must be between 19 and 4096"),
    ({"AEGIS_KDF_ITERATIONS": "1"}, "kdf_iterations '1' (from AEGIS_KDF_ITERATIONS) must be between 2 and 64"),
    ({"AEGIS_KDF_MEMORY_MIB": "19.5"}, "must be a whole number"),
], ids=["memory", "iterations", "fraction"])
def test_a_kdf_cost_below_the_floor_is_refused_at_start(fresh: Aegis, env: dict[str, str], message: str) -> None:
    fresh.start(env=env, wait=False)
    assert fresh.proc is not None and fresh.proc.wait(15) == 2
    fresh.proc = None
    assert message in fresh.log() and "Traceback" not in fresh.log()


def key_slots(aegis: Aegis) -> list[tuple[str, str, dict[str, int]]]:
    conn = sqlite3.connect(aegis.data_dir / "vault.db")
    try:
        rows = conn.execute("SELECT kind, kdf, params FROM key_slots ORDER BY id").fetchall()
    finally:
        conn.close()
    return [(kind, kdf, json.loads(params)) for kind, kdf, params in rows]


def agents_authentic(aegis: Aegis) -> dict[str, str]:
    checks = json.loads(aegis.ctl_in_process("doctor", "--json").out)["checks"]
    return next(c for c in checks if c["name"] == "agents_authentic")


LOCAL = "sk-local-sealed-secret-4444444444"


def older_vault(aegis: Aegis, up: Upstream) -> tuple[dict[str, str], str]:
    """A vault as an older aegisd left it (schema 2): secrets sealed without their metadata, and agent
    `claude` granted `bravo` and `local` (served by `up`) with no MACs. Returns the credential ids and
    claude's token."""
    populate(aegis)
    aegis.start()
    aegis.ctl_in_process("unlock", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    aegis.add_credential("local", LOCAL, "--service", "local", "--domains", up.entry())
    added = aegis.ctl_in_process("agent", "add", "claude").ok()
    aegis.outputs.remove(added.out)  # the one place the token may appear
    for credential in ("bravo", "local"):
        aegis.ctl_in_process("grant", "claude", credential).ok()
    ids = {c["name"]: c["id"] for c in json.loads(aegis.ctl_in_process("vault", "list", "--json").ok().out)}
    assert aegis.stop() == 0
    db = aegis.data_dir / "vault.db"
    with open_vault(aegis.data_dir) as vault:
        key, vault_id = vault.master().subkey("secrets"), vault.vault_id
        assert vault_id is not None
        for cid in ids.values():
            write_sealed(db, cid, *seal(key, open_secret(vault, cid), secret_aad_v1(vault_id, cid)))
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("ALTER TABLE agents DROP COLUMN mac")
        conn.execute("ALTER TABLE grants DROP COLUMN mac")
        conn.execute("UPDATE schema_version SET version = 2")
    conn.close()
    return ids, added.out.strip()


def check(aegis: Aegis, name: str) -> dict[str, str]:
    checks = json.loads(aegis.ctl_in_process("doctor", "--json").out)["checks"]
    return next(c for c in checks if c["name"] == name)


def call(aegis: Aegis, token: str, target: str) -> int:
    return request(aegis.gate_port, "GET", target, [("X-Aegis-Agent", token)]).status


def test_an_older_vault_is_served_only_once_an_operator_adopts_it(fresh: Aegis) -> None:
    """What an older aegisd wrote is listed, not trusted: the gate serves none of it until `vault adopt`,
    which shows every field adopting trusts and adopts exactly the rows listed, in one write."""
    up = Upstream().start()
    try:
        ids, token = older_vault(fresh, up)
        db = fresh.data_dir / "vault.db"
        old = {name: sealed(db, cid) for name, cid in ids.items()}

        fresh.start()
        fresh.ctl_in_process("unlock", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
        assert ("4 credentials, 1 agent and 2 grants from an older aegisd are not served until an operator checks "
                "them and runs `aegisctl vault adopt`") in fresh.log()
        assert call(fresh, token, "/local/echo/before") == 401 and up.requests_to("/echo/before") == []
        older = check(fresh, "older_rows")
        assert older["status"] == "fail" and "4 credentials, 1 agent and 2 grants" in older["message"], older
        assert check(fresh, "credentials_decrypt")["status"] == "pass"
        refused = fresh.ctl_in_process("grant", "claude", "alpha")  # a change on a row not yet trusted would trust it
        assert refused.code == 1 and "comes from an older aegisd" in refused.err, refused

        assert fresh.ctl("vault", "adopt").code == 2  # not on a terminal and no --yes: nothing adopted
        listed = json.loads(fresh.ctl_in_process("vault", "adopt", "--json").ok().out)  # --json without --yes: the list
        assert listed["adopted"] is False and listed["mixed"] is False
        assert [c["name"] for c in listed["credentials"]] == ["alpha", "bravo", "charlie", "local"]
        assert listed["credentials"][0] == {
            "name": "alpha", "service": "alpha", "domains": ["api.alpha.example"], "auth_type": "bearer",
            "header_name": None, "query_param": None, "scopes": ["*"], "rate_limit": None,
            "body_inspection": "block", "expires_at": None}
        assert listed["agents"] == [{"name": "claude", "rate_limit": None}]
        assert listed["grants"] == [{"agent": "claude", "credential": c} for c in ("bravo", "local")]
        # Adopting needs the passphrase (found by a review: with the socket alone, an older row's hosts edited into a
        # backup, restored and adopted, sent its secret elsewhere).
        refused = fresh.ctl_in_process("vault", "adopt", "--yes")
        assert refused.code == 1 and "it needs the vault's passphrase" in refused.err, refused
        assert "--passphrase-stdin" in refused.err
        wrong = fresh.ctl_in_process("vault", "adopt", "--yes", "--passphrase-stdin", input="not it at all\n")
        assert wrong.code == 1 and "wrong passphrase" in wrong.err, wrong
        assert "adoption refused: wrong passphrase" in fresh.log()
        assert call(fresh, token, "/local/echo/before") == 401  # neither adopted anything
        adopted = json.loads(fresh.ctl_in_process("vault", "adopt", "--yes", "--json", "--passphrase-stdin",
                                                  input=PASSPHRASE + "\n").ok().out)
        assert adopted == {**listed, "adopted": True}
        assert "adopted what an older aegisd wrote: 4 credentials, 1 agent and 2 grants" in fresh.log()
        assert call(fresh, token, "/local/echo/after") == 200 and len(up.requests_to("/echo/after")) == 1
        assert [check(fresh, n)["status"] for n in ("older_rows", "agents_authentic")] == ["pass", "pass"]
        assert fresh.ctl_in_process("vault", "adopt").ok().out.startswith("Nothing to adopt")

        # A listing is confirmed by its digest: a row changed in between makes the adoption refuse and adopt
        # nothing, whether the change shows in the list (another grant) or not (a token hash).
        conn = sqlite3.connect(db)
        with conn:
            conn.execute("UPDATE grants SET mac = NULL WHERE credential_id = ?", (ids["bravo"],))
        conn.close()
        with grpc.insecure_channel(f"unix:{fresh.socket}") as channel:
            stub = vault_pb2_grpc.VaultServiceStub(channel)
            first = stub.Adopt(vault_pb2.AdoptRequest(dry_run=True), timeout=30)
            assert first.mixed and [(g.agent, g.credential) for g in first.grants] == [("claude", "bravo")]
            conn = sqlite3.connect(db)
            with conn:
                conn.execute("UPDATE grants SET mac = NULL WHERE credential_id = ?", (ids["local"],))
            conn.close()
            with pytest.raises(grpc.RpcError) as changed:
                stub.Adopt(vault_pb2.AdoptRequest(digest=first.digest, passphrase=PASSPHRASE), timeout=30)
            assert changed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert rpc_reason(changed.value) == "older_rows_changed"
            assert len(stub.Adopt(vault_pb2.AdoptRequest(dry_run=True), timeout=30).grants) == 2  # none adopted
            conn = sqlite3.connect(db)
            with conn:
                conn.execute("UPDATE agents SET mac = NULL WHERE name = 'claude'")
            conn.close()
            second = stub.Adopt(vault_pb2.AdoptRequest(dry_run=True), timeout=30)
            conn = sqlite3.connect(db)
            with conn:
                conn.execute("UPDATE agents SET token_hash = ? WHERE name = 'claude'", (bytes(32),))
            conn.close()
            unchanged_list = stub.Adopt(vault_pb2.AdoptRequest(dry_run=True), timeout=30)
            assert [a.name for a in unchanged_list.agents] == [a.name for a in second.agents] == ["claude"]
            with pytest.raises(grpc.RpcError) as hidden:
                stub.Adopt(vault_pb2.AdoptRequest(digest=second.digest, passphrase=PASSPHRASE), timeout=30)
            assert hidden.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert rpc_reason(hidden.value) == "older_rows_changed"
        shown = fresh.ctl_in_process("vault", "adopt")  # the operator is told these rows were most likely edited in
        assert shown.code == 2 and "grant claude -> bravo" in shown.out and "edited into vault.db" in shown.out
        conn = sqlite3.connect(db)
        with conn:  # an agent row without a MAC that fails today's checks: neither served nor adoptable
            conn.execute("UPDATE agents SET rate_limit = 'lots' WHERE name = 'claude'")
        conn.close()
        unadoptable = check(fresh, "older_rows")
        assert unadoptable["status"] == "fail" and "fail today's checks" in unadoptable["message"], unadoptable
        assert fresh.stop() == 0

        with open_vault(fresh.data_dir) as vault:
            key, vault_id = vault.master().subkey("secrets"), vault.vault_id
            assert vault_id is not None
            for name, cid in ids.items():
                nonce, ciphertext = sealed(db, cid)
                assert (nonce, ciphertext) != old[name]
                with pytest.raises(SealBroken):  # no longer opens the old way
                    unseal(key, nonce, ciphertext, secret_aad_v1(vault_id, cid))
            assert open_secret(vault, ids["alpha"]) == SECRETS["alpha"].encode()

        # After adoption: an allowlist widened breaks its seal; an old copy's secret written back next to
        # another widened allowlist is listed again (with the host), for the operator to refuse.
        conn = sqlite3.connect(db)
        with conn:
            conn.execute("UPDATE credentials SET domains = '[\"evil.example\"]' WHERE id IN (?, ?)",
                         (ids["alpha"], ids["bravo"]))
        conn.close()
        write_sealed(db, ids["bravo"], *old["bravo"])
        with open_vault(fresh.data_dir) as vault:
            with pytest.raises(StorageCorrupt, match="metadata sealed"):
                open_secret(vault, ids["alpha"])
            with pytest.raises(StorageCorrupt, match="older aegisd"):
                open_secret(vault, ids["bravo"])
            assert [c.credential.name for c in vault.older_rows().credentials] == ["bravo"]
        # An old row whose host is not written the way aegisd writes hosts (a look-alike, say) is never listed.
        conn = sqlite3.connect(db)
        with conn:
            conn.execute("UPDATE credentials SET domains = '[\"API.charlie.example\"]' WHERE id = ?", (ids["charlie"],))
        conn.close()
        write_sealed(db, ids["charlie"], *old["charlie"])
        with open_vault(fresh.data_dir) as vault:
            assert [c.credential.name for c in vault.older_rows().credentials] == ["bravo"]
            with pytest.raises(StorageCorrupt, match="fails authentication"):
                open_secret(vault, ids["charlie"])
        fresh.start()
        fresh.ctl_in_process("unlock", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
        decrypt = check(fresh, "credentials_decrypt")
        assert decrypt["status"] == "fail", decrypt
        assert decrypt["message"].endswith(f": alpha ({ids['alpha']}), charlie ({ids['charlie']})"), decrypt
        shown = fresh.ctl_in_process("vault", "adopt")
        assert shown.code == 2 and "credential bravo  service bravo  hosts evil.example" in shown.out
        assert fresh.stop() == 0
        fresh.assert_no_leaks([PASSPHRASE, token, LOCAL, *SECRETS.values()])
    finally:
        up.stop()


def test_rows_of_the_wrong_shape_are_listed_as_failing_not_fatal(fresh: Aegis) -> None:
    """Values aegisd never writes (a domains column that is not a list, an expiry past the year 9999) make
    their row malformed: listings mark it as failing and say how to remove it, and the rest is served."""
    ids = populate(fresh)
    conn = sqlite3.connect(fresh.data_dir / "vault.db")
    with conn:
        conn.execute("UPDATE credentials SET domains = '5' WHERE id = ?", (ids["alpha"],))
        conn.execute("UPDATE credentials SET expires_at = ? WHERE id = ?", (2**62, ids["bravo"]))
    conn.close()
    with open_vault(fresh.data_dir) as vault:
        assert [(c.credential.name, c.status) for c in vault.checked_credentials()] == [
            ("alpha", TAMPERED), ("bravo", TAMPERED), ("charlie", OK)]
        for name in ("alpha", "bravo"):
            assert vault.check_credential(name).status == TAMPERED
            with pytest.raises(StorageCorrupt, match=f"vault remove --id {ids[name]}"):
                open_secret(vault, ids[name])
        assert open_secret(vault, ids["charlie"]) == SECRETS["charlie"].encode()
    fresh.start()
    fresh.ctl_in_process("unlock", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    listed = json.loads(fresh.ctl_in_process("vault", "list", "--json").ok().out)
    assert [(c["name"], c["integrity"]) for c in listed] == [("alpha", "tampered"), ("bravo", "tampered"),
                                                             ("charlie", "ok")]
    # Too malformed to read: shown by id and name, nothing invented for the rest.
    assert (listed[0]["id"], listed[0]["domains"], listed[0]["auth_type"], listed[0]["body_inspection"]) == (
        ids["alpha"], [], "unknown", "unknown")
    shown = fresh.ctl_in_process("vault", "show", "alpha").ok()
    assert "FAILS" in shown.out and f"vault remove --id {ids['alpha']}" in shown.err
    fresh.ctl_in_process("vault", "remove", "--id", ids["alpha"], "--yes").ok()
    assert fresh.stop() == 0
    fresh.assert_no_leaks([PASSPHRASE, *SECRETS.values()])


def test_a_credential_whose_stored_settings_no_longer_build_a_route_is_the_only_one_left_out(fresh: Aegis) -> None:
    """A credential sealed with an allowlist that today's checks refuse (as a newer public-suffix list could
    make an old wildcard too broad) is not served and is named, while every other credential still is."""
    up = Upstream().start()
    try:
        fresh.start()
        fresh.init()
        fresh.add_credential("bravo", SECRETS["bravo"], "--service", "bravo", "--domains", "api.bravo.example")
        fresh.add_credential("local", LOCAL, "--service", "local", "--domains", up.entry())
        added = fresh.ctl_in_process("agent", "add", "claude").ok()
        fresh.outputs.remove(added.out)  # the one place the token may appear
        token = added.out.strip()
        for credential in ("bravo", "local"):
            fresh.ctl_in_process("grant", "claude", credential).ok()
        assert fresh.stop() == 0
        with open_vault(fresh.data_dir) as vault:
            assert vault.vault_id is not None
            [bravo] = [c for c in vault.checked_credentials() if c.credential.name == "bravo"]
            assert bravo.secret is not None
            broad = dataclasses.replace(bravo.credential, domains=["*.com"])
            nonce, ciphertext = seal_secret(vault.master().subkey("secrets"), vault.vault_id, broad, bravo.secret)
        conn = sqlite3.connect(fresh.data_dir / "vault.db")
        with conn:
            conn.execute("UPDATE credentials SET domains = ?, nonce = ?, ciphertext = ? WHERE id = ?",
                         (json.dumps(broad.domains), nonce, ciphertext, broad.id))
        conn.close()

        fresh.start()
        fresh.ctl_in_process("unlock", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
        assert call(fresh, token, "/local/echo/served") == 200 and len(up.requests_to("/echo/served")) == 1
        assert call(fresh, token, "/bravo/echo/left-out") == 403
        assert f"credential 'bravo' ({broad.id}) cannot be served: domain entry '*.com'" in fresh.log()
        decrypt = check(fresh, "credentials_decrypt")
        assert decrypt["status"] == "fail" and "bravo (domain entry '*.com'" in decrypt["message"], decrypt
        fresh.assert_no_leaks([PASSPHRASE, token, LOCAL, SECRETS["bravo"]])
    finally:
        up.stop()
