"""Agents and grants: who may call the gate, and which credentials each may use.

An agent's token is shown once and stored only as a keyed hash under a subkey of the vault's
master key, so a stolen database cannot be used to check guessed tokens and every change that
touches a hash needs the vault unlocked. Granting twice is idempotent (it reports that nothing
changed); revoking a grant that does not exist is NotFound (`grant_not_found`), because that
usually means a typo. Every change notifies the vault's listeners with "agents" so the gate's
in-memory table rebuilds from here.
"""

from __future__ import annotations

import base64
import builtins
import secrets
import sqlite3
import uuid
from dataclasses import dataclass, field
from typing import NamedTuple

from aegisd.errors import AlreadyExists, NotFound, VaultUninitialized
from aegisd.store import VaultStore
from aegisd.vault.credentials import validate_name, validate_rate
from aegisd.vault.crypto import MasterKey, keyed_hash
from aegisd.vault.vault import Vault, now_ms

TOKEN_PREFIX = "aegis_"  # noqa: S105 - a marker, not a secret
TOKEN_BYTES = 32
TOKEN_SUBKEY = "agent-tokens"  # noqa: S105 - HKDF purpose label
_AGENT_COLUMNS = "id, name, rate_limit, created_at, rotated_at"


@dataclass
class Agent:
    """An agent as the control API shows it: never its token or the token's hash."""

    id: str
    name: str
    created_at: int
    rotated_at: int
    rate_limit: str = ""
    credentials: list[str] = field(default_factory=list)  # granted credential names, sorted


class AgentRecord(NamedTuple):
    """One row of the gate's in-memory agent table: enough to authenticate and authorise."""

    id: str
    name: str
    token_hash: bytes
    rate_limit: str
    credential_ids: frozenset[str]


def new_token() -> str:
    """256 random bits, printable, with the prefix the gate recognises in `Authorization: Bearer`."""
    return TOKEN_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(TOKEN_BYTES)).decode().rstrip("=")


def token_hash(master: MasterKey, token: str) -> bytes:
    """The stored form of a token; the gate hashes a presented token the same way and looks it up."""
    return keyed_hash(master.subkey(TOKEN_SUBKEY), token)


