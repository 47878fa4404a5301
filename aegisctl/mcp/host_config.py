"""`aegisctl mcp config HOST`: the bridge's entry in each AI host's own configuration format.

The snippet names the absolute path of this aegisctl, `mcp serve`, and the gate URL. With
`--token-file` (preferred) it holds only that path, and VS Code's entry asks for the token with a
password prompt; otherwise it holds a placeholder the user replaces with the token itself, so that
host config then holds the token and must never be a file shared with a repository: the hints say
where to put it accordingly. Nothing else in it is secret.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOSTS = ("claude", "claude-code", "cursor", "vscode", "cline", "windsurf")
VSCODE_INPUT = "aegis-agent-token"

WHERE = {
    "claude": "Claude Desktop: merge into claude_desktop_config.json (Settings > Developer > Edit Config; macOS "
              "~/Library/Application Support/Claude/, Windows %APPDATA%\\Claude\\), then restart Claude Desktop.",
    "claude-code": "Claude Code: run this command (add --scope user for every project, or --scope project to "
                   "share it in .mcp.json: it holds only the token file's path), then check it with `claude mcp list`.",
    "cursor": "Cursor: merge into .cursor/mcp.json in the project, or ~/.cursor/mcp.json for every project.",
    "vscode": "VS Code: merge into .vscode/mcp.json in the workspace (or run `MCP: Open User Configuration`).",
    "cline": "Cline: merge into cline_mcp_settings.json (MCP Servers > Configure > Configure MCP Servers).",
    "windsurf": "Windsurf: merge into ~/.codeium/windsurf/mcp_config.json (Settings > Cascade > MCP servers).",
}
# Without --token-file the entry will hold the token itself: never a project's file, shared with a repository.
PASTE = "replace the placeholder with the token and "
WHERE_WITH_TOKEN = {
    "claude": f"Claude Desktop: {PASTE}{WHERE['claude'].removeprefix('Claude Desktop: ')}",
    "claude-code": f"Claude Code: {PASTE}run this command (it then sits in your shell history too; add --scope user "
                   "for every project, never --scope project, whose .mcp.json would hold the token), then check it "
                   "with `claude mcp list`.",
    "cursor": f"Cursor: {PASTE}merge into ~/.cursor/mcp.json, never a project's .cursor/mcp.json, which would hold "
              "the token.",
    "vscode": WHERE["vscode"],  # the entry asks for the token; VS Code keeps it in its secret storage
    "cline": f"Cline: {PASTE}{WHERE['cline'].removeprefix('Cline: ')}",
    "windsurf": f"Windsurf: {PASTE}{WHERE['windsurf'].removeprefix('Windsurf: ')}",
}


# --transport http: hosts that connect to a bridge already running. Claude Desktop takes remote servers only as
# connectors in its settings, so it gets its stdio entry only.
HTTP_HOSTS = ("claude-code", "cursor", "vscode", "cline", "windsurf")
VSCODE_BEARER_INPUT = "aegis-mcp-bearer"
KEEP_PRIVATE = ("the entry holds the bridge's MCP bearer, which opens this bridge (never the gate) while it runs: "
                "keep that file private, and out of any repository")
WHERE_HTTP = {
    "claude-code": "Claude Code: run this command; the shell reads the bearer from its file, and Claude Code keeps it "
                   "in its config (add --scope user for every project, never --scope project: .mcp.json would hold "
                   "the bearer). Check it with `claude mcp list`.",
    "cursor": f"Cursor: merge into ~/.cursor/mcp.json; {KEEP_PRIVATE}.",
    "vscode": "VS Code: merge into .vscode/mcp.json (or `MCP: Open User Configuration`); VS Code asks once for the "
              "bearer, the one line of the bearer file, and keeps it in its secret storage.",
    "cline": f"Cline: merge into cline_mcp_settings.json (MCP Servers > Configure > Configure MCP Servers); "
             f"{KEEP_PRIVATE}.",
    "windsurf": f"Windsurf: merge into ~/.codeium/windsurf/mcp_config.json; {KEEP_PRIVATE}.",
}


@dataclass(frozen=True)
class HttpEntry:
    """How a host reaches a bridge running with --transport http."""

    server_name: str
    url: str
    bearer: str
    bearer_file: str

    def __repr__(self) -> str:
        return f"HttpEntry(server_name={self.server_name!r}, url={self.url!r}, bearer=<hidden>)"


def http_url(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/mcp"


def render_http(host: str, entry: HttpEntry) -> str:
    """The entry for a host connecting over streamable HTTP, with the bridge's own bearer (never the agent token)."""
    header = {"Authorization": f"Bearer {entry.bearer}"}
    if host == "claude-code":
        words = ["claude", "mcp", "add", "--transport", "http", entry.server_name, entry.url]
        # The shell reads the file: the bearer is not printed, nor kept in the shell's history.
        return (" ".join(shlex.quote(word) for word in words)
                + f' --header "Authorization: Bearer $(cat {shlex.quote(entry.bearer_file)})"')
    if host == "vscode":
        doc = {"servers": {entry.server_name: {"type": "http", "url": entry.url, "headers": {
                   "Authorization": "Bearer ${input:" + VSCODE_BEARER_INPUT + "}"}}},
               "inputs": [{"type": "promptString", "id": VSCODE_BEARER_INPUT, "password": True,
                           "description": f"Aegis MCP bridge bearer (the line in {entry.bearer_file})"}]}
        return json.dumps(doc, indent=2)
    if host == "cline":
        server: dict[str, Any] = {"type": "streamableHttp", "url": entry.url, "headers": header,
                                  "disabled": False, "autoApprove": []}
    elif host == "windsurf":
        server = {"serverUrl": entry.url, "headers": header}
    else:
        server = {"url": entry.url, "headers": header}
    return json.dumps({"mcpServers": {entry.server_name: server}}, indent=2)


