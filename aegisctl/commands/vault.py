"""`aegisctl vault add|list|show|update|rotate|remove|adopt`: credentials, whose secrets go in and never out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from aegisctl import integrity, output
from aegisctl.client import ClientError
from aegisctl.context import Context, pass_context
from aegisctl.durations import Duration
from aegisctl.rate_limits import RateLimit
from aegisctl.secrets_input import MAX_SECRET_BYTES, confirm_destructive, on_terminal, read_secret
from aegisd.api.aegis.v1 import credentials_pb2 as pb
from aegisd.api.aegis.v1 import vault_pb2

AUTH_TYPES = {"bearer": pb.AUTH_TYPE_BEARER, "header": pb.AUTH_TYPE_HEADER, "basic": pb.AUTH_TYPE_BASIC,
              "query": pb.AUTH_TYPE_QUERY}
INSPECTION = {"off": pb.BODY_INSPECTION_OFF, "warn": pb.BODY_INSPECTION_WARN, "block": pb.BODY_INSPECTION_BLOCK}
AUTH_NAMES = {v: k for k, v in AUTH_TYPES.items()}
INSPECTION_NAMES = {v: k for k, v in INSPECTION.items()}


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def credential_json(c: pb.Credential) -> dict[str, Any]:
    return {
        "name": c.name,
        "service": c.service,
        "domains": list(c.domains),
        "auth_type": AUTH_NAMES.get(c.auth_type, "unknown"),
        "header_name": c.header_name or None,
        "query_param": c.query_param or None,
        "scopes": list(c.scopes),
        "rate_limit": c.rate_limit or None,
        "body_inspection": INSPECTION_NAMES.get(c.body_inspection, "unknown"),
        "created_at": output.iso(c.created_at),
        "updated_at": output.iso(c.updated_at),
        "rotated_at": output.iso(c.rotated_at),
        "expires_at": output.iso(c.expires_at) if c.HasField("expires_at") else None,
        "expired": c.expired,
        "integrity": integrity.name(c.integrity),
        "id": c.id,
    }


def _integrity_notes(creds: list[dict[str, Any]]) -> list[str]:
    """One line per credential the gate does not serve, saying what to do; nothing when all are fine."""
    return [note for c in creds if (note := integrity.problem("credential", c, "it is not served")) is not None]


def _expiry_text(c: dict[str, Any]) -> str:
    if c["expires_at"] is None:
        return "never"
    return f"{c['expires_at']} (expired)" if c["expired"] else str(c["expires_at"])


@click.group("vault")
def command() -> None:
    """Add, inspect, change, rotate and remove credentials."""


def _defaulted(help_text: str, default: str, on_add: bool) -> str:
    """`add` fills in a default; on `update` an option left out leaves the setting as it is."""
    return f"{help_text} [default: {default}]." if on_add else f"{help_text} [default: unchanged]."


def auth_option(on_add: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--auth-type", type=click.Choice(list(AUTH_TYPES)),
                        help=_defaulted("How the gate injects the secret", "bearer", on_add))


def scopes_option(on_add: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--scopes", metavar="LIST", help=_defaulted("read, write or * (comma-separated)", "*", on_add))


def inspection_option(on_add: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--body-inspection", type=click.Choice(list(INSPECTION)),
                        help=_defaulted("Scan outbound bodies for credentials", "block", on_add))


header_option = click.option("--header-name", metavar="H", help="Header for --auth-type header (e.g. X-Api-Key).")
query_option = click.option("--query-param", metavar="P", help="Query parameter for --auth-type query.")
rate_option = click.option("--rate-limit", type=RateLimit(), metavar="N/UNIT",
                           help="e.g. 100/min; units sec, min, hour, day; 'none' for no limit [default: none].")
plain_http_option = click.option(
    "--allow-plain-http", is_flag=True,
    help="Accept http:// entries to hosts other than loopback: the secret then crosses the network unencrypted.")
DOMAINS_HELP = ("comma-separated: api.example.com, *.example.com, http://127.0.0.1:8080 (plain http:// only to "
                "loopback unless --allow-plain-http).")


@command.command("add")
@click.argument("name")
@click.option("--service", required=True, help="Gate path segment agents use: /SERVICE/...")
@click.option("--domains", required=True, metavar="LIST", help="Allowed hosts, " + DOMAINS_HELP)
@plain_http_option
@auth_option(on_add=True)
@header_option
@query_option
@scopes_option(on_add=True)
@click.option("--ttl", type=Duration(), help="Expire after 45s, 30m, 12h, 90d, 2w...")
@rate_option
@inspection_option(on_add=True)
@click.option("--secret-stdin", is_flag=True, help="Read the secret from stdin's first line.")
@click.option("--json", "as_json", is_flag=True, help="Print the new credential as JSON.")
@pass_context
def add(ctx: Context, name: str, service: str, domains: str, allow_plain_http: bool, auth_type: str | None,
        header_name: str | None, query_param: str | None, scopes: str | None, ttl: int | None,
        rate_limit: str | None, body_inspection: str | None, secret_stdin: bool, as_json: bool) -> None:
    """Store a new credential NAME. The secret is prompted for, or read with --secret-stdin."""
    scope_list = _split(scopes) if scopes is not None else ["*"]
    if not scope_list:  # an empty list would mean "unspecified" to the daemon, i.e. every scope
        raise click.UsageError("--scopes must name at least one of: read, write, * (comma-separated)")
    ctx.client.require_state("unlocked")  # before the secret is pasted for nothing
    secret = read_secret("secret", secret_stdin, max_bytes=MAX_SECRET_BYTES)
    request = pb.AddCredentialRequest(
        name=name, service=service, domains=_split(domains),
        auth_type=AUTH_TYPES[auth_type or "bearer"], header_name=header_name or "",
        query_param=query_param or "", scopes=scope_list, ttl_seconds=ttl or 0,
        rate_limit=rate_limit or "", body_inspection=INSPECTION[body_inspection or "block"], secret=secret,
        allow_plain_http=allow_plain_http)
    client = ctx.client
    cred = client.call(client.credentials.AddCredential, request)
    if as_json:
        output.emit_json(credential_json(cred))
    else:
        click.echo(f"Added credential {cred.name!r}: agents call http://{client.status().gate_address}/"
                   f"{output.printable(cred.service)}/... once granted.")


@command.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@pass_context
def list_(ctx: Context, as_json: bool) -> None:
    """List credentials (never their secrets)."""
    client = ctx.client
    creds = [credential_json(c) for c in client.call(client.credentials.ListCredentials,
                                                         pb.ListCredentialsRequest()).credentials]
    if as_json:
        output.emit_json(creds)
        return
    if not creds:
        click.echo("No credentials yet: add one with `aegisctl vault add`.")
        return
    output.table(["NAME", "SERVICE", "DOMAINS", "AUTH", "SCOPES", "EXPIRES", "INSPECTION", "INTEGRITY"],
                 [[c["name"], c["service"], ",".join(c["domains"]), c["auth_type"], ",".join(c["scopes"]),
                   _expiry_text(c), c["body_inspection"], integrity.text(c["integrity"])] for c in creds])
    for note in _integrity_notes(creds):
        click.echo(output.printable(note), err=True)


@command.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@pass_context
def show(ctx: Context, name: str, as_json: bool) -> None:
    """Show one credential's settings (never its secret)."""
    c = credential_json(ctx.client.get_credential(name))
    if as_json:
        output.emit_json(c)
        return
    output.fields([
        ("name", c["name"]), ("service", c["service"]), ("domains", ", ".join(c["domains"])),
        ("auth type", c["auth_type"]), ("header name", c["header_name"]), ("query param", c["query_param"]),
        ("scopes", ", ".join(c["scopes"])), ("rate limit", c["rate_limit"] or "none"),
        ("body inspection", c["body_inspection"]), ("expires", _expiry_text(c)),
        ("created", c["created_at"]), ("updated", c["updated_at"]), ("rotated", c["rotated_at"]),
        ("integrity", integrity.text(c["integrity"])),
    ])
    for note in _integrity_notes([c]):
        click.echo(output.printable(note), err=True)


