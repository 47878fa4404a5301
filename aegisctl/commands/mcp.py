"""`aegisctl mcp serve|config`: Aegis as an MCP server for Claude, Cursor, VS Code, Cline, Windsurf.

`serve` is an agent: it talks to the gate with an agent token and never to the control socket,
so it imports nothing from aegisd. The MCP SDK is imported only when `serve` runs, keeping every
other aegisctl command fast.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from aegisctl import output
from aegisctl.mcp import host_config, settings
from aegisctl.mcp.settings import SettingsError

AGENT_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")
DEFAULT_LISTEN = "127.0.0.1:3300"


def token_file_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), metavar="PATH",
                        help=help_text)


gate_url_option = click.option(
    "--gate-url", metavar="URL", help="The gate [default: $AEGIS_GATE_URL, else http:// + $AEGIS_GATE_LISTEN].")
transport_option = click.option(
    "--transport", type=click.Choice(["stdio", "http"]), default="stdio", show_default=True,
    help="stdio for a host that starts the bridge; http for streamable HTTP on --listen.")
listen_option = click.option("--listen", metavar="HOST:PORT",
                             help=f"Loopback address for --transport http [default: {DEFAULT_LISTEN}].")
bearer_file_option = click.option(
    "--bearer-file", type=click.Path(dir_okay=False, path_type=Path), metavar="PATH",
    help="For --transport http: the file keeping the bridge's own bearer, created 0600 if missing "
         f"[default: the token file's path + {settings.BEARER_SUFFIX}].")


def _http_only(transport: str, listen: str | None, bearer_file: Path | None) -> None:
    if transport != "http":
        for name, value in (("--listen", listen), ("--bearer-file", bearer_file)):
            if value is not None:
                raise click.UsageError(f"{name} applies to --transport http only")


def _http_listen(listen: str | None, token_file: Path | None, bearer_file: Path | None) -> settings.HttpListen:
    """The HTTP transport's address and bearer (made now if its file is missing); SettingsError if not."""
    host, port = settings.listen_address(listen or DEFAULT_LISTEN)
    path = settings.bearer_path(token_file, bearer_file)
    bearer, created = settings.mcp_bearer(path)
    return settings.HttpListen(host, port, bearer, path, created)


def _fail(message: str, hint: str = "", code: int = 1) -> NoReturn:
    click.echo(f"aegisctl: error: {output.printable(message)}", err=True)
    if hint:
        click.echo(f"  next: {output.printable(hint)}", err=True)
    sys.exit(code)


def _settings_failed(exc: SettingsError) -> NoReturn:
    _fail(exc.message, exc.hint, 2 if exc.usage else 1)


@click.group("mcp")
def command() -> None:
    """Serve Aegis to MCP hosts as an agent, and print their configuration."""


@command.command("serve")
@transport_option
@listen_option
@token_file_option("File holding the agent token alone, mode 0600 [default: $AEGIS_AGENT_TOKEN].")
@bearer_file_option
@gate_url_option
@click.pass_context
def serve(ctx: click.Context, transport: str, listen: str | None, token_file: Path | None,
          bearer_file: Path | None, gate_url: str | None) -> None:
    """Run the MCP bridge: tools aegis_proxy_request, aegis_list_services and aegis_health.

    Every call goes through the gate as this agent. Over HTTP, clients must send
    `Authorization: Bearer <the bridge's own MCP bearer>` (never the agent token) to
    http://HOST:PORT/mcp; `aegisctl mcp config HOST --transport http` prints a host's entry.
    """
    _http_only(transport, listen, bearer_file)
    config = ctx.find_root().params.get("config")
    try:
        bridge_settings = settings.load(token_file, gate_url, os.environ, config)
        address = _http_listen(listen, token_file, bearer_file) if transport == "http" else None
    except SettingsError as exc:
        _settings_failed(exc)
    from aegisctl.mcp.serve import StartupError, run

    try:
        run(bridge_settings, address)
    except StartupError as exc:
        _fail(exc.message, exc.hint)


