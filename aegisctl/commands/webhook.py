"""`aegisctl webhook add|list|remove|test`: signed alerts to a URL when the gate blocks something.

The signing secret is printed once, when the webhook is added; in human mode it is the only
thing on stdout, so `SECRET=$(aegisctl webhook add URL --events ...)` captures it. A URL that
embeds a secret of its own (Slack, Discord) can come from stdin instead of the command line.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from aegisctl import integrity, output
from aegisctl.client import HINTS, ClientError
from aegisctl.context import Context, pass_context
from aegisctl.secrets_input import confirm_destructive, stdin_line
from aegisctl.shown_once import print_once
from aegisd.api.aegis.v1 import webhooks_pb2 as pb

EVENT_NAMES = ("blocked_request", "rate_limited", "agent_auth_failure", "body_inspection", "credential_expiry",
               "response_redacted")
# aegisd's limit (MAX_URL_LENGTH in aegisd/webhooks/registry.py; aegisctl imports only the API from aegisd)
MAX_URL_LENGTH = 2048
ONCE_WARNING = ("aegisctl: this signing secret is not shown again; give it to the receiver now "
                "(it verifies X-Aegis-Signature).")


def webhook_json(w: pb.Webhook) -> dict[str, Any]:
    return {"id": w.id, "origin": w.origin, "events": list(w.events), "created_at": output.iso(w.created_at),
            "integrity": integrity.name(w.integrity)}


def _failing_note(hook: dict[str, Any]) -> str | None:
    """Why a webhook that fails its check gets nothing, and what to do; None for one that passes or is unchecked."""
    if hook["integrity"] != "tampered":
        return None
    return (f"webhook {hook['id']} fails authentication: its row was changed outside aegisd (or sealed by an earlier "
            f"aegisd), so nothing is delivered to it; remove it (`aegisctl webhook remove {hook['id']}`) and add it "
            "again")


@click.group("webhook")
def command() -> None:
    """Send signed JSON alerts to a URL when requests are blocked or credentials expire."""


@command.command("add")
@click.argument("url", required=False)
@click.option("--events", required=True, metavar="LIST",
              help=f"Comma-separated, any of: {', '.join(EVENT_NAMES)}.")
@click.option("--url-stdin", is_flag=True, help="Read the URL from stdin's first line (keeps it out of argv).")
@click.option("--json", "as_json", is_flag=True, help="Print the webhook and its secret as JSON.")
@pass_context
def add(ctx: Context, url: str | None, events: str, url_stdin: bool, as_json: bool) -> None:
    """Register URL (https://..., or http:// to loopback) and print its signing secret, once."""
    if url_stdin == (url is not None):
        raise click.UsageError("give the URL as an argument or with --url-stdin (one of the two)")
    too_long = ClientError(f"the webhook URL is longer than {MAX_URL_LENGTH} characters", reason="invalid_argument")
    if url_stdin:  # read no more than the longest URL can take in UTF-8
        url = stdin_line("webhook URL", "--url-stdin", 4 * MAX_URL_LENGTH, too_long).strip()
    elif url is not None:
        try:  # argv is decoded with surrogateescape: bytes that are not UTF-8 would fail while sending
            url.encode("utf-8")
        except UnicodeEncodeError:
            raise click.UsageError("the URL is not UTF-8 text (nothing was sent)") from None
    if url is not None and len(url) > MAX_URL_LENGTH:  # past gRPC's message limit aegisd would never see it
        raise too_long
    if not url:
        raise click.UsageError("the URL is empty")
    names = [part.strip() for part in events.split(",") if part.strip()]
    client = ctx.client
    reply = client.call(client.webhooks.AddWebhook, pb.AddWebhookRequest(url=url, events=names))
    hook = reply.webhook.id
    print_once(output.json_text({**webhook_json(reply.webhook), "secret": reply.secret}) if as_json else reply.secret,
               f"webhook {hook} was added, but its signing secret was not delivered and cannot be shown again",
               f"remove it (`aegisctl webhook remove {hook} --yes`) and add it again for a new secret")
    if as_json:
        return
    click.echo(f"aegisctl: added webhook {reply.webhook.id} to {output.printable(reply.webhook.origin)} for "
               f"{output.printable(', '.join(reply.webhook.events))}.", err=True)
    click.echo(ONCE_WARNING, err=True)


@command.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@pass_context
def list_(ctx: Context, as_json: bool) -> None:
    """List webhooks: id, where they go (origin only), their events and whether they pass their check (a failing
    one gets nothing); never a secret."""
    client = ctx.client
    hooks = [webhook_json(w) for w in client.call(client.webhooks.ListWebhooks, pb.ListWebhooksRequest()).webhooks]
    if as_json:
        output.emit_json(hooks)
        return
    if not hooks:
        click.echo("No webhooks yet: add one with `aegisctl webhook add URL --events blocked_request`.")
        return
    output.table(["ID", "ORIGIN", "EVENTS", "CREATED", "INTEGRITY"],
                 [[h["id"], h["origin"], ",".join(h["events"]), h["created_at"], integrity.text(h["integrity"])]
                  for h in hooks])
    for note in filter(None, map(_failing_note, hooks)):
        click.echo(output.printable(note), err=True)


@command.command("remove")
@click.argument("webhook_id", metavar="ID")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_context
def remove(ctx: Context, webhook_id: str, yes: bool) -> None:
    """Delete a webhook; nothing more is sent to it."""
    client = ctx.client
    hooks = client.call(client.webhooks.ListWebhooks, pb.ListWebhooksRequest()).webhooks
    found = [w for w in hooks if w.id == webhook_id]
    if not found:  # fail on a wrong id before asking
        raise ClientError(f"no webhook with id {webhook_id!r}", HINTS["webhook_not_found"], "webhook_not_found")
    # The stored origin is the row's: printable, as a row edited into vault.db may hold terminal escapes.
    confirm_destructive(output.printable(f"Remove webhook {webhook_id} ({found[0].origin})?"), yes)
    reply = client.call(client.webhooks.RemoveWebhook, pb.RemoveWebhookRequest(id=webhook_id))
    click.echo(output.printable(f"Removed webhook {reply.webhook.id} ({reply.webhook.origin})."))


@command.command("test")
@click.argument("webhook_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@pass_context
def test(ctx: Context, webhook_id: str, as_json: bool) -> None:
    """Send one signed "test" event now and report what the receiver answered (exit 1 unless 2xx)."""
    client = ctx.client
    reply = client.call(client.webhooks.TestWebhook, pb.TestWebhookRequest(id=webhook_id))
    if as_json:
        output.emit_json({"id": webhook_id, "delivered": reply.delivered, "status": reply.status or None,
                          "error": reply.error or None, "delivery_id": reply.delivery_id,
                          "duration_ms": reply.duration_ms})
    elif reply.delivered:
        click.echo(f"Delivered {reply.delivery_id} to {webhook_id}: HTTP {reply.status} in "
                   f"{reply.duration_ms:.0f} ms.")
    if not reply.delivered:
        if not as_json:
            why = output.printable(reply.error)
            click.echo(f"aegisctl: error: test delivery to {webhook_id} failed: {why}", err=True)
            click.echo("  next: check the receiver is up and answers 2xx; see aegisd's log", err=True)
        sys.exit(1)
