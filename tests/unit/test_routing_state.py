"""The gate's routing table against vault events, in-process on a real vault database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from aegisd.agents import AgentRegistry
from aegisd.gate.routing import RoutingState
from aegisd.store import VaultStore
from aegisd.vault.credentials import Credential
from aegisd.vault.vault import Vault
from tests.harness import PASSPHRASE


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[Vault]:
    store = VaultStore(tmp_path / "vault.db")
    store.open()
    v = Vault(store)
    v.init(PASSPHRASE, False)
    v.add_credential(Credential(id="", name="github", service="github", domains=["api.github.com"]),
                     "secret-github-0123456789")
    yield v
    store.close()


def test_a_lock_overtaken_by_an_unlock_leaves_the_unlocked_table(vault: Vault) -> None:
    """Events reach the table after the vault's lock is released, so a quick lock and unlock can deliver
    "locked" after "unlocked" has built: the vault is unlocked, and its table must stay."""
    routing = RoutingState(vault, AgentRegistry(vault._store, vault))
    vault.lock()
    vault.unlock(passphrase=PASSPHRASE)
    routing.on_vault_event("unlocked")
    routing.on_vault_event("locked")  # the lock's event, late
    assert routing.table is not None and list(routing.table.routes) == ["github"]
    vault.lock()
    routing.on_vault_event("locked")
    assert routing.table is None