@command.command("update")
@click.argument("name")
@click.option("--service", help="New gate path segment.")
@click.option("--domains", metavar="LIST", help="Replace the allowed hosts, " + DOMAINS_HELP)
@plain_http_option
@auth_option(on_add=False)
@header_option
@query_option
@scopes_option(on_add=False)
@click.option("--ttl", type=Duration(), help="Expire this long from now (45s, 30m, 12h, 90d, 2w); 'never' clears "
              "the expiry.")
@click.option("--rate-limit", type=RateLimit(), metavar="N/UNIT", help="e.g. 100/min; 'none' clears the limit.")
@inspection_option(on_add=False)
@click.option("--passphrase-stdin", is_flag=True,
              help="Read the vault's passphrase from stdin's first line: a change that lets the secret go where it "
                   "could not before (a new host, inspection off) needs it.")
@click.option("--json", "as_json", is_flag=True, help="Print the updated credential as JSON.")
@pass_context
def update(ctx: Context, name: str, service: str | None, domains: str | None, allow_plain_http: bool,
           auth_type: str | None, header_name: str | None, query_param: str | None, scopes: str | None,
           ttl: int | None, rate_limit: str | None, body_inspection: str | None, passphrase_stdin: bool,
           as_json: bool) -> None:
    """Change a credential's settings; the secret stays as it is.

    A new host the old list did not cover, or --body-inspection off, needs the vault's passphrase: whoever can
    reach the control socket must not be able to send a secret to a host of their own. On a terminal it is
    asked for when needed."""
    if allow_plain_http and domains is None:
        raise click.UsageError("--allow-plain-http applies to the list given with --domains; give both")
    request = pb.UpdateCredentialRequest(name=name, allow_plain_http=allow_plain_http)
    if passphrase_stdin:
        request.passphrase = read_secret("passphrase", True, flag="--passphrase-stdin")
    if service is not None:
        request.service = service
    if domains is not None:
        request.set_domains, request.domains[:] = True, _split(domains)
    if auth_type is not None:
        request.auth_type = AUTH_TYPES[auth_type]
    if header_name is not None:
        request.header_name = header_name
    if query_param is not None:
        request.query_param = query_param
    if scopes is not None:
        request.set_scopes, request.scopes[:] = True, _split(scopes)
    if ttl is not None:
        request.ttl_seconds = ttl
    if rate_limit is not None:
        request.rate_limit = rate_limit  # "" for `none`: clear it
    if body_inspection is not None:
        request.body_inspection = INSPECTION[body_inspection]
    client = ctx.client
    try:
        cred = client.call(client.credentials.UpdateCredential, request, timeout=120)
    except ClientError as exc:
        if exc.reason != "passphrase_required" or request.passphrase or not on_terminal():
            raise
        click.echo(f"{output.printable(exc.message)}.", err=True)
        request.passphrase = read_secret("passphrase", False, flag="--passphrase-stdin")
        cred = client.call(client.credentials.UpdateCredential, request, timeout=120)
    if as_json:
        output.emit_json(credential_json(cred))
    else:
        click.echo(f"Updated credential {cred.name!r}.")


