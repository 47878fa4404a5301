"""`aegisctl doctor`: is the daemon healthy, and if not, what to do about it.

The daemon checks itself (Diagnose); aegisctl adds the one check only a client can make: whether the
daemon answers at all. Exit 1 if any check fails; warnings alone exit 0.
"""

from __future__ import annotations

from typing import Any

import click

from aegisctl import output
from aegisctl.client import ClientError
from aegisctl.context import Context, pass_context
from aegisd.api.aegis.v1 import doctor_pb2 as pb

STATUS = {pb.CHECK_STATUS_PASS: "pass", pb.CHECK_STATUS_WARN: "warn", pb.CHECK_STATUS_FAIL: "fail",
          pb.CHECK_STATUS_SKIP: "skip"}
LABEL = {"pass": "[pass]", "warn": "[warn]", "fail": "[FAIL]", "skip": "[skip]"}
COLOR = {"pass": "green", "warn": "yellow", "fail": "red", "skip": None}


def diagnose(ctx: Context) -> list[dict[str, Any]]:
    """Every check as a dict; an unreachable daemon is one failed check, not an error."""
    socket = ctx.socket_path
    try:
        client = ctx.client
        reply = client.call(client.doctor.Diagnose, pb.DiagnoseRequest(), timeout=600)
    except ClientError as exc:
        return [{"name": "daemon", "status": "fail", "message": exc.message,
                 "hint": exc.hint or "start aegisd, or point --socket / AEGIS_SOCKET at it"}]
    checks = [{"name": "daemon", "status": "pass", "message": f"aegisd {reply.version} answers on {socket}",
               "hint": ""}]
    checks += [{"name": c.name, "status": STATUS.get(c.status, "fail"), "message": c.message, "hint": c.hint}
               for c in reply.checks]
    return checks


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help='Print {"ok": ..., "checks": [...]}.')
@pass_context
def command(ctx: Context, as_json: bool) -> None:
    """Check the daemon, vault, permissions, databases, credentials, gate, policies and ledger."""
    checks = diagnose(ctx)
    failed = [c for c in checks if c["status"] == "fail"]
    if as_json:
        output.emit_json({"ok": not failed, "checks": checks})
    else:
        width = max(len(c["name"]) for c in checks)
        for check in checks:
            label = click.style(LABEL[check["status"]], fg=COLOR[check["status"]], bold=check["status"] == "fail")
            click.echo(f"{label} {check['name']:<{width}}  {output.printable(check['message'])}")
            if check["hint"] and check["status"] in ("warn", "fail"):
                click.echo(f"       {'':<{width}}  -> {output.printable(check['hint'])}")
        counts = {status: sum(1 for c in checks if c["status"] == status) for status in LABEL}
        click.echo(f"\n{counts['pass']} passed, {counts['warn']} warnings, {counts['fail']} failed, "
                   f"{counts['skip']} skipped")
    if failed:
        raise SystemExit(1)
