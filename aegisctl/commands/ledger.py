"""`aegisctl ledger show|follow|verify|stats|export|prune`: the audit trail of every gate decision."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import click

from aegisctl import ledger_export, output
from aegisctl.client import AegisClient
from aegisctl.context import Context, pass_context
from aegisctl.private_file import private_output
from aegisctl.secrets_input import confirm_destructive
from aegisctl.timespec import TimeSpec
from aegisd.api.aegis.v1 import ledger_pb2 as pb

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def iso_time(ms: int) -> str | None:
    """Epoch milliseconds in the ledger's ISO 8601 form, or None for a time no such form can show (before year 1
    or past year 9999: an age of a billion weeks, say, or a row whose time was edited in the file)."""
    try:
        return output.iso_ms(ms)
    except (ValueError, OverflowError, OSError):
        return None


def ago(ms: int, now_ms: int | None = None) -> str:
    """How long before now `ms` is, in words ("2 minutes ago"), so an age like `2m` cannot be misread as months."""
    seconds = ((int(time.time() * 1000) if now_ms is None else now_ms) - ms) / 1000
    if seconds < 0:
        return "in the future"
    for unit, size, below in (("second", 1, 120), ("minute", 60, 120 * 60), ("hour", 3600, 48 * 3600)):
        if seconds < below:
            return f"{plural(round(seconds / size), unit)} ago"
    return f"{plural(round(seconds / 86400), 'day')} ago"


def plural(count: int, noun: str) -> str:
    """`1 request`, `2 requests`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def record_json(r: pb.LedgerRecord) -> dict[str, Any]:
    return {
        "id": r.id, "time": iso_time(r.time_ms) or f"(time_ms {r.time_ms}, out of range)", "request_id": r.request_id,
        "agent": r.agent, "credential": r.credential, "service": r.service, "method": r.method, "path": r.path,
        "target_host": r.target_host, "decision": r.decision, "reason": r.reason, "status": r.status,
        "duration_ms": r.duration_ms, "bytes_in": r.bytes_in, "bytes_out": r.bytes_out, "kind": r.kind,
        "flags": r.flags, "detail": r.detail,
    }


NOT_RECORDED = "(path not recorded)"
NOT_ROUTED = "(not routed)"


def _request(r: dict[str, Any]) -> str:
    """The request as `METHOD /service/path`. A request refused before its target was split into service and
    path (a bad Host header, a `..` segment, an absolute-form target, a framing refused once its head was read)
    has no service: its target as sent, marked as such rather than shown as `//...`, a path the agent did not ask
    for. A request whose head could not be read (400, 431) has no path at all, nor do the rows an older aegisd
    wrote for those above, and they say so. (JSON and CSV keep the recorded values: they are data.)"""
    method = r["method"] or "-"
    if not r["path"]:
        return f"{method} " + (f"/{r['service']} {NOT_RECORDED}" if r["service"] else NOT_RECORDED)
    if not r["service"]:
        return f"{method} {r['path']} {NOT_ROUTED}"
    return f"{r['method']} /{r['service']}{r['path']}"


def _row(r: dict[str, Any]) -> list[Any]:
    what = r["detail"] if r["kind"] == "system" else _request(r)
    outcome = r["decision"] or r["kind"]
    if r["reason"]:
        outcome += f" ({r['reason']})"
    return [r["time"], r["agent"], what, r["target_host"], r["status"] or "", outcome]


HEADERS = ["TIME", "AGENT", "REQUEST", "HOST", "STATUS", "DECISION"]


def filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options: list[Decorator] = [
        click.option("--agent", help='Only this agent ("" for rows with none: unauthenticated, system).'),
        click.option("--service", help='Only this service ("" for rows with none).'),
        click.option("--credential", help='Only this credential ("" for rows with none).'),
        click.option("--blocked", is_flag=True, help="Only denied requests."),
        click.option("--since", type=TimeSpec(), help="From this time (ISO 8601) or age (15m, 2h, 7d)."),
        click.option("--until", type=TimeSpec(), help="Before this time or age."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def make_filter(agent: str | None, service: str | None, credential: str | None, blocked: bool,
                since: int | None, until: int | None) -> pb.LedgerFilter:
    # Set only when given, even as "": an empty value selects the rows with none (presence tells it from unset).
    flt = pb.LedgerFilter(blocked=blocked)
    if agent is not None:
        flt.agent = agent
    if service is not None:
        flt.service = service
    if credential is not None:
        flt.credential = credential
    if since is not None:  # set even at 0: the epoch is a bound like any other time, not "unbounded"
        flt.since_ms = since
    if until is not None:
        flt.until_ms = until
    return flt


@click.group("ledger")
def command() -> None:
    """Read, follow, verify, summarise, export and prune the audit ledger."""


@command.command("show")
@filter_options
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True, help="At most this many.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, newest first.")
@pass_context
def show(ctx: Context, /, limit: int, as_json: bool, **filters: Any) -> None:
    """Show the newest ledger rows."""
    client = ctx.client
    flt = make_filter(**filters)
    records: list[pb.LedgerRecord] = []
    while True:  # the daemon answers in replies of a few MiB; one with `more` asks for the next
        before = records[-1].id if records else 0
        reply = client.call(client.ledger.ListEntries,
                            pb.ListEntriesRequest(filter=flt, limit=limit - len(records), before_id=before))
        records.extend(reply.records)
        if not reply.more or not reply.records or len(records) >= limit:
            break
    rows = [record_json(r) for r in records]
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
    """Print rows as they are written, like `journalctl -f`. Ctrl-C stops.

    If this falls behind, aegisd leaves rows out; a line on stderr says how many, and where.
    """
    import json

    client = ctx.client
    stream = client.ledger.Follow(pb.FollowRequest(filter=make_filter(**filters), backlog=lines))
    try:
        for r in client.stream(stream):
            if r.dropped:
                click.echo(f"aegisctl: {r.dropped} {'row' if r.dropped == 1 else 'rows'} missing here: this follow "
                           "fell behind and aegisd left them out; `aegisctl ledger show` or `export` has them",
                           err=True)
                continue
            row = record_json(r)
            click.echo(json.dumps(row) if as_json else "  ".join(output.printable(c) for c in _row(row)))
    except KeyboardInterrupt:
        stream.cancel()  # type: ignore[no-untyped-call]


class TipSpec(click.ParamType):  # type: ignore[type-arg]
    """`ID:MAC` as `ledger verify` prints a tip: a row id and its MAC in hex (64 digits)."""

    name = "id:mac"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, bytes]:
        if isinstance(value, tuple):
            return value
        row_id, _, mac = str(value).strip().partition(":")
        try:
            tip = int(row_id) if row_id.isascii() and row_id.isdigit() else 0, bytes.fromhex(mac)
        except ValueError:
            tip = 0, b""
        if not 1 <= tip[0] <= MAX_ROW_ID or len(tip[1]) != TIP_MAC_BYTES:
            self.fail(f"{value!r} is not a tip as `aegisctl ledger verify` prints it: a row id, a colon and a MAC of "
                      f"{2 * TIP_MAC_BYTES} hex digits", param, ctx)
        return tip


TIP_MAC_BYTES = 32  # HMAC-SHA256
MAX_ROW_ID = 2**63 - 1  # SQLite's largest rowid, and the proto's int64


def tip_text(row_id: int, mac: bytes) -> str | None:
    """The tip as `ledger verify` prints it and `--expect-tip` takes it, or None when there is no row to name."""
    return f"{row_id}:{mac.hex()}" if row_id and mac else None