@command.command("config")
@click.argument("host", type=click.Choice(host_config.HOSTS))
@click.option("--agent", metavar="NAME", help="The agent this host acts as: names the server entry and the token hint.")
@token_file_option("The token file the bridge will read (recommended: the config then holds no token).")
@gate_url_option
@transport_option
@listen_option
@bearer_file_option
@click.pass_context
def config(ctx: click.Context, host: str, agent: str | None, token_file: Path | None, gate_url: str | None,
           transport: str, listen: str | None, bearer_file: Path | None) -> None:
    """Print the bridge's entry in HOST's own MCP configuration format.

    With --token-file the snippet holds only that path; otherwise a placeholder you replace with
    the token itself, so the host's config then holds it (VS Code: a password prompt instead).
    With --transport http it connects to a bridge you run with `mcp serve --transport http`, and
    holds the bridge's own MCP bearer, never the agent token. Where to put it is printed on stderr.
    """
    if agent is not None and not AGENT_NAME.match(agent):
        raise click.BadParameter("1-64 characters of a-z, 0-9, '.', '_' or '-'", param_hint="--agent")
    _http_only(transport, listen, bearer_file)
    if transport == "http":
        _config_http(host, agent, token_file, listen, bearer_file, gate_url)
        return
    try:
        url = settings.gate_url(gate_url, os.environ, ctx.find_root().params.get("config"))
    except SettingsError as exc:
        _settings_failed(exc)
    absolute = token_file.expanduser().absolute() if token_file is not None else None
    bridge = host_config.Bridge(host_config.aegisctl_executable(), url, str(absolute) if absolute else None, agent)
    click.echo(host_config.render(host, bridge))
    click.echo(f"aegisctl: {host_config.where(host, bridge)}", err=True)
    if settings.gate_url_is_default(gate_url, os.environ, ctx.find_root().params.get("config")):
        click.echo(f"aegisctl: the gate is assumed at {url}, the default; if aegisd listens elsewhere "
                   "(`aegisctl status` shows where), pass --gate-url", err=True)
    if absolute is None:
        if host != "vscode":
            click.echo("aegisctl: note: without --token-file this host's config will hold the agent token itself; "
                       "--token-file PATH keeps only the file's path there.", err=True)
        return
    _warn_token_file(absolute)


def _config_http(host: str, agent: str | None, token_file: Path | None, listen: str | None,
                 bearer_file: Path | None, gate_url: str | None) -> None:
    """The entry of a host connecting to `mcp serve --transport http`, and how to run that bridge."""
    if host not in host_config.HTTP_HOSTS:
        raise click.UsageError("Claude Desktop takes remote MCP servers only as connectors in its own settings: "
                               "use its stdio entry (without --transport http)")
    try:
        if gate_url is not None:
            settings.gate_url(gate_url, os.environ)  # refused now rather than when the bridge starts
        http = _http_listen(listen, token_file, bearer_file)
    except SettingsError as exc:
        _settings_failed(exc)
    entry = host_config.HttpEntry(f"aegis-{agent}" if agent else "aegis", host_config.http_url(http.host, http.port),
                                  http.bearer, str(http.bearer_file))
    click.echo(host_config.render_http(host, entry))
    if http.created:
        click.echo(f"aegisctl: created the bridge's MCP bearer in {http.bearer_file} (mode 0600)", err=True)
    click.echo(f"aegisctl: {host_config.WHERE_HTTP[host]}", err=True)
    words = [host_config.aegisctl_executable(), "mcp", "serve", "--transport", "http", "--listen",
             listen or DEFAULT_LISTEN]
    if token_file is not None:
        words += ["--token-file", str(token_file.expanduser().absolute())]
    if bearer_file is not None:
        words += ["--bearer-file", str(http.bearer_file)]
    if gate_url is not None:
        words += ["--gate-url", gate_url]
    run = shlex.join(words) + ("" if token_file is not None else "  (with AEGIS_AGENT_TOKEN set)")
    click.echo(output.printable(f"aegisctl: run the bridge with: {run}"), err=True)
    if token_file is not None:
        _warn_token_file(token_file.expanduser().absolute())


def _warn_token_file(path: Path) -> None:
    try:
        settings.check_token_file(path)
    except SettingsError as exc:
        warning = f"aegisctl: warning: {exc.message}" + (f"; {exc.hint}" if exc.hint else "")
        click.echo(output.printable(warning), err=True)
