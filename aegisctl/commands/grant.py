"""`aegisctl grant AGENT CREDENTIAL` and `aegisctl revoke AGENT CREDENTIAL`: who may use what.

Top-level verbs, as in SQL. Granting twice is not an error (it says nothing changed); revoking
a grant that does not exist is, since that is usually a typo.
"""

from __future__ import annotations

import click

from aegisctl.context import Context, pass_context
from aegisd.api.aegis.v1 import agents_pb2 as pb


@click.command("grant")
@click.argument("agent")
@click.argument("credential")
@pass_context
def grant_command(ctx: Context, agent: str, credential: str) -> None:
    """Let AGENT use CREDENTIAL through the gate."""
    client = ctx.client
    reply = client.call(client.agents.Grant, pb.GrantRequest(agent=agent, credential=credential))
    if reply.created:
        click.echo(f"Granted credential {credential!r} to agent {agent!r}.")
    else:
        click.echo(f"Agent {agent!r} already has credential {credential!r}; nothing changed.")


@click.command("revoke")
@click.argument("agent")
@click.argument("credential")
@pass_context
def revoke_command(ctx: Context, agent: str, credential: str) -> None:
    """Stop AGENT from using CREDENTIAL, from its next request on."""
    client = ctx.client
    client.call(client.agents.Revoke, pb.RevokeRequest(agent=agent, credential=credential))
    click.echo(f"Revoked credential {credential!r} from agent {agent!r}.")


commands = (grant_command, revoke_command)
