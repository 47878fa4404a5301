"""Rows an older aegisd wrote, which this one serves only once an operator has seen and adopted them.

An older aegisd sealed secrets without their metadata and wrote agent and grant rows without MACs, so
nothing tells such a row from one edited into vault.db. They are never served as they are. `aegisctl
vault adopt` lists every field that adopting them would trust and adopts exactly the rows listed: the
confirmation carries a digest of the listing, taken over ids, token hashes and the sealed bytes too.
A row is listed only if it passes today's checks unchanged (canonical hosts, names without control
characters), so the operator reads what the gate would use. Rows listed in a vault that also holds rows
this aegisd wrote are marked: after an upgrade's first adoption, anything listed is an edit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aegisd.errors import InvalidArgument
from aegisd.text import plural
from aegisd.vault.credentials import Credential, credential_from_row, valid_as_stored, validate_name, validate_rate
from aegisd.vault.crypto import MasterKey, SealBroken, secret_aad_v1, unseal
from aegisd.vault.records import RecordKey
from aegisd.vault.sealing import SELECT_SEALED, open_row, seal_secret


@dataclass(frozen=True)
class OlderCredential:
    credential: Credential
    secret: bytes
    sealed: str  # SHA-256 of the stored nonce and ciphertext: the very row that was listed


@dataclass(frozen=True)
class OlderAgent:
    id: str
    name: str
    token_hash: bytes
    rate_limit: str


@dataclass(frozen=True)
class OlderGrant:
    agent_id: str
    credential_id: str
    agent: str
    credential: str


@dataclass(frozen=True)
class OlderRows:
    credentials: list[OlderCredential]
    agents: list[OlderAgent]
    grants: list[OlderGrant]
    mixed: bool  # rows are listed and the vault also holds rows this aegisd wrote: likely edited in
    # Agent rows without a MAC that cannot be adopted (they fail today's checks): never served; "name (id)".
    unadoptable: list[str] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.credentials or self.agents or self.grants)

    def digest(self) -> str:
        """Everything adopting would trust, hashed: what the operator confirms must be what is adopted."""
        listed = [[[c.credential.id, c.credential.sealed_metadata().decode(), c.sealed] for c in self.credentials],
                  [[a.id, a.name, a.token_hash.hex(), a.rate_limit] for a in self.agents],
                  [[g.agent_id, g.credential_id, g.agent, g.credential] for g in self.grants], self.mixed]
        return hashlib.sha256(json.dumps(listed).encode()).hexdigest()

    def summary(self) -> str:
        return (f"{plural(len(self.credentials), 'credential')}, {plural(len(self.agents), 'agent')} and "
                f"{plural(len(self.grants), 'grant')}")


def opens_current(row: Sequence[Any], vault_id: str, key: bytearray) -> bool:
    """Whether a row of SELECT_SEALED opens with its metadata as associated data (this aegisd sealed it)."""
    try:
        open_row(row, vault_id, key)
    except (SealBroken, ValueError, TypeError, AttributeError):
        return False
    return True


def older_credential(row: Sequence[Any], vault_id: str, key: bytearray) -> OlderCredential | None:
    """The row as an older aegisd sealed it, if it is one: it opens the old way and passes today's checks."""
    try:
        cred = credential_from_row(row)
        if not valid_as_stored(cred):
            return None
        secret = unseal(key, row[-2], row[-1], secret_aad_v1(vault_id, cred.id))
    except (SealBroken, ValueError, TypeError, AttributeError):
        return None
    return OlderCredential(cred, secret, hashlib.sha256(bytes(row[-2]) + bytes(row[-1])).hexdigest())


def find_older_rows(conn: sqlite3.Connection, vault_id: str, master: MasterKey) -> OlderRows:
    """Everything adoptable, read in the caller's transaction. Rows that are neither current nor adoptable
    (edited, damaged) are left out: doctor and the gate report those."""
    key, records = master.subkey("secrets"), RecordKey(master, vault_id)
    credentials, current_credentials = [], {}
    for row in conn.execute(SELECT_SEALED + " ORDER BY name"):
        if opens_current(row, vault_id, key):
            current_credentials[row[0]] = row[1]
        elif (older := older_credential(row, vault_id, key)) is not None:
            credentials.append(older)
    agents, current_agents, unadoptable = [], {}, []
    for agent_id, name, hashed, rate, mac in conn.execute(
            "SELECT id, name, token_hash, rate_limit, mac FROM agents ORDER BY name"):
        if mac is not None:
            if records.agent_ok(mac, agent_id, name, hashed, rate):
                current_agents[agent_id] = name
        elif _valid_agent(agent_id, name, hashed, rate):
            agents.append(OlderAgent(agent_id, name, hashed, rate))
        else:
            unadoptable.append(f"{name!r} ({agent_id!r})")
    mixed = bool(current_credentials or current_agents)
    # A grant is listed only between rows that are current or listed themselves: its names are then ones the
    # operator can trust (or is shown), never a tampered row's.
    names = {a.id: a.name for a in agents} | current_agents
    credential_names = {c.credential.id: c.credential.name for c in credentials} | current_credentials
    grants = []
    for agent_id, cred_id, mac in conn.execute("SELECT agent_id, credential_id, mac FROM grants"):
        if mac is not None:
            mixed = mixed or records.grant_ok(mac, agent_id, cred_id)
        elif agent_id in names and cred_id in credential_names:
            grants.append(OlderGrant(agent_id, cred_id, names[agent_id], credential_names[cred_id]))
    grants.sort(key=lambda g: (g.agent, g.credential))
    # `mixed` warns about the listed rows; with none listed there is nothing to warn about.
    mixed = mixed and bool(credentials or agents or grants)
    return OlderRows(credentials, agents, grants, mixed, unadoptable)


def adopt(conn: sqlite3.Connection, vault_id: str, master: MasterKey, older: OlderRows) -> None:
    """Seal each listed secret with its metadata and MAC each listed row, in the caller's transaction."""
    key, records = master.subkey("secrets"), RecordKey(master, vault_id)
    conn.executemany("UPDATE credentials SET nonce = ?, ciphertext = ? WHERE id = ?", [
        (*seal_secret(key, vault_id, c.credential, c.secret), c.credential.id) for c in older.credentials])
    conn.executemany("UPDATE agents SET mac = ? WHERE id = ? AND mac IS NULL", [
        (records.agent(a.id, a.name, a.token_hash, a.rate_limit), a.id) for a in older.agents])
    conn.executemany("UPDATE grants SET mac = ? WHERE agent_id = ? AND credential_id = ? AND mac IS NULL", [
        (records.grant(g.agent_id, g.credential_id), g.agent_id, g.credential_id) for g in older.grants])


def _valid_agent(agent_id: object, name: object, token_hash: object, rate: object) -> bool:
    if not (isinstance(agent_id, str) and isinstance(name, str) and isinstance(token_hash, bytes)
            and isinstance(rate, str)):
        return False
    try:
        validate_name(name, "agent name")
        return validate_rate(rate) == rate
    except InvalidArgument:
        return False
