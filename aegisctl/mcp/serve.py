"""`aegisctl mcp serve`: check the token with the gate, then serve MCP over stdio or streamable HTTP.

A bridge that cannot act as its agent refuses to start, so the AI host shows a failed server
with a reason instead of tools that fail on every call. The one exception is a locked vault:
the gate cannot check any token then, the operator's `aegisctl unlock` fixes it, and the tools
report `vault_locked` until it does.
"""

from __future__ import annotations

import sys

import anyio

from aegisctl.mcp.gate_client import BridgeError, GateClient
from aegisctl.mcp.gate_trust import GateTrust
from aegisctl.mcp.settings import BridgeSettings, HttpListen


class StartupError(Exception):
    """The bridge must not start; `message` and `hint` say why and what to do."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def run(settings: BridgeSettings, listen: HttpListen | None) -> None:
    """Serve until the host closes stdin (stdio) or the process is signalled (HTTP)."""
    anyio.run(_main, settings, listen)


async def _main(settings: BridgeSettings, listen: HttpListen | None) -> None:
    trust = GateTrust(settings.config_path)
    async with GateClient(settings.gate_url, settings.token, settings.timeouts.gate, settings.timeouts.read,
                          trust) as gate:
        agent = await check_agent(gate)
        # The MCP SDK loads only now: a bridge that refuses to start answers without that second.
        from aegisctl.mcp import transports

        if listen is None:
            say(f"serving agent {agent} over stdio (gate {settings.gate_url})")
            await transports.serve_stdio(gate)
            return

        if listen.created:
            say(f"created this bridge's MCP bearer in {listen.bearer_file} (kept for later starts); "
                "`aegisctl mcp config HOST --transport http` prints a host's entry with it")

        def ready(url: str) -> None:
            say(f"serving agent {agent} at {url} (gate {settings.gate_url}); clients must send "
                f"Authorization: Bearer <the MCP bearer in {listen.bearer_file}>, never the agent token")

        try:
            await transports.serve_http(gate, listen.bearer, listen.host, listen.port, ready)
        except transports.ListenError as exc:
            raise StartupError(str(exc), "choose another --listen port") from None


async def check_agent(gate: GateClient) -> str:
    """The agent's name as the gate knows it, or a StartupError; a locked vault only warns."""
    try:
        reply = await gate.operator("services")
    except BridgeError as exc:
        if exc.code == "gate_untrusted":
            raise StartupError(exc.message, "stop whatever holds the gate's port (`ss -ltnp` shows it) and start "
                               "aegisd; if aegisd itself runs as that user, check that AEGIS_SOCKET or AEGIS_CONFIG "
                               "names its control socket, or run the bridge as that user") from None
        if exc.code == "gate_unreachable":  # the bridge cannot ask aegisd where its gate is: the operator can
            raise StartupError(exc.message, "start aegisd; or aegisd listens elsewhere: see `aegisctl status`, and "
                               "pass --gate-url or AEGIS_GATE_URL") from None
        raise StartupError(exc.message, "start aegisd, or point AEGIS_GATE_URL (or --gate-url) at its gate") from None
    refusal = reply.refusal
    if refusal is None:
        return repr(reply.document.get("agent"))
    if refusal.status == 401:
        raise StartupError(f"the agent token was refused by the gate ({refusal.code}): it is unknown, or the "
                           "agent was removed or its token regenerated",
                           "issue a token with `aegisctl agent add NAME` (or `aegisctl agent regenerate NAME`) "
                           "and give it to the bridge")
    if refusal.code == "vault_locked":
        say("warning: the vault is locked, so the gate cannot check the agent token yet; tools answer "
            "vault_locked until an operator runs `aegisctl unlock`")
        return "(unchecked: vault locked)"
    raise StartupError(f"the gate refused the token check: {refusal.code}: {refusal.message}")


def say(line: str) -> None:
    """Status for the operator on stderr; stdout belongs to the MCP protocol under stdio."""
    print(f"aegisctl mcp: {line}", file=sys.stderr, flush=True)
