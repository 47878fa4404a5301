"""`aegisctl grant AGENT CREDENTIAL` and `aegisctl revoke AGENT CREDENTIAL`: who may use what.

Top-level verbs, as in SQL. Both are idempotent: granting twice, or revoking a grant the agent does not
have, says nothing changed and succeeds. An agent or credential that does not exist is an error either way,
since that is usually a typo.
"""

from __future__ import annotations

import click

from aegisctl.client import ClientError
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
    try:
        client.call(client.agents.Revoke, pb.RevokeRequest(agent=agent, credential=credential))
    except ClientError as exc:
        # aegisd names a missing agent or credential first (agent_not_found, credential_not_found): this
        # reason means both exist and the agent already cannot use the credential, the state asked for.
        if exc.reason != "grant_not_found":
            raise
        click.echo(f"Agent {agent!r} has no grant of credential {credential!r}; nothing changed.")
        return
    click.echo(f"Revoked credential {credential!r} from agent {agent!r}.")


commands = (grant_command, revoke_command)
