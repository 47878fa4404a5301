"""MACs over the agent and grant rows, so who may use which credential cannot be edited in vault.db.

An agent row's MAC covers its id, name, token hash and rate limit: a token hash moved to another
agent's row, or a limit lifted, fails it. A grant row's MAC covers the agent and credential it joins:
a grant inserted or copied to another agent fails it. Both are keyed with a subkey of the master key,
so only aegisd, unlocked, can write a row the gate will trust. Rows from an older aegisd (no MAC) are
not served until an operator adopts them (aegisd.vault.adoption).
"""

from __future__ import annotations

import hmac
import json

from aegisd.vault.crypto import MasterKey, keyed_hasher

SUBKEY = "agent-records"


class RecordKey:
    """The MAC function for one vault, keyed once per routing-table build rather than once per row."""

    def __init__(self, master: MasterKey, vault_id: str) -> None:
        self._digest = keyed_hasher(master.subkey(SUBKEY))
        self._vault_id = vault_id

    def agent(self, agent_id: str, name: str, token_hash: bytes, rate_limit: str) -> bytes:
        return self._mac(["agent", agent_id, name, token_hash.hex(), rate_limit])

    def grant(self, agent_id: str, credential_id: str) -> bytes:
        return self._mac(["grant", agent_id, credential_id])

    def agent_ok(self, mac: object, agent_id: object, name: object, token_hash: object, rate_limit: object) -> bool:
        """Whether an agent row's MAC holds; a value of the wrong type (an edit) never does."""
        return (isinstance(mac, bytes) and isinstance(token_hash, bytes)
                and isinstance(agent_id, str) and isinstance(name, str) and isinstance(rate_limit, str)
                and hmac.compare_digest(mac, self.agent(agent_id, name, token_hash, rate_limit)))

    def grant_ok(self, mac: object, agent_id: object, credential_id: object) -> bool:
        return (isinstance(mac, bytes) and isinstance(agent_id, str) and isinstance(credential_id, str)
                and hmac.compare_digest(mac, self.grant(agent_id, credential_id)))

    def _mac(self, fields: list[str]) -> bytes:
        return self._digest(json.dumps([self._vault_id, *fields], separators=(",", ":"), ensure_ascii=True).encode())

