"""Drive `aegisctl mcp serve` with the official MCP client, over stdio or streamable HTTP.

Every tool result and everything the bridge printed on stderr is kept, so a test can hand them
all to `assert_no_leaks`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, TextContent

from tests.harness import AEGISCTL, free_port

READY_TIMEOUT = 30.0


def write_token_file(path: Path, token: str, mode: int = 0o600) -> Path:
    path.write_text(token + "\n")
    path.chmod(mode)
    return path


@dataclass
class Bridge:
    """One `aegisctl mcp serve` as an AI host would run it, and every tool result it returned."""

    gate_url: str
    token_file: Path
    stderr_path: Path
    results: list[str] = field(default_factory=list)
    http_port: int = 0

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def outputs(self) -> list[str]:
        """All the bridge said: tool results and its stderr."""
        return [*self.results, self.stderr()]

    async def call(self, session: ClientSession, tool: str, **arguments: Any) -> CallToolResult:
        result = await session.call_tool(tool, arguments)
        self.results.append(result.model_dump_json())
        return result

    @contextlib.asynccontextmanager
    async def stdio(self, params: StdioServerParameters | None = None) -> AsyncIterator[ClientSession]:
        """A session with a bridge the client starts, as a host would (by default with --token-file)."""
        params = params or StdioServerParameters(
            command=AEGISCTL, args=["mcp", "serve", "--token-file", str(self.token_file)],
            env={"AEGIS_GATE_URL": self.gate_url})
        with self.stderr_path.open("a") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                yield session

    @contextlib.asynccontextmanager
    async def http(self) -> AsyncIterator[ClientSession]:
        """A session with an HTTP bridge, authenticated by the bridge's own MCP bearer (never the agent token)."""
        proc = self.start_http()
        try:
            headers = {"Authorization": f"Bearer {self.bearer()}"}
            async with (httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300)) as client,
                        streamable_http_client(self.http_url, http_client=client) as (read, write),
                        ClientSession(read, write) as session):
                await session.initialize()
                yield session
        finally:
            proc.terminate()
            proc.wait(15)

    def bearer(self) -> str:
        """The HTTP transport's bearer, kept beside the token file."""
        return self.token_file.with_name(self.token_file.name + ".mcp-bearer").read_text().strip()

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/mcp"

    def start_http(self, port: int = 0) -> subprocess.Popen[bytes]:
        """Start the HTTP bridge and wait until it says it is listening (or fail with its stderr)."""
        self.http_port = port or free_port()
        already = self.stderr().count("serving agent")
        errlog = self.stderr_path.open("ab")
        proc = subprocess.Popen(
            [AEGISCTL, "mcp", "serve", "--transport", "http", "--listen", f"127.0.0.1:{self.http_port}",
             "--token-file", str(self.token_file)],
            env=bridge_env(self.gate_url), stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog)
        errlog.close()
        deadline = time.monotonic() + READY_TIMEOUT
        while self.stderr().count("serving agent") == already:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"the HTTP bridge did not start (exit {proc.poll()}):\n{self.stderr()}")
            time.sleep(0.05)
        return proc


def bridge_env(gate_url: str) -> dict[str, str]:
    """A host-like environment: PATH and HOME, the gate URL, and no other AEGIS_ variable."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    env["AEGIS_GATE_URL"] = gate_url
    return env


def text_of(result: CallToolResult) -> str:
    block = result.content[0]
    assert isinstance(block, TextContent), result
    return block.text


def value_of(result: CallToolResult) -> dict[str, Any]:
    """The structured content of a successful call, checked against its JSON text."""
    assert not result.is_error, text_of(result)
    assert isinstance(result.structured_content, dict), result
    assert json.loads(text_of(result)) == result.structured_content
    return result.structured_content


def error_of(result: CallToolResult, code: str) -> dict[str, Any]:
    """The error of a refused call: isError, text `code: message`, structured {"error": {...}}."""
    assert result.is_error, text_of(result)
    assert isinstance(result.structured_content, dict), result
    error = result.structured_content["error"]
    assert error["code"] == code, error
    assert text_of(result).startswith(f"{code}: {error['message']}"), text_of(result)
    return dict(error)
