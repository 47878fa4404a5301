"""AgentRegistry on a real vault database: tokens, hashes, grants and cascades, without a daemon."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from aegisd.agents import TOKEN_PREFIX, AgentRecord, AgentRegistry, new_token, token_hash
from aegisd.errors import AlreadyExists, InvalidArgument, NotFound, VaultLocked, VaultUninitialized
from aegisd.store import VaultStore
from aegisd.vault.credentials import Credential
from aegisd.vault.vault import Vault
from tests.harness import PASSPHRASE


@pytest.fixture
def events(vault: Vault) -> list[str]:
    heard: list[str] = []
    vault.add_listener(heard.append)
    return heard


@pytest.fixture
def registry(store: VaultStore, vault: Vault) -> AgentRegistry:
    return AgentRegistry(store, vault)


def add_credential(vault: Vault, name: str) -> str:
    cred = vault.add_credential(Credential(id="", name=name, service=name, domains=[f"api.{name}.com"]),
                                f"secret-{name}-0123456789")
    return cred.id


def record(registry: AgentRegistry, name: str) -> AgentRecord:
    return next(r for r in registry.snapshot() if r.name == name)


def test_token_shape() -> None:
    token = new_token()
    assert token.startswith(TOKEN_PREFIX)
    body = token[len(TOKEN_PREFIX):]
    assert len(base64.urlsafe_b64decode(body + "=")) == 32
    assert new_token() != token


def test_add_stores_only_a_keyed_hash(registry: AgentRegistry, vault: Vault, store: VaultStore,
                                      events: list[str]) -> None:
    agent, token = registry.add("claude")
    assert agent.name == "claude" and agent.credentials == [] and agent.created_at == agent.rotated_at
    rec = record(registry, "claude")
    assert rec.token_hash == token_hash(vault.master(), token)
    assert rec.token_hash != token.encode() and len(rec.token_hash) == 32
    assert token.encode() not in store.path.read_bytes()
    assert events == ["agents"]


def test_hash_is_keyed_per_vault(tmp_path: Path, vault: Vault) -> None:
    other_store = VaultStore(tmp_path / "other.db")
    other_store.open()
    other = Vault(other_store)
    other.init(PASSPHRASE, False)
    assert token_hash(vault.master(), "aegis_x") != token_hash(other.master(), "aegis_x")
    other_store.close()


def test_names_are_validated_and_unique(registry: AgentRegistry) -> None:
    registry.add("bot-1")
    with pytest.raises(AlreadyExists) as exc:
        registry.add("bot-1")
    assert exc.value.reason == "agent_exists"
    for bad in ("", "Bot", "-x", "a b", "x" * 65):
        with pytest.raises(InvalidArgument, match="agent name"):
            registry.add(bad)


def test_regenerate_replaces_the_hash(registry: AgentRegistry, vault: Vault, events: list[str]) -> None:
    _, old = registry.add("claude")
    shown, new = registry.regenerate("claude")
    assert new != old and shown == registry.get("claude")
    hashes = {r.token_hash for r in registry.snapshot()}
    assert token_hash(vault.master(), new) in hashes
    assert token_hash(vault.master(), old) not in hashes
    assert registry.get("claude").rotated_at >= registry.get("claude").created_at
    assert events == ["agents", "agents"]


def test_grant_revoke(registry: AgentRegistry, vault: Vault, events: list[str]) -> None:
    gh = add_credential(vault, "github")
    registry.add("claude")
    events.clear()
    assert registry.grant("claude", "github") is True
    assert registry.grant("claude", "github") is False  # idempotent, and no event for a no-op
    assert events == ["agents"]
    assert registry.get("claude").credentials == ["github"]
    assert record(registry, "claude").credential_ids == frozenset({gh})
    registry.revoke("claude", "github")
    assert record(registry, "claude").credential_ids == frozenset()
    with pytest.raises(NotFound) as exc:
        registry.revoke("claude", "github")
    assert exc.value.reason == "grant_not_found"


@pytest.mark.parametrize(("agent", "credential", "reason"), [
    ("ghost", "github", "agent_not_found"),
    ("claude", "nope", "credential_not_found"),
])
def test_unknown_names(registry: AgentRegistry, vault: Vault, agent: str, credential: str, reason: str) -> None:
    add_credential(vault, "github")
    registry.add("claude")
    for call in (registry.grant, registry.revoke):
        with pytest.raises(NotFound) as exc:
            call(agent, credential)
        assert exc.value.reason == reason
    if agent == "ghost":
        for one in (registry.get, registry.remove, registry.regenerate):
            with pytest.raises(NotFound) as exc:
                one(agent)
            assert exc.value.reason == "agent_not_found"


def test_remove_cascades(registry: AgentRegistry, vault: Vault) -> None:
    add_credential(vault, "github")
    add_credential(vault, "openai")
    registry.add("claude")
    registry.add("cursor")
    for cred in ("github", "openai"):
        registry.grant("claude", cred)
    registry.grant("cursor", "github")
    assert registry.remove("claude") == 2
    assert vault.counts()["grants"] == 1
    assert [a.name for a in registry.list()] == ["cursor"]
    assert vault.remove_credential("github") == 1
    assert registry.get("cursor").credentials == []
    assert vault.counts()["grants"] == 0


def test_locked_vault(registry: AgentRegistry, vault: Vault) -> None:
    add_credential(vault, "github")
    registry.add("claude")
    registry.grant("claude", "github")
    vault.lock()
    for call, args in ((registry.add, ("other",)), (registry.regenerate, ("claude",)),
                       (registry.remove, ("claude",)), (registry.grant, ("claude", "github")),
                       (registry.revoke, ("claude", "github"))):
        with pytest.raises(VaultLocked):
            call(*args)
    # Reading names and grants needs no key, like `vault list`; the gate's snapshot checks each row's MAC.
    assert [a.credentials for a in registry.list()] == [["github"]]
    with pytest.raises(VaultLocked):
        registry.snapshot()


def test_a_wiped_master_key_derives_nothing(registry: AgentRegistry, vault: Vault) -> None:
    """A pass that took the master key just before a lock must not go on with keys derived from its zeroed
    bytes, which anyone can compute: deriving after the wipe is VaultLocked."""
    registry.add("claude")
    master = vault.master()
    vault.lock()
    with pytest.raises(VaultLocked):
        master.subkey("agent-records")
    with pytest.raises(VaultLocked):
        master.subkey("a-purpose-never-derived-before")


def test_showing_an_unknown_agent_reads_no_grants(registry: AgentRegistry, vault: Vault) -> None:
    """NotFound comes before any grant or credential is read, however large the vault."""
    for i in range(3):
        add_credential(vault, f"c{i}")
        registry.add(f"a{i}")
        registry.grant(f"a{i}", f"c{i}")
    with pytest.raises(NotFound):
        registry.get("nobody")
    shown = registry.get("a1")
    assert (shown.integrity, shown.credentials, shown.ignored_grants) == ("ok", ["c1"], [])


def test_uninitialized(store: VaultStore) -> None:
    registry = AgentRegistry(store, Vault(store))
    with pytest.raises(VaultUninitialized):
        registry.list()
    with pytest.raises(VaultUninitialized):
        registry.add("claude")
    with pytest.raises(VaultUninitialized):
        registry.snapshot()


def test_set_rate_limit_answers_with_what_it_wrote(registry: AgentRegistry, vault: Vault) -> None:
    """The answer is read under the write's lock: a removal that lands as soon as the change is announced
    (here, from the announcement itself) must not turn a committed change's answer into NotFound."""
    registry.add("claude")
    removals: list[str] = []

    def remove_once(event: str) -> None:
        if not removals:
            removals.append(event)
            registry.remove("claude")
    vault.add_listener(remove_once)
    agent = registry.set_rate_limit("claude", "5/min")
    assert (agent.name, agent.rate_limit, removals) == ("claude", "5/min", ["agents"])
    with pytest.raises(NotFound):
        registry.get("claude")


def test_a_time_edited_in_vault_db_does_not_break_listings(registry: AgentRegistry, vault: Vault,
                                                           store: VaultStore) -> None:
    """An agent's times are not covered by its MAC: an impossible value shows as 0 and the agent stays ok,
    and every other agent is still listed, shown and regenerated."""
    registry.add("claude")
    registry.add("cursor")
    with store.transaction() as conn:
        conn.execute("UPDATE agents SET created_at = 'abc', rotated_at = 1e30 WHERE name = 'claude'")
    listed = {a.name: a for a in registry.list()}
    assert (listed["claude"].created_at, listed["claude"].rotated_at, listed["claude"].integrity) == (0, 0, "ok")
    assert listed["cursor"].created_at > 0
    agent, token = registry.regenerate("claude")
    assert agent.rotated_at > 0 and agent.created_at == 0 and token
