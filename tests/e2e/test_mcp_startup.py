"""The MCP bridge's start and configuration: no valid token, no bridge; each host's snippet works.

`aegisctl mcp serve` checks its token with the gate before it serves anything and exits with a
clear message when it cannot act as its agent. `aegisctl mcp config HOST` prints an entry in that
host's own format which, run exactly as written, starts a working bridge.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from mcp.client.stdio import StdioServerParameters

from tests.e2e.gate_support import GateWorld
from tests.e2e.mcp_support import Bridge, bridge_env, error_of, value_of, write_token_file
from tests.harness import AEGISCTL, Aegis, free_port

SECRET = "mcpStartupSecret-0123456789abcdefABCDEF"
FAKE_TOKEN = "aegis_" + "T" * 43  # never registered: only config output is checked with it


@pytest.fixture
def world() -> Iterator[GateWorld]:
    instance = GateWorld.start()
    yield instance
    instance.close()


def serve(world: GateWorld, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`aegisctl mcp serve` with stdin closed: a bridge that starts serves nothing and exits 0."""
    full_env = {**bridge_env(world.aegis.gate_url), **(env or {})}
    result = subprocess.run([AEGISCTL, "mcp", "serve", *args], env=full_env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60, check=False)
    world.received.extend([result.stdout, result.stderr])
    return result


def test_serve_refuses_to_start_without_a_valid_token(world: GateWorld) -> None:
    root = world.aegis.root
    old = world.agent("bot")
    new = world.regenerate("bot")
    good = str(write_token_file(root / "good.token", new))
    cases: list[tuple[list[str], dict[str, str], int, list[str]]] = [
        ([], {}, 2, ["no agent token", "AEGIS_AGENT_TOKEN", "--token-file", "aegisctl agent add"]),
        (["--token-file", str(write_token_file(root / "stale.token", old))], {}, 1,
         ["the agent token was refused by the gate", "agent_auth_invalid", "aegisctl agent regenerate"]),
        ([], {"AEGIS_AGENT_TOKEN": FAKE_TOKEN}, 1, ["the agent token was refused by the gate"]),
        ([], {"AEGIS_AGENT_TOKEN": "two words"}, 1, ["characters an HTTP header cannot carry"]),
        (["--token-file", str(write_token_file(root / "loose.token", new, 0o644))], {}, 1,
         ["accessible by group or others (mode 0644)", f"chmod 600 {root / 'loose.token'}"]),
        (["--token-file", str(root / "missing.token")], {}, 1, ["does not exist", "umask 077"]),
        (["--token-file", str(write_token_file(root / "two.token", f"{new}\n{new}"))], {}, 1, ["alone on one line"]),
        (["--token-file", good, "--gate-url", f"http://127.0.0.1:{free_port()}"], {}, 1,
         ["cannot reach the Aegis gate", "is aegisd running", "or aegisd listens elsewhere: see `aegisctl status`, "
          "and pass --gate-url or AEGIS_GATE_URL"]),
        (["--token-file", good, "--gate-url", "ftp://127.0.0.1"], {}, 2, ["not a plain http(s)://HOST:PORT"]),
        (["--token-file", good, "--transport", "http", "--listen", "0.0.0.0:3300"], {}, 2, ["loopback only"]),
        (["--token-file", good, "--listen", "127.0.0.1:3300"], {}, 2, ["--transport http only"]),
    ]
    for args, env, code, needles in cases:
        result = serve(world, *args, env=env)
        assert result.returncode == code, (args, result.stderr)
        assert result.stdout == "" and "Traceback" not in result.stderr, result.stderr
        for needle in needles:
            assert needle in result.stderr, (args, needle, result.stderr)

    # The valid token: the bridge starts, names its agent, and ends when the host closes stdin.
    started = serve(world, "--token-file", good)
    assert started.returncode == 0 and "serving agent 'bot' over stdio" in started.stderr, started.stderr
    flag_over_env = serve(world, "--token-file", good, env={"AEGIS_AGENT_TOKEN": FAKE_TOKEN})
    assert flag_over_env.returncode == 0, flag_over_env.stderr
    world.assert_no_leaks()


