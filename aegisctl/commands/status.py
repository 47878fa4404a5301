"""`aegisctl status`: vault state, version, uptime, gate address and counts."""

from __future__ import annotations

import click

from aegisctl import output
from aegisctl.client import VAULT_STATES
from aegisctl.context import Context, pass_context


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@pass_context
def command(ctx: Context, as_json: bool) -> None:
    """Show what the daemon is doing."""
    reply = ctx.client.status()
    info = {
        "state": VAULT_STATES.get(reply.state, "unknown"),
        "version": reply.version,
        "uptime_seconds": round(reply.uptime_seconds, 3),
        "started_at": output.iso(reply.started_at),
        "gate_address": reply.gate_address,
        "socket": str(ctx.socket_path),
        "data_dir": reply.data_dir,
        "vault_id": reply.vault_id or None,
        "credentials": reply.credentials,
        "agents": reply.agents,
        "grants": reply.grants,
        "key_slots": reply.key_slots,
        "schema_version": reply.schema_version,
    }
    if as_json:
        output.emit_json(info)
        return
    output.fields([
        ("vault", info["state"]),
        ("version", info["version"]),
        ("uptime", output.duration(reply.uptime_seconds)),
        ("gate", f"http://{reply.gate_address}"),
        ("socket", info["socket"]),
        ("data dir", info["data_dir"]),
        ("credentials", info["credentials"]),
        ("agents", info["agents"]),
        ("grants", info["grants"]),
    ])
    if info["state"] == "uninitialized":
        click.echo("\nNo vault yet: run `aegisctl init`.")
    elif info["state"] == "locked":
        click.echo("\nThe vault is locked: run `aegisctl unlock`.")