class AgentRegistry:
    """Agent identities and grants in the vault database. Methods block; call from worker threads."""

    def __init__(self, store: VaultStore, vault: Vault) -> None:
        self._store = store
        self._vault = vault

    # -- agents ----------------------------------------------------------------------------

    def add(self, name: str) -> tuple[Agent, str]:
        """Create an agent; returns it and its token, which exists nowhere else afterwards."""
        validate_name(name, "agent name")
        token = new_token()
        with self._vault._lock:  # hold off a concurrent lock() from wiping the key mid-hash
            hashed = token_hash(self._vault.master(), token)
            now = now_ms()
            agent = Agent(id=uuid.uuid4().hex, name=name, created_at=now, rotated_at=now)
            with self._store.transaction() as conn:
                if conn.execute("SELECT 1 FROM agents WHERE name = ?", (name,)).fetchone():
                    raise AlreadyExists(f"there is already an agent named {name!r}", reason="agent_exists")
                conn.execute("INSERT INTO agents (id, name, token_hash, rate_limit, created_at, rotated_at) "
                             "VALUES (?,?,?,?,?,?)", (agent.id, name, hashed, "", now, now))
        self._vault.notify("agents")
        return agent, token

    def list(self) -> list[Agent]:
        self._require_initialized()
        with self._store.reading() as conn:
            rows = conn.execute(f"SELECT {_AGENT_COLUMNS} FROM agents ORDER BY name").fetchall()  # noqa: S608
            granted = _granted_names(conn, None)
        return [_agent_from_row(r, granted.get(r[0], [])) for r in rows]

    def get(self, name: str) -> Agent:
        self._require_initialized()
        with self._store.reading() as conn:
            return self._get(conn, name)

    def remove(self, name: str) -> int:
        """Delete the agent and its grants; returns how many grants went with it."""
        with self._vault._lock:
            self._vault.master()
            with self._store.transaction() as conn:
                agent_id = self._agent_id(conn, name)
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
            self._vault.master()
            with self._store.transaction() as conn:
                agent_id = self._agent_id(conn, name)
                conn.execute("UPDATE agents SET rate_limit = ? WHERE id = ?", (canonical, agent_id))
                agent = self._get(conn, name)
        self._vault.notify("agents")
        return agent

    def regenerate(self, name: str) -> str:
        """Issue a new token; the old hash is replaced in the same write, so the old token dies at once."""
        token = new_token()
        with self._vault._lock:
            hashed = token_hash(self._vault.master(), token)
            with self._store.transaction() as conn:
                agent_id = self._agent_id(conn, name)
                conn.execute("UPDATE agents SET token_hash = ?, rotated_at = ? WHERE id = ?",
                             (hashed, now_ms(), agent_id))
        self._vault.notify("agents")
        return token

    # -- grants ----------------------------------------------------------------------------

    def grant(self, agent: str, credential: str) -> bool:
        """Let `agent` use `credential`; returns False if it already could (idempotent)."""
        with self._vault._lock:
            self._vault.master()
            with self._store.transaction() as conn:
                agent_id = self._agent_id(conn, agent)
                cred_id = _credential_id(conn, credential)
                created = conn.execute("INSERT OR IGNORE INTO grants (agent_id, credential_id, created_at) "
                                       "VALUES (?,?,?)", (agent_id, cred_id, now_ms())).rowcount == 1
        if created:
            self._vault.notify("agents")
        return created

    def revoke(self, agent: str, credential: str) -> None:
        """Take a grant away; NotFound if the agent, the credential or the grant does not exist."""
        with self._vault._lock:
            self._vault.master()
            with self._store.transaction() as conn:
                agent_id = self._agent_id(conn, agent)
                cred_id = _credential_id(conn, credential)
                deleted = conn.execute("DELETE FROM grants WHERE agent_id = ? AND credential_id = ?",
                                       (agent_id, cred_id)).rowcount
                if not deleted:
                    raise NotFound(f"agent {agent!r} has no grant of credential {credential!r}",
                                   reason="grant_not_found")
        self._vault.notify("agents")

    # -- for the gate ----------------------------------------------------------------------

    def snapshot(self) -> builtins.list[AgentRecord]:
        """Every agent with its token hash and granted credential ids, read in one consistent pass."""
        with self._store.reading() as conn:
            rows = conn.execute("SELECT id, name, token_hash, rate_limit FROM agents").fetchall()
            grants: dict[str, set[str]] = {}
            for agent_id, cred_id in conn.execute("SELECT agent_id, credential_id FROM grants"):
                grants.setdefault(agent_id, set()).add(cred_id)
        return [AgentRecord(id=r[0], name=r[1], token_hash=bytes(r[2]), rate_limit=r[3],
                            credential_ids=frozenset(grants.get(r[0], ()))) for r in rows]

    # -- internals -------------------------------------------------------------------------

    def _require_initialized(self) -> None:
        if self._vault.vault_id is None:
            raise VaultUninitialized()

    def _get(self, conn: sqlite3.Connection, name: str) -> Agent:
        row = conn.execute(f"SELECT {_AGENT_COLUMNS} FROM agents WHERE name = ?", (name,)).fetchone()  # noqa: S608
        if row is None:
            raise _agent_not_found(name)
        return _agent_from_row(row, _granted_names(conn, row[0]).get(row[0], []))

    def _agent_id(self, conn: sqlite3.Connection, name: str) -> str:
        row = conn.execute("SELECT id FROM agents WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise _agent_not_found(name)
        return str(row[0])


def _agent_not_found(name: str) -> NotFound:
    return NotFound(f"no agent named {name!r}", reason="agent_not_found")


def _credential_id(conn: sqlite3.Connection, name: str) -> str:
    row = conn.execute("SELECT id FROM credentials WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise NotFound(f"no credential named {name!r}", reason="credential_not_found")
    return str(row[0])


def _granted_names(conn: sqlite3.Connection, agent_id: str | None) -> dict[str, list[str]]:
    """Granted credential names per agent id (one agent, or all when agent_id is None), sorted."""
    query = "SELECT g.agent_id, c.name FROM grants g JOIN credentials c ON c.id = g.credential_id"
    params: tuple[str, ...] = ()
    if agent_id is not None:
        query += " WHERE g.agent_id = ?"
        params = (agent_id,)
    result: dict[str, list[str]] = {}
    for owner, cred_name in conn.execute(query + " ORDER BY c.name", params):
        result.setdefault(owner, []).append(cred_name)
    return result


def _agent_from_row(row: tuple[str, str, str, int, int], credentials: list[str]) -> Agent:
    return Agent(id=row[0], name=row[1], rate_limit=row[2], created_at=row[3], rotated_at=row[4],
                 credentials=list(credentials))