def where(host: str, bridge: Bridge) -> str:
    """Where the snippet goes, and, without a token file, what the file will then hold."""
    return (WHERE if bridge.token_file else WHERE_WITH_TOKEN)[host]


@dataclass(frozen=True)
class Bridge:
    """How a host starts the bridge."""

    command: str
    gate_url: str
    token_file: str | None
    agent: str | None

    @property
    def server_name(self) -> str:
        return f"aegis-{self.agent}" if self.agent else "aegis"

    @property
    def args(self) -> list[str]:
        return ["mcp", "serve", *(["--token-file", self.token_file] if self.token_file else [])]

    @property
    def placeholder(self) -> str:
        return f"<paste the token from `aegisctl agent add {self.agent or 'NAME'}`>"

    def env(self, token_reference: str) -> dict[str, str]:
        env = {"AEGIS_GATE_URL": self.gate_url}
        if not self.token_file:
            env["AEGIS_AGENT_TOKEN"] = token_reference
        return env

    def stdio_entry(self, token_reference: str | None = None) -> dict[str, Any]:
        return {"command": self.command, "args": self.args, "env": self.env(token_reference or self.placeholder)}


def aegisctl_executable() -> str:
    """The absolute path of the aegisctl running now, so the host starts this same installation."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "aegisctl" and argv0.is_file():
        return str(argv0.absolute())
    found = shutil.which("aegisctl")
    return str(Path(found).absolute()) if found else str(Path(sys.executable).parent / "aegisctl")


def render(host: str, bridge: Bridge) -> str:
    """The snippet for `host`, ready to paste (JSON) or run (Claude Code's command)."""
    if host == "claude-code":
        return _claude_code(bridge)
    if host == "vscode":
        entry = {"type": "stdio", **bridge.stdio_entry("${input:" + VSCODE_INPUT + "}")}
        doc: dict[str, Any] = {"servers": {bridge.server_name: entry}}
        if not bridge.token_file:
            doc["inputs"] = [{"type": "promptString", "id": VSCODE_INPUT, "password": True,
                              "description": f"Aegis agent token (from `aegisctl agent add {bridge.agent or 'NAME'}`)"}]
        return json.dumps(doc, indent=2)
    entry = bridge.stdio_entry()
    if host == "cline":
        entry.update({"disabled": False, "autoApprove": []})
    return json.dumps({"mcpServers": {bridge.server_name: entry}}, indent=2)


def _claude_code(bridge: Bridge) -> str:
    words = ["claude", "mcp", "add", "--transport", "stdio"]
    for name, value in bridge.env(bridge.placeholder).items():
        words += ["--env", f"{name}={value}"]
    words += [bridge.server_name, "--", bridge.command, *bridge.args]
    return " ".join(shlex.quote(word) for word in words)
