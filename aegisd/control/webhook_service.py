"""aegis.v1.WebhookService: register, list, remove and test webhooks. A signing secret leaves only in Add."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from aegisd.api.aegis.v1 import webhooks_pb2 as pb
from aegisd.api.aegis.v1 import webhooks_pb2_grpc
from aegisd.api.aegis.v1.credentials_pb2 import INTEGRITY_UNSPECIFIED
from aegisd.cancellation import outlive_cancellation
from aegisd.control.convert import INTEGRITY_TO_PB, timestamp
from aegisd.control.errors import rpc
from aegisd.errors import StorageUnavailable
from aegisd.runtime import Runtime
from aegisd.vault.credentials import check_lookup
from aegisd.webhooks import Webhook, Webhooks

Ctx = grpc.aio.ServicerContext[Any, Any]


def webhook_to_pb(webhook: Webhook) -> pb.Webhook:
    """The API view of a webhook: its origin only, never the URL's path or the signing secret; its integrity
    unspecified where nothing was checked (a removed row)."""
    return pb.Webhook(id=webhook.id, origin=webhook.origin, events=list(webhook.events),
                      created_at=timestamp(webhook.created_at),
                      integrity=INTEGRITY_TO_PB.get(webhook.integrity, INTEGRITY_UNSPECIFIED))


class WebhookService(webhooks_pb2_grpc.WebhookServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    def _hooks(self) -> Webhooks:
        if self.rt.webhooks is None:
            raise StorageUnavailable("webhooks are not running yet; retry in a moment")
        return self.rt.webhooks

    @rpc
    async def AddWebhook(self, request: pb.AddWebhookRequest, context: Ctx) -> pb.AddWebhookResponse:
        hooks = self._hooks()
        for name in request.events:  # an unknown event is refused naming it: not one of any length
            check_lookup(name, "webhook event")
        await asyncio.to_thread(hooks.registry.refuse_gate_names, request.url)  # cut off here: nothing stored
        # Stored, loaded and logged together even if the client goes away meanwhile: a webhook stored but never
        # loaded would raise no alert until the next unlock, and one never logged would be there unseen.
        webhook, secret = await outlive_cancellation(self._add(hooks, request.url, list(request.events)))
        return pb.AddWebhookResponse(webhook=webhook_to_pb(webhook), secret=secret)

    async def _add(self, hooks: Webhooks, url: str, events: list[str]) -> tuple[Webhook, str]:
        webhook, secret = await asyncio.to_thread(hooks.registry.add, url, events)
        await asyncio.to_thread(hooks.reload)
        self.rt.log_event("webhook added", webhook=webhook.id, origin=webhook.origin, events=",".join(webhook.events))
        return webhook, secret

    @rpc
    async def ListWebhooks(self, request: pb.ListWebhooksRequest, context: Ctx) -> pb.ListWebhooksResponse:
        webhooks = await asyncio.to_thread(self._hooks().registry.list)
        return pb.ListWebhooksResponse(webhooks=[webhook_to_pb(w) for w in webhooks])

    @rpc
    async def RemoveWebhook(self, request: pb.RemoveWebhookRequest, context: Ctx) -> pb.RemoveWebhookResponse:
        hooks = self._hooks()
        webhook = await outlive_cancellation(self._remove(hooks, check_lookup(request.id, "webhook id")))
        return pb.RemoveWebhookResponse(webhook=webhook_to_pb(webhook))

    async def _remove(self, hooks: Webhooks, webhook_id: str) -> Webhook:
        webhook = await asyncio.to_thread(hooks.registry.remove, webhook_id)
        await asyncio.to_thread(hooks.reload)  # removed but still loaded, it would go on sending until an unlock
        self.rt.log_event("webhook removed", webhook=webhook.id)
        return webhook

    @rpc
    async def TestWebhook(self, request: pb.TestWebhookRequest, context: Ctx) -> pb.TestWebhookResponse:
        hooks = self._hooks()
        target = await asyncio.to_thread(hooks.registry.target, check_lookup(request.id, "webhook id"))
        delivery, attempt = await hooks.dispatcher.test(target)
        self.rt.log_event("webhook tested", webhook=target.id, delivery=delivery.id, status=attempt.status,
                          error=attempt.error or "-")
        return pb.TestWebhookResponse(delivered=attempt.delivered, status=attempt.status, error=attempt.error,
                                      delivery_id=delivery.id, duration_ms=attempt.duration_ms)