@command.command("verify")
@click.option("--expect-tip", type=TipSpec(), metavar="ID:MAC",
              help="The tip an earlier verify printed: fail unless the ledger still holds that row with that MAC "
                   "(catches its newest rows cut off, even with SQLite's id counter rewritten).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@pass_context
def verify(ctx: Context, expect_tip: tuple[int, bytes] | None, as_json: bool) -> None:
    """Check the hash chain and the database file: detects edited, deleted or reordered rows and names the
    first bad one, and indexes that hide rows. Prints the tip (newest row and its MAC) to keep for later."""
    client = ctx.client
    request = pb.VerifyRequest()
    if expect_tip is not None:
        request.expect_id, request.expect_mac = expect_tip
    reply = client.call(client.ledger.Verify, request, timeout=600)
    tip = tip_text(reply.last_id, reply.last_mac)
    result = {"ok": reply.ok, "rows_checked": reply.rows_checked, "first_bad_id": reply.first_bad_id or None,
              "reason": reply.reason or None, "first_id": reply.first_id or 1, "last_id": reply.last_id,
              "last_mac": reply.last_mac.hex() or None, "tip": tip, "unchained_only": reply.unchained_only}
    if as_json:
        output.emit_json(result)
    elif reply.ok:
        click.echo(f"Ledger intact: {output.printable(reply.reason)}.")
        if tip:
            click.echo(f"Tip: {tip}")
            click.echo("  (keep it: `aegisctl ledger verify --expect-tip` with it later fails if rows up to it were "
                       "cut off)")
    elif reply.unchained_only:  # no evidence of an edit, nor proof there was none: the operator must look
        click.echo(f"Ledger NOT CHAINED: {output.printable(reply.reason)}.")
        click.echo("  Look at those rows (`aegisctl ledger show`); once reviewed, `aegisctl ledger prune --before TIME "
                   "--include-unchained` lets them go. An aegisd that unlocks at start (an unlock key) leaves none.")
    elif reply.first_bad_id:
        click.echo(f"Ledger TAMPERED: first bad row {reply.first_bad_id}: {output.printable(reply.reason)} "
                   f"({reply.rows_checked} rows verified before it).")
    else:
        click.echo(f"Ledger TAMPERED: {output.printable(reply.reason)}.")
    if not reply.ok:
        raise SystemExit(1)


def _stats_json(reply: pb.StatsResponse) -> dict[str, Any]:
    def when(ms: int) -> str | None:
        return (iso_time(ms) or f"(time_ms {ms}, out of range)") if ms else None

    return {
        "rows": reply.rows, "requests": reply.requests, "system_events": reply.system_events,
        "allowed": reply.allowed, "denied": reply.denied, "bytes_in": reply.bytes_in, "bytes_out": reply.bytes_out,
        "first_time": when(reply.first_time_ms), "last_time": when(reply.last_time_ms),
        "by_decision": [{"decision": g.key, "count": g.count} for g in reply.by_decision],
        "by_service": [{"service": g.key, "requests": g.count, "denied": g.denied} for g in reply.by_service],
        "by_reason": [{"reason": g.key, "count": g.count} for g in reply.by_reason],
        "top_agents": [{"agent": g.key, "requests": g.count, "denied": g.denied} for g in reply.top_agents],
    }


@command.command("stats")
@filter_options
@click.option("--top", type=click.IntRange(1, 1000), default=10, show_default=True, help="How many top agents.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@pass_context
def stats(ctx: Context, /, top: int, as_json: bool, **filters: Any) -> None:
    """Totals and breakdowns (decision, service, reason, top agents) of the matching rows."""
    client = ctx.client
    reply = client.call(client.ledger.Stats, pb.StatsRequest(filter=make_filter(**filters), top=top), timeout=600)
    result = _stats_json(reply)
    if as_json:
        output.emit_json(result)
        return
    if not reply.rows:
        click.echo("No ledger rows match.")
        return
    output.fields([
        ("rows", f"{reply.rows} ({plural(reply.requests, 'request')}, "
                 f"{plural(reply.system_events, 'system event')})"),
        ("allowed", reply.allowed),
        ("denied", reply.denied),
        ("bytes", f"{reply.bytes_in} in, {reply.bytes_out} out"),
        ("from", result["first_time"]),
        ("to", result["last_time"]),
    ])
    for title, key, groups, with_denied in (("SERVICE", "service", reply.by_service, True),
                                            ("REASON", "reason", reply.by_reason, False),
                                            ("AGENT", "agent", reply.top_agents, True)):
        if groups:
            click.echo()
            headers = [title, "REQUESTS", "DENIED"] if with_denied else [title, "COUNT"]
            output.table(headers, [[g.key or f"(no {key})", g.count, *([g.denied] if with_denied else [])]
                                   for g in groups])


@command.command("export")
@filter_options
@click.option("--format", "fmt", type=click.Choice(ledger_export.FORMATS), default="jsonl", show_default=True,
              help="csv (spreadsheet-safe), json (one array) or jsonl (one object per line).")
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write to FILE (created 0600, atomically: no partial file on failure) instead of stdout.")
@pass_context
def export(ctx: Context, /, fmt: str, output_path: Path | None, **filters: Any) -> None:
    """Every matching row, oldest first, streamed: constant memory however large the ledger."""
    client = ctx.client
    stream = client.ledger.Export(pb.ExportRequest(filter=make_filter(**filters)))
    if output_path is None:
        # On a terminal CSV cells are shown escaped like any other output (JSON escapes on its own); in a
        # pipe or a file they stay exact.
        cell = output.printable if fmt == "csv" and sys.stdout.isatty() else None
        try:
            _export_rows(client, stream, sys.stdout, fmt, ledger_export.Progress(enabled=False), cell)
            sys.stdout.flush()  # the last rows, here: a reader gone by now is seen below, not at exit
        except BrokenPipeError:  # `| head`: the reader is done, and so are we
            stream.cancel()  # type: ignore[no-untyped-call]
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    progress = ledger_export.Progress()
    with private_output(output_path, text=True) as out:
        try:
            _export_rows(client, stream, out.file, fmt, progress)
        except KeyboardInterrupt:
            stream.cancel()  # type: ignore[no-untyped-call]
            raise
    progress.finish()
    click.echo(f"Exported {plural(progress.count, 'row')} to {output_path}.", err=True)


def _export_rows(client: AegisClient, stream: Iterable[pb.ExportBatch], out: IO[str], fmt: str,
                 progress: ledger_export.Progress, cell: Callable[[Any], str] | None = None) -> None:
    writer = ledger_export.row_writer(fmt, out, cell)
    for batch in client.stream(stream):
        for record in batch.records:
            writer.write(record_json(record))
        progress.advance(len(batch.records))
    writer.close()


@command.command("prune")
@click.option("--before", required=True, type=TimeSpec(),
              help="Delete rows recorded before this time (ISO 8601) or age (90d, 12w; s, m = minutes, h, d, w).")
@click.option("--include-unchained", is_flag=True,
              help="Also delete rows in that range that `ledger verify` reports as not chained (no MAC).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (scripts).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@pass_context
def prune(ctx: Context, before: int, include_unchained: bool, yes: bool, as_json: bool) -> None:
    """Delete old rows for retention. The chain stays verifiable: the cut is recorded in an
    authenticated checkpoint, and the prune itself in the ledger."""
    when = iso_time(before)
    if when is None:
        raise click.BadParameter("that time is out of range (before year 1 or past year 9999): give one between "
                                 "1970-01-01 and now", param_hint="'--before'")
    if before <= 0:
        raise click.BadParameter(f"{when} is not after 1970-01-01T00:00:00Z, and no row is recorded before that: give "
                                 "a later time", param_hint="'--before'")
    when = f"{when} ({ago(before)})"  # the cutoff in UTC, and in words: `2m` is 2 minutes, not months
    confirm_destructive(f"Delete every ledger row recorded before {when}? This cannot be undone.", yes)
    client = ctx.client
    request = pb.PruneRequest(before_ms=before, include_unchained=include_unchained)
    reply = client.call(client.ledger.Prune, request, timeout=3600)
    if as_json:
        output.emit_json({"pruned": reply.pruned, "first_kept_id": reply.first_kept_id, "before": iso_time(before),
                          "unchained": reply.unchained})
    elif reply.pruned:
        unchained = f" ({reply.unchained} of them not chained)" if reply.unchained else ""
        click.echo(f"Pruned {plural(reply.pruned, 'row')} recorded before {when}{unchained}; the ledger now starts "
                   f"at row {reply.first_kept_id} and still verifies from there.")
    else:
        click.echo(f"Nothing to prune: no rows recorded before {when}.")
