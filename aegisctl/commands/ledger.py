"""`aegisctl ledger show|follow|verify`: the audit trail of every gate decision."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from aegisctl import output
from aegisctl.context import Context, pass_context
from aegisctl.timespec import TimeSpec
from aegisd.api.aegis.v1 import ledger_pb2 as pb

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def record_json(r: pb.LedgerRecord) -> dict[str, Any]:
    from datetime import UTC, datetime

    stamp = datetime.fromtimestamp(r.time_ms / 1000, UTC)
    return {
        "id": r.id, "time": f"{stamp:%Y-%m-%dT%H:%M:%S}.{r.time_ms % 1000:03d}Z", "request_id": r.request_id,
        "agent": r.agent, "credential": r.credential, "service": r.service, "method": r.method, "path": r.path,
        "target_host": r.target_host, "decision": r.decision, "reason": r.reason, "status": r.status,
        "duration_ms": r.duration_ms, "bytes_in": r.bytes_in, "bytes_out": r.bytes_out, "kind": r.kind,
        "flags": r.flags, "detail": r.detail,
    }


def _row(r: dict[str, Any]) -> list[Any]:
    what = r["detail"] if r["kind"] == "system" else f"{r['method']} /{r['service']}{r['path']}"
    outcome = r["decision"] or r["kind"]
    if r["reason"]:
        outcome += f" ({r['reason']})"
    return [r["time"], r["agent"], what, r["target_host"], r["status"] or "", outcome]


HEADERS = ["TIME", "AGENT", "REQUEST", "HOST", "STATUS", "DECISION"]


def filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options: list[Decorator] = [
        click.option("--agent", help="Only this agent."),
        click.option("--service", help="Only this service."),
        click.option("--credential", help="Only this credential."),
        click.option("--blocked", is_flag=True, help="Only denied requests."),
        click.option("--since", type=TimeSpec(), help="From this time (ISO 8601) or age (15m, 2h, 7d)."),
        click.option("--until", type=TimeSpec(), help="Before this time or age."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def make_filter(agent: str | None, service: str | None, credential: str | None, blocked: bool,
                since: int | None, until: int | None) -> pb.LedgerFilter:
    return pb.LedgerFilter(agent=agent or "", service=service or "", credential=credential or "",
                           blocked=blocked, since_ms=since or 0, until_ms=until or 0)


@click.group("ledger")
def command() -> None:
    """Read, follow and verify the audit ledger."""


@command.command("show")
@filter_options
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True, help="At most this many.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, newest first.")
@pass_context
def show(ctx: Context, /, limit: int, as_json: bool, **filters: Any) -> None:
    """Show the newest ledger rows."""
    client = ctx.client
    reply = client.call(client.ledger.ListEntries, pb.ListEntriesRequest(filter=make_filter(**filters), limit=limit))
    rows = [record_json(r) for r in reply.records]
    if as_json:
        output.emit_json(rows)
    elif not rows:
        click.echo("No ledger rows match.")
    else:
        output.table(HEADERS, [_row(r) for r in rows])


@command.command("follow")
@filter_options
@click.option("--lines", "-n", type=click.IntRange(0, 10_000), default=10, show_default=True,
              help="Show this many recent rows first.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@pass_context
def follow(ctx: Context, /, lines: int, as_json: bool, **filters: Any) -> None:
    """Print rows as they are written, like `journalctl -f`. Ctrl-C stops."""
    import json

    client = ctx.client
    stream = client.ledger.Follow(pb.FollowRequest(filter=make_filter(**filters), backlog=lines))
    try:
        for r in client.stream(stream):
            row = record_json(r)
            click.echo(json.dumps(row) if as_json else "  ".join(str(c) for c in _row(row)))
    except KeyboardInterrupt:
        stream.cancel()  # type: ignore[no-untyped-call]


@command.command("verify")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@pass_context
def verify(ctx: Context, as_json: bool) -> None:
    """Check the hash chain: detects edited, deleted or reordered rows and names the first bad one."""
    client = ctx.client
    reply = client.call(client.ledger.Verify, pb.VerifyRequest(), timeout=600)
    result = {"ok": reply.ok, "rows_checked": reply.rows_checked, "first_bad_id": reply.first_bad_id or None,
              "reason": reply.reason or None}
    if as_json:
        output.emit_json(result)
    elif reply.ok:
        click.echo(f"Ledger intact: {reply.rows_checked} rows verified.")
    else:
        click.echo(f"Ledger TAMPERED: first bad row {reply.first_bad_id}: {reply.reason} "
                   f"({reply.rows_checked} rows verified before it).")
    if not reply.ok:
        raise SystemExit(1)
