"""`aegisctl agent add|list|show|remove|regenerate|set-rate-limit`: the identities that call the gate.

A token is printed once, when it is made; nothing can show it again. In human mode it is the
only thing on stdout, so `TOKEN=$(aegisctl agent add NAME)` captures it.
"""

from __future__ import annotations

import shlex
from typing import Any

import click

from aegisctl import integrity, output
from aegisctl.context import Context, pass_context
from aegisctl.rate_limits import RateLimit
from aegisctl.secrets_input import confirm_destructive
from aegisctl.shown_once import print_once
from aegisd.api.aegis.v1 import agents_pb2 as pb

ONCE_WARNING = "aegisctl: this token is not shown again; store it where the agent reads it now."


def agent_json(a: pb.Agent) -> dict[str, Any]:
    return {
        "name": a.name,
        "credentials": list(a.credentials),
        "rate_limit": a.rate_limit or None,
        "created_at": output.iso(a.created_at),
        "rotated_at": output.iso(a.rotated_at),
        "integrity": integrity.name(a.integrity),
        "ignored_grants": list(a.ignored_grants),
        "id": a.id,
    }


def _integrity_notes(agents: list[dict[str, Any]]) -> list[str]:
    """One line per agent whose token or grants the gate ignores, saying what to do."""
    notes = []
    for a in agents:
        note = integrity.problem("agent", a, "the gate refuses its token")
        if note is not None:
            notes.append(note)
        elif a["ignored_grants"]:  # credential names from rows that fail authentication: anything at all
            notes.append(output.printable(
                f"agent {a['name']}: the gate ignores its grants of {', '.join(a['ignored_grants'])} (their rows "
                f"fail authentication); revoke each (`aegisctl revoke {shlex.quote(str(a['name']))} CREDENTIAL`) "
                "and grant it again if it is meant"))
    return notes


def _print_token(name: str, token: str, as_json: bool, made: str) -> None:
    """The token on stdout, once; if it cannot be delivered there, exit 1 saying the agent has it (`made`: "was
    created" or "has a new token") and how to get another."""
    text = output.json_text({"name": name, "token": token}) if as_json else token
    print_once(text, f"agent {name!r} {made}, but its token was not delivered and cannot be shown again",
               f"run `aegisctl agent regenerate {shlex.quote(name)}` for a new token; the lost one then stops working")
    if not as_json:
        click.echo(ONCE_WARNING, err=True)


@click.group("agent")
def command() -> None:
    """Add, inspect and remove agents, and regenerate their tokens."""


@command.command("add")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help='Print {"name": ..., "token": ...}.')
@pass_context
def add(ctx: Context, name: str, as_json: bool) -> None:
    """Create agent NAME and print its token, once. Then grant it credentials with `aegisctl grant`."""
    client = ctx.client
    reply = client.call(client.agents.AddAgent, pb.AddAgentRequest(name=name))
    _print_token(reply.agent.name, reply.token, as_json, "was created")


@command.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@pass_context
def list_(ctx: Context, as_json: bool) -> None:
    """List agents and the credentials each is granted (never their tokens)."""
    client = ctx.client
    agents = [agent_json(a) for a in client.call(client.agents.ListAgents, pb.ListAgentsRequest()).agents]
    if as_json:
        output.emit_json(agents)
        return
    if not agents:
        click.echo("No agents yet: add one with `aegisctl agent add NAME`.")
        return
    output.table(["NAME", "CREDENTIALS", "CREATED", "TOKEN ISSUED", "INTEGRITY"],
                 [[a["name"], ",".join(a["credentials"]), a["created_at"], a["rotated_at"],
                   integrity.text(a["integrity"])] for a in agents])
    for note in _integrity_notes(agents):
        click.echo(output.printable(note), err=True)


@command.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@pass_context
def show(ctx: Context, name: str, as_json: bool) -> None:
    """Show one agent: when it was made, when its token was issued, what it may use."""
    a = agent_json(ctx.client.get_agent(name))
    if as_json:
        output.emit_json(a)
        return
    output.fields([
        ("name", a["name"]), ("created", a["created_at"]), ("token issued", a["rotated_at"]),
        ("credentials", ", ".join(a["credentials"]) or "none (grant with `aegisctl grant`)"),
        ("rate limit", a["rate_limit"] or "none"), ("integrity", integrity.text(a["integrity"])),
    ])
    for note in _integrity_notes([a]):
        click.echo(output.printable(note), err=True)


@command.command("remove")
@click.argument("name")
@click.option("--id", "by_id", is_flag=True, help="NAME is the id of a row that fails authentication (doctor).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_context
def remove(ctx: Context, name: str, by_id: bool, yes: bool) -> None:
    """Delete an agent and its grants; its token stops working at once."""
    client = ctx.client
    if not by_id:
        client.get_agent(name)  # fail on a wrong name before asking
    what = f"the agent row with id {name!r}" if by_id else f"agent {name!r}"
    confirm_destructive(f"Remove {what} and its grants?", yes)
    reply = client.call(client.agents.RemoveAgent, pb.RemoveAgentRequest(name=name, by_id=by_id))
    click.echo(f"Removed {what} ({reply.grants_removed} grants removed).")


@command.command("regenerate")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help='Print {"name": ..., "token": ...}.')
@pass_context
def regenerate(ctx: Context, name: str, as_json: bool) -> None:
    """Issue agent NAME a new token and print it, once; the old token stops working at once."""
    client = ctx.client
    reply = client.call(client.agents.RegenerateToken, pb.RegenerateTokenRequest(name=name))
    _print_token(reply.agent.name, reply.token, as_json, "has a new token (the old one no longer works)")


@command.command("set-rate-limit")
@click.argument("name")
@click.argument("rate", type=RateLimit(), metavar="RATE|none")
@pass_context
def set_rate_limit(ctx: Context, name: str, rate: str) -> None:
    """Limit agent NAME across all its credentials to RATE (N/sec, N/min, N/hour or N/day), or `none`.

    The agent's limit applies on top of each credential's own limit and its policy rules' limits;
    a request refused by any of them gets 429 and uses up none of the others.
    """
    client = ctx.client
    reply = client.call(client.agents.SetRateLimit, pb.SetAgentRateLimitRequest(name=name, rate_limit=rate))
    shown = reply.agent.rate_limit or "none"
    click.echo(f"Agent {name!r} rate limit: {shown}.")