@command.command("rotate")
@click.argument("name")
@click.option("--secret-stdin", is_flag=True, help="Read the new secret from stdin's first line.")
@pass_context
def rotate(ctx: Context, name: str, secret_stdin: bool) -> None:
    """Replace a credential's secret; agents keep working with no change on their side."""
    client = ctx.client
    client.get_credential(name)  # fail on a wrong name, or a locked vault, before asking for the secret
    client.require_state("unlocked")
    secret = read_secret("new secret", secret_stdin, max_bytes=MAX_SECRET_BYTES)
    client.call(client.credentials.RotateCredential, pb.RotateCredentialRequest(name=name, secret=secret))
    click.echo(f"Rotated credential {name!r}.")


@command.command("remove")
@click.argument("name")
@click.option("--id", "by_id", is_flag=True, help="NAME is the id of a row that fails authentication (doctor).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_context
def remove(ctx: Context, name: str, by_id: bool, yes: bool) -> None:
    """Delete a credential and every grant of it."""
    client = ctx.client
    if not by_id:
        client.get_credential(name)
    what = f"the credential row with id {name!r}" if by_id else f"credential {name!r}"
    confirm_destructive(f"Remove {what} and its grants?", yes)
    reply = client.call(client.credentials.RemoveCredential, pb.RemoveCredentialRequest(name=name, by_id=by_id))
    click.echo(f"Removed {what} ({reply.grants_removed} grants removed).")


@command.command("adopt")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--passphrase-stdin", is_flag=True, help="Read the vault's passphrase, which adopting needs, from stdin.")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON; with --yes, adopt it and print it.")
@pass_context
def adopt(ctx: Context, yes: bool, passphrase_stdin: bool, as_json: bool) -> None:
    """Serve what an older aegisd wrote: its credentials, agents and grants, exactly as listed.

    Until then the gate serves none of them. Read the list: anything edited into vault.db (or into a
    backup) is adopted along with it. Adopting needs the vault's passphrase (asked for on a terminal).
    """
    client = ctx.client
    listed = client.call(client.vault.Adopt, vault_pb2.AdoptRequest(dry_run=True))
    empty = not (listed.credentials or listed.agents or listed.grants)
    if as_json and (empty or not yes):
        output.emit_json(_adopt_json(listed))
        return
    if empty:
        click.echo("Nothing to adopt: everything in the vault was written by this aegisd.")
        return
    if not as_json:
        _show_older(listed)
    confirm_destructive("Adopt all of it as listed?", yes)
    passphrase = (read_secret("passphrase", passphrase_stdin, flag="--passphrase-stdin")
                  if passphrase_stdin or on_terminal() else "")  # none: aegisd says it is needed, and how
    done = client.call(client.vault.Adopt, vault_pb2.AdoptRequest(digest=listed.digest, passphrase=passphrase),
                       timeout=120)
    if as_json:
        output.emit_json(_adopt_json(done))
    else:
        click.echo(f"Adopted {len(done.credentials)} credentials, {len(done.agents)} agents and "
                   f"{len(done.grants)} grants.")


def _show_older(listed: vault_pb2.AdoptResponse) -> None:
    click.echo("An older aegisd wrote these; the gate serves none of them until they are adopted:")
    for c in listed.credentials:
        auth = {"header": f"header {c.header_name}", "query": f"query {c.query_param}"}.get(c.auth_type, c.auth_type)
        extra = "".join([f"  rate {c.rate_limit}" if c.rate_limit else "",
                         f"  expires {output.iso_ms(c.expires_at_ms)}" if c.expires_at_ms else ""])
        line = (f"  credential {c.name}  service {c.service}  hosts {', '.join(c.domains)}  auth {auth}  "
                f"scopes {','.join(c.scopes)}  inspection {c.body_inspection}{extra}")
        click.echo(output.printable(line))
    for a in listed.agents:
        click.echo(output.printable(f"  agent {a.name}" + (f"  rate {a.rate_limit}" if a.rate_limit else "")))
    for g in listed.grants:
        click.echo(output.printable(f"  grant {g.agent} -> {g.credential}"))
    if listed.mixed:
        click.echo("Warning: this vault also holds rows this aegisd wrote. Unless you are adopting a vault you just "
                   "upgraded, the rows above were edited into vault.db: do not adopt them.")
    if listed.agents:
        click.echo("Adopted agents keep their tokens: once adopted, remove and add again any agent you doubt.")


def _adopt_json(reply: vault_pb2.AdoptResponse) -> dict[str, Any]:
    return {"credentials": [{"name": c.name, "service": c.service, "domains": list(c.domains),
                             "auth_type": c.auth_type, "header_name": c.header_name or None,
                             "query_param": c.query_param or None, "scopes": list(c.scopes),
                             "rate_limit": c.rate_limit or None, "body_inspection": c.body_inspection,
                             "expires_at": output.iso_ms(c.expires_at_ms) if c.expires_at_ms else None}
                            for c in reply.credentials],
            "agents": [{"name": a.name, "rate_limit": a.rate_limit or None} for a in reply.agents],
            "grants": [{"agent": g.agent, "credential": g.credential} for g in reply.grants],
            "mixed": reply.mixed, "adopted": reply.adopted}
