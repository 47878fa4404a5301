"""What the vault's listeners and updates do with states that arrive late or rows stored long ago,
in-process on a real vault database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from aegisd.config import load_config
from aegisd.errors import InvalidArgument
from aegisd.store import VaultStore
from aegisd.vault.credentials import Credential
from aegisd.vault.sealing import seal_secret
from aegisd.vault.vault import Vault
from aegisd.webhooks import Webhooks


def test_a_late_locked_event_keeps_the_webhooks_of_an_unlocked_vault(tmp_path: Path, store: VaultStore,
                                                                      vault: Vault) -> None:
    """A lock's event can arrive after a concurrent unlock's: the webhooks follow the vault's state, not the
    event, so alerts do not stop until the next change."""
    webhooks = Webhooks(load_config({}, env={"AEGIS_DATA_DIR": str(tmp_path)}), store, vault)
    webhooks.registry.add("https://hooks.example/a", ["blocked_request"])
    webhooks.on_vault_event("unlocked")
    assert webhooks.dispatcher.wants("blocked_request")
    webhooks.on_vault_event("locked")  # late: the vault is unlocked
    assert webhooks.dispatcher.wants("blocked_request")
    vault.lock()
    webhooks.on_vault_event("locked")
    assert not webhooks.dispatcher.wants("blocked_request")


def test_a_secret_stored_before_todays_rules_does_not_block_other_updates(store: VaultStore, vault: Vault) -> None:
    """Secrets with edge whitespace are refused now, but one stored earlier must not keep its credential from
    being narrowed; only a change to basic auth checks the secret (user:password)."""
    cred = vault.add_credential(Credential(id="", name="old", service="old", domains=["api.old.example"]),
                                "sk-stored-long-ago-0123")
    nonce, ciphertext = seal_secret(vault.master().subkey("secrets"), vault.vault_id or "", cred,
                                    b"sk-stored-long-ago-0123 ")  # as an older aegisd took it, trailing space
    conn = sqlite3.connect(store.path)
    with conn:
        conn.execute("UPDATE credentials SET nonce = ?, ciphertext = ? WHERE id = ?", (nonce, ciphertext, cred.id))
    conn.close()
    assert vault.update_credential("old", {"scopes": ["read"]})[0].scopes == ["read"]
    with pytest.raises(InvalidArgument, match="does not suit auth type 'basic'"):
        vault.update_credential("old", {"auth_type": "basic"})
