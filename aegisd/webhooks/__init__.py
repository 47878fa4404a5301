"""Webhooks: signed JSON alerts to operator-chosen URLs when the gate blocks something.

`Webhooks` ties the registry (sealed in the vault), the delivery queue and the expiry watch
to the vault's life: subscriptions are unsealed at unlock and forgotten at lock, like every
other key the daemon holds, so nothing is delivered while the vault is locked.
"""

from __future__ import annotations

import logging
import threading

from aegisd.config import Config
from aegisd.errors import AegisError
from aegisd.store import VaultStore
from aegisd.vault.vault import Vault
from aegisd.webhooks.dispatcher import Attempt, Delivery, Dispatcher, signature
from aegisd.webhooks.events import EVENTS, TEST_EVENT, events_for
from aegisd.webhooks.expiry import ExpiryWatch, expiry_state
from aegisd.webhooks.registry import Target, Webhook, WebhookRegistry

log = logging.getLogger("aegisd.webhooks")

__all__ = ["EVENTS", "TEST_EVENT", "Attempt", "Delivery", "Dispatcher", "ExpiryWatch", "Target", "Webhook",
           "WebhookRegistry", "Webhooks", "events_for", "expiry_state", "signature"]


class Webhooks:
    """The daemon's webhook machinery; `start` and `close` from its event loop."""

    def __init__(self, config: Config, store: VaultStore, vault: Vault) -> None:
        self.registry = WebhookRegistry(store, vault, gate=(config.gate_host, config.gate_port))
        self.dispatcher = Dispatcher(config)
        self.expiry = ExpiryWatch(vault, self.dispatcher)
        self._vault = vault
        # One reload at a time, read and swap together: two reloads on different threads (an add and a remove)
        # could otherwise swap in out of order, and the one that read the rows first would bring back what the
        # other removed.
        self._reloading = threading.Lock()
        vault.add_listener(self.on_vault_event)

    def start(self) -> None:
        self.dispatcher.start()
        self.expiry.start()

    async def close(self) -> None:
        await self.expiry.close()
        await self.dispatcher.close()

    def reload(self) -> None:
        """Re-read the subscriptions (after add or remove, or at unlock). Blocks: call from a thread."""
        with self._reloading:
            self._reload()

    def _reload(self) -> None:
        if self._vault.state != "unlocked":
            self.dispatcher.set_targets(())
            return
        try:
            self.dispatcher.set_targets(self.registry.targets())
        except AegisError as exc:
            log.error("webhooks not loaded: %s", exc.message)
            return
        if self._vault.state != "unlocked":  # locked while we were reading: forget them again
            self.dispatcher.set_targets(())
            return
        self.expiry.check_soon()

    def on_vault_event(self, event: str) -> None:
        if event in ("locked", "unlocked"):  # by the vault's state, not the event: a late "locked" changes nothing
            self.reload()
        elif event == "credentials":
            self.expiry.check_soon()
