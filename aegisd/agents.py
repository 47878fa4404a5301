"""Agents and grants: who may call the gate, and which credentials each may use.

An agent's token is shown once and stored only as a keyed hash under a subkey of the vault's
master key, so a stolen database cannot be used to check guessed tokens and every change that
touches a hash needs the vault unlocked. Granting twice is idempotent (it reports that nothing
changed); revoking a grant that does not exist is NotFound (`grant_not_found`), because that
usually means a typo. Every change notifies the vault's listeners with "agents" so the gate's
in-memory table rebuilds from here. Each agent and grant row carries a MAC (aegisd.vault.records),
and the gate is given only the rows whose MAC holds.
"""

from __future__ import annotations

import base64
import builtins
import logging
import secrets
import sqlite3
import uuid
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from aegisd.errors import AlreadyExists, FailedPrecondition, NotFound, StorageCorrupt, VaultUninitialized
from aegisd.store import VaultStore
from aegisd.vault.credentials import is_time, validate_name, validate_rate
from aegisd.vault.crypto import MasterKey, keyed_hash
from aegisd.vault.records import RecordKey
from aegisd.vault.sealing import NOT_ADOPTED, OK, TAMPERED, UNCHECKED
from aegisd.vault.vault import Vault, now_ms, open_sealed

log = logging.getLogger(__name__)

TOKEN_PREFIX = "aegis_"  # noqa: S105 - a marker, not a secret
TOKEN_BYTES = 32
TOKEN_SUBKEY = "agent-tokens"  # noqa: S105 - HKDF purpose label
_AGENT_COLUMNS = "id, name, rate_limit, created_at, rotated_at"
_GRANTS_NAMED = ("SELECT g.agent_id, g.credential_id, g.mac, a.name, c.name FROM grants g "
                 "JOIN agents a ON a.id = g.agent_id JOIN credentials c ON c.id = g.credential_id")


@dataclass
class Agent:
    """An agent as the control API shows it: never its token or the token's hash."""

    id: str
    name: str
    created_at: int
    rotated_at: int
    rate_limit: str = ""
    credentials: list[str] = field(default_factory=list)  # granted credential names the gate honours, sorted
    integrity: str = OK  # a SealCheck status: OK, UNCHECKED (locked), TAMPERED or NOT_ADOPTED (no MAC)
    ignored_grants: list[str] = field(default_factory=list)  # granted by rows that fail their MAC, sorted


class AgentRecord(NamedTuple):
    """One row of the gate's in-memory agent table: enough to authenticate and authorise."""

    id: str
    name: str
    token_hash: bytes
    rate_limit: str
    credential_ids: frozenset[str]
    mac: bytes  # the row's MAC, which held: with the fields above, the row exactly as verified


def new_token() -> str:
    """256 random bits, printable, with the prefix the gate recognises in `Authorization: Bearer`."""
    return TOKEN_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(TOKEN_BYTES)).decode().rstrip("=")


def token_hash(master: MasterKey, token: str) -> bytes:
    """The stored form of a token; the gate hashes a presented token the same way and looks it up."""
    return keyed_hash(master.subkey(TOKEN_SUBKEY), token)


