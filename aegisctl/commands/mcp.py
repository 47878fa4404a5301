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
DEFAULT_GATE_URL = "http://" + settings.DEFAULT_GATE_LISTEN
RUNNING_GATE_TIMEOUT = 5.0  # seconds for aegisd's Status answer to `mcp config`


def token_file_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), metavar="PATH",
                        help=help_text)


def gate_url_option(default: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--gate-url", metavar="URL", help=f"The gate [default: $AEGIS_GATE_URL, else {default}].")


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
@gate_url_option("http:// + $AEGIS_GATE_LISTEN")
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
@gate_url_option("where the running aegisd says, else http:// + $AEGIS_GATE_LISTEN")
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
    if transport == "http" and host not in host_config.HTTP_HOSTS:
        raise click.UsageError("Claude Desktop takes remote MCP servers only as connectors in its own settings: "
                               "use its stdio entry (without --transport http)")
    config_path = ctx.find_root().params.get("config")
    # Unless told the gate's URL, ask the running aegisd where its gate listens, as `aegisctl status` does.
    running, unasked = (None, "") if gate_url or os.environ.get("AEGIS_GATE_URL") else _running_gate(ctx)
    try:
        url = settings.gate_url(gate_url, os.environ, config_path, running)
    except SettingsError as exc:
        _settings_failed(exc)
    if transport == "http":
        _config_http(host, agent, token_file, listen, bearer_file, url)
        _gate_note(url, gate_url, running, unasked, config_path)
        return
    absolute = token_file.expanduser().absolute() if token_file is not None else None
    bridge = host_config.Bridge(host_config.aegisctl_executable(), url, str(absolute) if absolute else None, agent)
    click.echo(host_config.render(host, bridge))
    click.echo(f"aegisctl: {host_config.where(host, bridge)}", err=True)
    _gate_note(url, gate_url, running, unasked, config_path)
    if absolute is None:
        if host != "vscode":
            click.echo("aegisctl: note: without --token-file this host's config will hold the agent token itself; "
                       "--token-file PATH keeps only the file's path there.", err=True)
        return
    _warn_token_file(absolute)


def _running_gate(ctx: click.Context) -> tuple[str | None, str]:
    """The gate address the running aegisd reports (`aegisctl status` shows it), or None and why it could not be
    asked. Only `config` asks, as the operator; `serve` runs as the agent, which may have no access to the control
    socket. Imported here: the bridge's modules load nothing from aegisd, and aegisctl.client loads its API."""
    from aegisctl.client import AegisClient, ClientError
    from aegisctl.paths import PathError, resolve_socket

    root = ctx.find_root().params
    try:
        with AegisClient(resolve_socket(root.get("socket_flag"), root.get("config")), RUNNING_GATE_TIMEOUT) as client:
            return client.status().gate_address or None, "it did not say"
    except PathError as exc:
        return None, str(exc)
    except ClientError as exc:
        return None, exc.message


def _gate_note(url: str, flag: str | None, running: str | None, unasked: str, config_path: str | None) -> None:
    """Say on stderr where the gate URL came from when aegisctl, rather than the operator, chose it."""
    try:
        assumed = settings.gate_url_is_default(flag, os.environ, config_path)
        configured = None if assumed or not running else settings.gate_url(flag, os.environ, config_path)
    except SettingsError:  # the config file aegisd's own answer made unnecessary to read
        assumed, configured = False, None
    if running:
        elsewhere = (f"; not at {configured}, where AEGIS_GATE_LISTEN or the config file says"
                     if configured and configured != url else "")
        click.echo(f"aegisctl: the gate is at {url}, where the running aegisd listens (`aegisctl status`)"
                   f"{elsewhere}", err=True)
    elif assumed:
        click.echo(output.printable(
            f"aegisctl: the gate is assumed at {url}, the default, as aegisd could not be asked ({unasked}); if "
            "aegisd listens elsewhere (`aegisctl status` shows where), pass --gate-url"), err=True)


def _config_http(host: str, agent: str | None, token_file: Path | None, listen: str | None,
                 bearer_file: Path | None, url: str) -> None:
    """The entry of a host connecting to `mcp serve --transport http`, and how to run that bridge."""
    try:
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
    if url != DEFAULT_GATE_URL:  # the bridge would assume the default, perhaps in another environment
        words += ["--gate-url", url]
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
