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


def test_a_credential_change_derives_search_forms_for_the_changed_secret_only(vault: Vault,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Each change rebuilt the inspector and derived every secret's search forms again (a third of a change's
    cost at 1,000 credentials: ~95 of 290 ms). The new inspector takes the unchanged ones from the old; a
    secret added, or one rotated, is derived, and what the inspector finds is the same."""
    from aegisd.inspection import inspector as inspector_module
    from aegisd.inspection.secret_forms import search_forms

    routing = RoutingState(vault, AgentRegistry(vault._store, vault))
    vault.add_listener(routing.on_vault_event)
    routing.rebuild()
    derived: list[object] = []

    def counted(values: list[bytes]) -> set[bytes]:
        derived.append(values)
        return search_forms(values)

    monkeypatch.setattr(inspector_module, "search_forms", counted)
    vault.add_credential(Credential(id="", name="slack", service="slack", domains=["slack.com"]),
                         "secret-slack-9876543210")
    assert len(derived) == 1
    vault.rotate_credential("github", "secret-github-rotated-000111")
    assert len(derived) == 2
    table = routing.table
    assert table is not None
    found = table.inspector.scan(b"x secret-slack-9876543210 y secret-github-rotated-000111")
    assert found and table.inspector.scan(b"secret-github-0123456789") == set()  # the old secret no longer