class AgentRegistry:
    """Agent identities and grants in the vault database. Methods block; call from worker threads.

    Changes that narrow what an agent may do (remove, revoke, regenerate, a lower rate limit) scrub the
    write-ahead log after they commit: the row they replace, whose MAC still holds, must not wait there for
    anyone who can write the data directory to put it back (an old token, a revoked grant)."""

    def __init__(self, store: VaultStore, vault: Vault) -> None:
        self._store = store
        self._vault = vault
        # Rows whose MAC held, and the master key that checked them; see _authenticated.
        self._verified: tuple[MasterKey | None, frozenset[tuple[object, ...]]] = (None, frozenset())

    # -- agents ----------------------------------------------------------------------------

    def add(self, name: str) -> tuple[Agent, str]:
        """Create an agent; returns it and its token, which exists nowhere else afterwards."""
        validate_name(name, "agent name")
        token = new_token()
        with self._vault._lock:  # hold off a concurrent lock() from wiping the key mid-hash
            hashed, key = token_hash(self._vault.master(), token), self._record_key()
            now = now_ms()
            agent = Agent(id=uuid.uuid4().hex, name=name, created_at=now, rotated_at=now)
            with self._store.transaction() as conn:
                if conn.execute("SELECT 1 FROM agents WHERE name = ?", (name,)).fetchone():
                    raise AlreadyExists(f"there is already an agent named {name!r}", reason="agent_exists")
                conn.execute("INSERT INTO agents (id, name, token_hash, rate_limit, created_at, rotated_at, mac) "
                             "VALUES (?,?,?,?,?,?,?)",
                             (agent.id, name, hashed, "", now, now, key.agent(agent.id, name, hashed, "")))
        self._vault.notify("agents")
        return agent, token

    def list(self) -> list[Agent]:
        """Every agent, marked by whether its row and each grant authenticate (see Agent.integrity)."""
        return self._agents(None)

    def get(self, name: str) -> Agent:
        [agent] = self._agents(name)
        return agent

    def _agents(self, name: str | None) -> builtins.list[Agent]:
        """All agents, or the one named (NotFound if none), as listings show them: while unlocked, an agent is
        ok only if its whole row authenticates, and it is shown the grants the gate honours (an authentic
        grant of a credential that authenticates, by the credential's sealed name). Only the rows shown are
        checked, so showing one agent costs its own grants, not the vault's."""
        self._require_initialized()
        where, params = ("WHERE name = ?", (name,)) if name is not None else ("", ())
        with self._vault._lock:  # no change or lock between reading the rows and checking them
            with self._store.reading() as conn:
                rows = conn.execute(f"SELECT {_AGENT_COLUMNS}, token_hash, mac FROM agents {where} "  # noqa: S608
                                    "ORDER BY name", params).fetchall()
                if name is not None and len(rows) != 1:
                    if not rows:
                        raise _agent_not_found(name)
                    raise StorageCorrupt(f"more than one agent row is named {name!r}: vault.db was rebuilt outside "
                                         "aegisd; restore a good backup", reason="tampered")
                granted = _grants(conn, rows[0][0] if name is not None else None)
            trust = self._listing_trust(None if name is None else {g[0] for gs in granted.values() for g in gs})
        agents = []
        for row in rows:
            agent = _agent_from_row(row, [])
            grants = granted.get(agent.id, [])
            if trust is None:
                agent.integrity, agent.credentials = UNCHECKED, [cred_name for _, cred_name, _ in grants]
            else:
                key, known, served = trust
                hashed, mac = row[5], row[6]
                holds = _agent_holds(key, known, agent.id, agent.name, hashed, agent.rate_limit, mac)
                agent.integrity = OK if holds else NOT_ADOPTED if mac is None else TAMPERED
                usable = {cred_id for cred_id, _, grant_mac in grants if holds and cred_id in served
                          and _grant_holds(key, known, agent.id, cred_id, grant_mac)}
                agent.credentials = sorted(served[cred_id] for cred_id in usable)
                agent.ignored_grants = [cred_name for cred_id, cred_name, _ in grants if cred_id not in usable]
            agents.append(agent)
        return agents

    def _listing_trust(self, credential_ids: set[str] | None
                       ) -> tuple[RecordKey, frozenset[tuple[object, ...]], dict[str, str]] | None:
        """What a listing checks its rows with: the MAC key, the rows already verified under it, and the sealed
        name by id of each credential (of those given, or all) that opens. None while locked, when nothing
        can be checked. Call with the vault's lock held."""
        if self._vault.state != "unlocked":
            return None
        master = self._vault.master()
        checks = self._vault.checked_credentials(credential_ids)
        return (self._record_key(master), self._verified_under(master),
                {c.credential.id: c.credential.name for c in checks if c.status == OK})

    def _verified_under(self, master: MasterKey) -> frozenset[tuple[object, ...]]:
        """The rows the last full pass verified, if under this master key; none if checked under another
        (before a lock, or a restore)."""
        under, known = self._verified
        return known if under is master else frozenset()

    def remove(self, name: str, by_id: bool = False) -> int:
        """Delete the agent and its grants; returns how many grants went with it.

        By name, only an agent whose row authenticates (its MAC covers the name), so a name moved onto
        another row cannot point the removal elsewhere. By id, only a row that fails (never served).
        """
        with self._vault._lock:
            key = self._record_key()
            with self._store.transaction(scrub=True) as conn:
                if not by_id:
                    agent_id = self._authentic_agent(conn, key, name)[0]
                else:
                    agent_id = name
                    row = conn.execute("SELECT name, token_hash, rate_limit, mac FROM agents WHERE id = ?",
                                       (agent_id,)).fetchone()
                    if row is None:
                        raise NotFound(f"no agent with id {agent_id!r}", reason="agent_not_found")
                    if key.agent_ok(row[3], agent_id, row[0], row[1], row[2]):
                        raise FailedPrecondition(f"agent {agent_id!r} authenticates; remove it by its name",
                                                 reason="remove_by_name")
                    if conn.execute("SELECT count(*) FROM agents WHERE id = ?", (agent_id,)).fetchone()[0] != 1:
                        raise StorageCorrupt(f"more than one agent row has id {agent_id!r}: vault.db was rebuilt "
                                             "outside aegisd; restore a good backup", reason="tampered")
                grants = int(conn.execute("SELECT count(*) FROM grants WHERE agent_id = ?",
                                          (agent_id,)).fetchone()[0])
                conn.execute("DELETE FROM agents WHERE id = ?", (agent_id,))  # grants: ON DELETE CASCADE
        self._vault.notify("agents")
        return grants

    def set_rate_limit(self, name: str, rate: str) -> Agent:
        """Set the agent's own limit across all its credentials ("N/sec|min|hour|day"), or clear it with "".

        A malformed rate is refused here, so the gate never meets one it cannot enforce.
        """
        canonical = validate_rate(rate.strip())
        with self._vault._lock:
            key = self._record_key()
            with self._store.transaction(scrub=True) as conn:
                agent_id, hashed, _ = self._authentic_agent(conn, key, name)
                conn.execute("UPDATE agents SET rate_limit = ?, mac = ? WHERE id = ?",
                             (canonical, key.agent(agent_id, name, hashed, canonical), agent_id))
            agent = self.get(name)  # under the same lock: what was written, not what a later change left
        self._vault.notify("agents")
        return agent

    def regenerate(self, name: str) -> tuple[Agent, str]:
        """Issue a new token; the old hash is replaced in the same write, so the old token dies at once.
        Returns the agent as written and the token, which exists nowhere else afterwards."""
        token = new_token()
        with self._vault._lock:
            hashed, key = token_hash(self._vault.master(), token), self._record_key()
            with self._store.transaction(scrub=True) as conn:
                agent_id, _, rate = self._authentic_agent(conn, key, name)
                conn.execute("UPDATE agents SET token_hash = ?, rotated_at = ?, mac = ? WHERE id = ?",
                             (hashed, now_ms(), key.agent(agent_id, name, hashed, rate), agent_id))
            agent = self.get(name)  # under the write's lock, as set_rate_limit
        self._vault.notify("agents")
        return agent, token

    # -- grants ----------------------------------------------------------------------------

    def grant(self, agent: str, credential: str) -> bool:
        """Let `agent` use `credential`; returns False if it already could (idempotent).

        A grant row whose MAC fails (edited in vault.db) is written afresh: granting again repairs it.
        """
        with self._vault._lock:
            key = self._record_key()
            with self._store.transaction() as conn:
                agent_id, _, _ = self._authentic_agent(conn, key, agent)
                cred_id = self._authentic_credential(conn, credential)
                mac = key.grant(agent_id, cred_id)
                row = conn.execute("SELECT mac FROM grants WHERE agent_id = ? AND credential_id = ?",
                                   (agent_id, cred_id)).fetchone()
                created = row is None or not key.grant_ok(row[0], agent_id, cred_id)
                if created:
                    conn.execute("INSERT OR REPLACE INTO grants (agent_id, credential_id, created_at, mac) "
                                 "VALUES (?,?,?,?)", (agent_id, cred_id, now_ms(), mac))
        if created:
            self._vault.notify("agents")
        return created

    def revoke(self, agent: str, credential: str) -> None:
        """Take a grant away; NotFound if the agent, the credential or the grant does not exist."""
        with self._vault._lock:
            key = self._record_key()
            with self._store.transaction(scrub=True) as conn:  # names resolve only through rows that authenticate
                agent_id, _, _ = self._authentic_agent(conn, key, agent)
                cred_id = self._authentic_credential(conn, credential)
                deleted = conn.execute("DELETE FROM grants WHERE agent_id = ? AND credential_id = ?",
                                       (agent_id, cred_id)).rowcount
                if not deleted:
                    raise NotFound(f"agent {agent!r} has no grant of credential {credential!r}",
                                   reason="grant_not_found")
        self._vault.notify("agents")

    # -- for the gate ----------------------------------------------------------------------

    def snapshot(self) -> builtins.list[AgentRecord]:
        """Every agent with its token hash and granted credential ids, read in one consistent pass.

        Only rows whose MAC holds: an agent or grant edited outside aegisd is left out (and logged), so
        the gate refuses it rather than trusting it. Needs the vault unlocked.
        """
        records, bad_agents, bad_grants = self._authenticated()
        for agent, credential in bad_grants:
            log.error("the grant of %r to agent %r fails authentication (changed outside aegisd), so the gate "
                      "ignores it: grant it again if it is meant", credential, agent)
        for _, name in bad_agents:
            log.error("agent %r fails authentication (its row was changed outside aegisd), so the gate refuses "
                      "its token: remove it and add it again", name)
        return records

    def unauthentic(self) -> builtins.list[str]:
        """The agents, and grants (`agent->credential`), whose rows fail their MAC; for doctor. Rows with no
        MAC at all, an older aegisd's, are Vault.older_rows."""
        _, bad_agents, bad_grants = self._authenticated()
        return ([f"{name} ({agent_id})" for agent_id, name in bad_agents]
                + [f"{agent}->{credential}" for agent, credential in bad_grants])

    def _authenticated(self) -> tuple[builtins.list[AgentRecord], builtins.list[tuple[str, str]],
                                      builtins.list[tuple[str, str]]]:
        """One pass over the agent and grant rows: the authentic agents with their authentic grants, then the
        agents (id, name) and grants (agent, credential) whose MAC fails, by name. A row with no MAC at all
        (an older aegisd's, waiting for `vault adopt`) is in none of them.

        Rows whose MAC held in the last pass under the same master key are not checked again (an edited row
        is a different row), so a change at 1,000 agents and grants costs milliseconds, not a full check.
        """
        master = self._vault.master()
        key, known = self._record_key(master), self._verified_under(master)
        verified: set[tuple[object, ...]] = set()
        with self._store.reading() as conn:
            rows = conn.execute("SELECT id, name, token_hash, rate_limit, mac FROM agents ORDER BY name").fetchall()
            grant_rows = conn.execute(_GRANTS_NAMED + " ORDER BY 4, 5").fetchall()
        grants: dict[str, set[str]] = {}
        bad_grants = []
        for agent_id, cred_id, mac, agent, credential in grant_rows:
            if _grant_holds(key, known, agent_id, cred_id, mac):
                verified.add(("grant", agent_id, cred_id, mac))
                grants.setdefault(agent_id, set()).add(cred_id)
            elif mac is not None:
                bad_grants.append((agent, credential))
        records, bad_agents = [], []
        for agent_id, name, hashed, rate, mac in rows:
            if _agent_holds(key, known, agent_id, name, hashed, rate, mac):
                verified.add(("agent", agent_id, name, hashed, rate, mac))
                records.append(AgentRecord(id=agent_id, name=name, token_hash=hashed, rate_limit=rate,
                                           credential_ids=frozenset(grants.get(agent_id, ())), mac=mac))
            elif mac is not None:
                bad_agents.append((agent_id, name))
        self._verified = (master, frozenset(verified))
        return records, bad_agents, bad_grants

    # -- internals -------------------------------------------------------------------------

    def _require_initialized(self) -> None:
        if self._vault.vault_id is None:
            raise VaultUninitialized()

    def _record_key(self, master: MasterKey | None = None) -> RecordKey:
        """The MAC key for agent and grant rows (under `master`, else the vault's); raises VaultLocked or
        VaultUninitialized."""
        if master is None:
            master = self._vault.master()
        assert self._vault.vault_id is not None  # master() raises before this on an uninitialised vault
        return RecordKey(master, self._vault.vault_id)

    def _authentic_credential(self, conn: sqlite3.Connection, name: str) -> str:
        """A credential's id, by name, only if it opens: its name is sealed with it, so a name moved onto
        another row (to aim a grant or revoke at it) is refused."""
        vault_id = self._vault.vault_id
        assert vault_id is not None
        return open_sealed(conn, vault_id, self._vault.master(), "name", name)[0].id

    def _authentic_agent(self, conn: sqlite3.Connection, key: RecordKey, name: str) -> tuple[str, bytes, str]:
        """An agent's id, token hash and rate limit, by name, if its row's MAC holds.

        A change built on a row edited outside aegisd would give the edit a fresh MAC (a token hash moved
        into this row, an id swapped with another agent's), so it is refused instead.
        """
        row = conn.execute("SELECT id, token_hash, rate_limit, mac FROM agents WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise _agent_not_found(name)
        agent_id, hashed, rate, mac = row
        if not key.agent_ok(mac, agent_id, name, hashed, rate):
            if mac is None:
                raise StorageCorrupt(f"agent {name!r} ({agent_id}) comes from an older aegisd and is not trusted "
                                     "yet: check `aegisctl vault adopt`, or remove the row by its id",
                                     reason="not_adopted")
            raise StorageCorrupt(f"agent {name!r} fails authentication: its row was changed outside aegisd; remove "
                                 f"the row (`aegisctl agent remove --id {agent_id}`) and add the agent again",
                                 reason="tampered")
        return str(agent_id), bytes(hashed), str(rate)

def _agent_not_found(name: str) -> NotFound:
    return NotFound(f"no agent named {name!r}", reason="agent_not_found")


def _agent_holds(key: RecordKey, known: frozenset[tuple[object, ...]], agent_id: object, name: object,
                 token_hash: object, rate_limit: object, mac: object) -> bool:
    """Whether an agent row's MAC holds: verified before under this key (the same row exactly), or now."""
    return (("agent", agent_id, name, token_hash, rate_limit, mac) in known
            or key.agent_ok(mac, agent_id, name, token_hash, rate_limit))


def _grant_holds(key: RecordKey, known: frozenset[tuple[object, ...]], agent_id: object, credential_id: object,
                 mac: object) -> bool:
    """Whether a grant row's MAC holds, as _agent_holds."""
    return ("grant", agent_id, credential_id, mac) in known or key.grant_ok(mac, agent_id, credential_id)


def _grants(conn: sqlite3.Connection, agent_id: str | None) -> dict[str, list[tuple[str, str, object]]]:
    """(credential id, credential name as stored, grant MAC) per agent id (one agent, or all when agent_id
    is None), sorted by name: every grant row, authentic or not. A name that is not text (a BLOB put in
    vault.db) is shown as its str(), as the credential listing shows it, so one such row fails no listing."""
    query = ("SELECT g.agent_id, g.credential_id, c.name, g.mac FROM grants g "
             "JOIN credentials c ON c.id = g.credential_id")
    params: tuple[str, ...] = ()
    if agent_id is not None:
        query += " WHERE g.agent_id = ?"
        params = (agent_id,)
    result: dict[str, list[tuple[str, str, object]]] = {}
    for owner, cred_id, cred_name, mac in conn.execute(query + " ORDER BY c.name", params):
        result.setdefault(owner, []).append((cred_id, str(cred_name), mac))
    return result


def _agent_from_row(row: tuple[Any, ...], credentials: list[str]) -> Agent:
    """An agent row for display. The times are not covered by the row's MAC, so a value aegisd could not have
    written (edited in vault.db) shows as 0 rather than failing the whole listing; the other fields are."""
    return Agent(id=str(row[0]), name=str(row[1]), rate_limit=str(row[2]),
                 created_at=row[3] if is_time(row[3]) else 0, rotated_at=row[4] if is_time(row[4]) else 0,
                 credentials=list(credentials))
