"""The HTTP transport's own bearer: random, kept 0600 beside the token file, never the agent token's shape."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aegisctl.mcp.settings import BEARER, SettingsError, bearer_path, mcp_bearer


def test_made_once_private_and_kept(tmp_path: Path) -> None:
    path = bearer_path(tmp_path / "bot.token", None)
    assert path == tmp_path / "bot.token.mcp-bearer"
    old = os.umask(0)
    try:
        bearer, created = mcp_bearer(path)
    finally:
        os.umask(old)
    assert created and BEARER.match(bearer) and not bearer.startswith("aegis_")  # the gate's token prefix
    assert path.stat().st_mode & 0o777 == 0o600 and path.read_text() == bearer + "\n"
    assert mcp_bearer(path) == (bearer, False)
    assert mcp_bearer(tmp_path / "other.mcp-bearer")[0] != bearer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bot.token.mcp-bearer", "other.mcp-bearer"]  # no leftovers


def test_an_explicit_file_and_no_file_at_all(tmp_path: Path) -> None:
    assert bearer_path(tmp_path / "t", tmp_path / "b") == tmp_path / "b"
    with pytest.raises(SettingsError) as caught:
        bearer_path(None, None)
    assert caught.value.usage and "--bearer-file" in caught.value.hint


@pytest.mark.parametrize(("content", "mode", "needle"), [
    ("aegis-mcp_" + "a" * 43 + "\n", 0o640, "accessible by group or others"),
    ("aegis_" + "a" * 43 + "\n", 0o600, "does not hold one aegis-mcp_"),
    ("aegis-mcp_short\n", 0o600, "does not hold one aegis-mcp_"),
    ("aegis-mcp_" + "a" * 43 + "\n" + "aegis-mcp_" + "b" * 43 + "\n", 0o600, "does not hold one aegis-mcp_"),
])
def test_a_file_that_is_not_a_private_bearer_is_refused(tmp_path: Path, content: str, mode: int, needle: str) -> None:
    path = tmp_path / "x.mcp-bearer"
    path.write_text(content)
    path.chmod(mode)
    with pytest.raises(SettingsError) as caught:
        mcp_bearer(path)
    assert needle in caught.value.message and "MCP bearer file" in caught.value.message
    assert path.read_text() == content  # never replaced behind the user's back


def test_a_missing_directory_says_so(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        mcp_bearer(tmp_path / "nowhere" / "x.mcp-bearer")
    assert "cannot create the MCP bearer file" in caught.value.message