def test_config_snippet_starts_a_bridge_that_waits_for_unlock(world: GateWorld) -> None:
    up = world.upstream()
    world.credential("api", SECRET, up.entry())
    token_file = write_token_file(world.aegis.root / "bot.token", world.agent("bot", "api"))
    printed = world.aegis.ctl("mcp", "config", "cursor", "--agent", "bot", "--token-file", str(token_file)).ok()
    entry = json.loads(printed.out)["mcpServers"]["aegis-bot"]
    assert entry == {"command": AEGISCTL, "args": ["mcp", "serve", "--token-file", str(token_file)],
                     "env": {"AEGIS_GATE_URL": world.aegis.gate_url}}
    # Found by a new user: with AEGIS_GATE_LISTEN unset (or saying something else), the gate was assumed at
    # 127.0.0.1:3100 although the running aegisd, whose control socket answers, listens elsewhere. It is asked now.
    for listen in ("", "127.0.0.1:1"):
        asked = world.aegis.ctl("mcp", "config", "cursor", "--agent", "bot", "--token-file", str(token_file),
                                env={"AEGIS_GATE_LISTEN": listen}).ok()
        assert json.loads(asked.out)["mcpServers"]["aegis-bot"] == entry, asked.out
        assert "assumed" not in asked.err and f"the gate is at {world.aegis.gate_url}, where the running aegisd " \
            "listens" in asked.err, asked.err
        assert ("not at http://127.0.0.1:1, where AEGIS_GATE_LISTEN" in asked.err) == bool(listen), asked.err
    # ... and the HTTP bridge's command line says where the gate is, as the stdio entries do.
    http = world.aegis.ctl("mcp", "config", "cursor", "--agent", "bot", "--token-file", str(token_file),
                           "--transport", "http", "--listen", f"127.0.0.1:{free_port()}",
                           env={"AEGIS_GATE_LISTEN": ""}).ok()
    world.aegis.outputs.remove(http.out)  # it holds the bridge's own MCP bearer, by design
    run_line = next(line for line in http.err.splitlines() if "run the bridge with:" in line)
    assert shlex.split(run_line.partition("run the bridge with: ")[2])[-2:] == ["--gate-url", world.aegis.gate_url]
    world.aegis.ctl("lock").ok()
    bridge = Bridge(world.aegis.gate_url, token_file, world.aegis.root / "bridge.err")
    params = StdioServerParameters(command=entry["command"], args=entry["args"], env=entry["env"])

    async def scenario() -> None:
        async with bridge.stdio(params) as session:
            health = value_of(await bridge.call(session, "aegis_health"))
            assert (health["vault"], health["agent"], health["agent_token"]) == ("locked", None, "unchecked")
            error_of(await bridge.call(session, "aegis_list_services"), "vault_locked")
            locked = error_of(await bridge.call(session, "aegis_proxy_request", service="api", path="/echo/x"),
                              "vault_locked")
            assert locked["status"] == 503
            world.unlock()
            health = value_of(await bridge.call(session, "aegis_health"))
            assert (health["vault"], health["agent"], health["agent_token"]) == ("unlocked", "bot", "valid")
            got = value_of(await bridge.call(session, "aegis_proxy_request", service="api", path="/echo/x"))
            assert got["status"] == 200

    anyio.run(scenario)
    assert "the vault is locked" in bridge.stderr()
    assert up.requests_to("/echo/x")[-1].header("Authorization") == [f"Bearer {SECRET}"]
    world.assert_no_leaks(extra=bridge.outputs())


def test_config_snippet_for_each_host(fresh: Aegis) -> None:
    env = {"AEGIS_GATE_LISTEN": "127.0.0.1:4100"}
    url = "http://127.0.0.1:4100"
    token_file = write_token_file(fresh.root / "bot.token", FAKE_TOKEN)
    with_file = ["--agent", "bot", "--token-file", str(token_file)]
    entry = {"command": AEGISCTL, "args": ["mcp", "serve", "--token-file", str(token_file)],
             "env": {"AEGIS_GATE_URL": url}}
    assert Path(AEGISCTL).is_absolute()
    for host, where in (("claude", "claude_desktop_config.json"), ("cursor", ".cursor/mcp.json"),
                        ("windsurf", "windsurf/mcp_config.json"), ("cline", "cline_mcp_settings.json")):
        result = fresh.ctl("mcp", "config", host, *with_file, env=env).ok()
        expected = {**entry, "disabled": False, "autoApprove": []} if host == "cline" else entry
        assert json.loads(result.out) == {"mcpServers": {"aegis-bot": expected}}, (host, result.out)
        assert where in result.err, result.err

    vscode = fresh.ctl("mcp", "config", "vscode", "--token-file", str(token_file), env=env).ok()
    assert json.loads(vscode.out) == {"servers": {"aegis": {"type": "stdio", **entry}}}
    prompted = json.loads(fresh.ctl("mcp", "config", "vscode", env=env).ok().out)
    assert prompted["servers"]["aegis"]["env"] == {"AEGIS_GATE_URL": url,
                                                   "AEGIS_AGENT_TOKEN": "${input:aegis-agent-token}"}
    assert prompted["inputs"][0]["id"] == "aegis-agent-token" and prompted["inputs"][0]["password"] is True

    command = fresh.ctl("mcp", "config", "claude-code", *with_file, env=env).ok()
    assert shlex.split(command.out) == ["claude", "mcp", "add", "--transport", "stdio", "--env",
                                        f"AEGIS_GATE_URL={url}", "aegis-bot", "--", AEGISCTL, "mcp", "serve",
                                        "--token-file", str(token_file)]
    placeholder = json.loads(fresh.ctl("mcp", "config", "claude", "--agent", "bot", env=env).ok().out)
    assert placeholder["mcpServers"]["aegis-bot"]["env"]["AEGIS_AGENT_TOKEN"] == (
        "<paste the token from `aegisctl agent add bot`>")
    gate_url_env = json.loads(fresh.ctl("mcp", "config", "windsurf", env={"AEGIS_GATE_URL": "http://localhost:5000/"}).ok().out)
    assert gate_url_env["mcpServers"]["aegis"]["env"]["AEGIS_GATE_URL"] == "http://localhost:5000"

    assert "assumed" not in command.err  # the listen address came from the environment
    # Nothing says where the gate listens: the default is written, and the operator told so.
    guessed = fresh.ctl("mcp", "config", "cursor", "--agent", "bot", env={"AEGIS_GATE_LISTEN": ""}).ok()
    assert json.loads(guessed.out)["mcpServers"]["aegis-bot"]["env"]["AEGIS_GATE_URL"] == "http://127.0.0.1:3100"
    assert "assumed at http://127.0.0.1:3100, the default" in guessed.err and "--gate-url" in guessed.err

    token_file.chmod(0o640)
    loose = fresh.ctl("mcp", "config", "cursor", "--token-file", str(token_file), env=env).ok()
    assert "warning" in loose.err and "chmod 600" in loose.err
    assert fresh.ctl("mcp", "config", "emacs").code == 2
    bad_agent = fresh.ctl("mcp", "config", "cursor", "--agent", "Not Valid")
    assert bad_agent.code == 2 and "--agent" in bad_agent.err
    fresh.assert_no_leaks([FAKE_TOKEN])
