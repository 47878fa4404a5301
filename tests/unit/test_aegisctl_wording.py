"""What aegisctl prints for people, checked without a daemon: ledger rows whose path was never recorded, count
words in `ledger stats`, the advice for a control socket in a directory others can write, and `revoke` of a
grant that is not there. Found by a new user following the docs."""

from __future__ import annotations

import csv
import io
import os
import socket
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from aegisctl import ledger_export
from aegisctl.cli import root
from aegisctl.client import AegisClient, ClientError, _shared_directory_hint
from aegisctl.commands.ledger import record_json
from aegisctl.context import Context
from aegisd.api.aegis.v1 import ledger_pb2

# Refused before the target was split into service and path (here a Host header that is not loopback).
UNROUTED = ledger_pb2.LedgerRecord(id=2, time_ms=1_700_000_000_000, kind="request", method="GET",
                                   decision="denied", reason="host_not_allowed", status=403)
ROUTED = ledger_pb2.LedgerRecord(id=1, time_ms=1_700_000_000_000, kind="request", agent="bot", service="github",
                                 method="GET", path="/", decision="allowed", status=200)


class FakeClient:
    """Answers the ledger's calls with what it was given; for a revoke, raises the error it was given."""

    def __init__(self, replies: dict[str, Any] | None = None, error: ClientError | None = None) -> None:
        self.replies = replies or {}
        self.error = error
        self.ledger = self.agents = self

    def __getattr__(self, name: str) -> str:  # client.ledger.Stats, client.agents.Revoke: the call's name
        return name

    def call(self, method: str, request: object, timeout: float | None = None) -> Any:
        if self.error is not None:
            raise self.error
        return self.replies[method]

    def Follow(self, request: object) -> Iterable[ledger_pb2.LedgerRecord]:  # the RPC's name
        return self.replies["Follow"]  # type: ignore[no-any-return]

    def stream(self, responses: Iterable[Any]) -> Iterator[Any]:
        yield from responses

    def close(self) -> None:
        pass


def run(monkeypatch: pytest.MonkeyPatch, client: FakeClient, *args: str) -> Any:
    monkeypatch.setattr(Context, "client", property(lambda self: client))
    return CliRunner().invoke(root, list(args), catch_exceptions=False)


def test_a_row_without_a_recorded_path_does_not_show_a_request_for_slash(monkeypatch: pytest.MonkeyPatch) -> None:
    """`GET /` read as if the agent had asked for `/`: it is `(path not recorded)` in show and follow now, and
    still the empty string in JSON and CSV, which are data. A routed request to a service's root keeps its `/`."""
    listed = ledger_pb2.ListEntriesResponse(records=[UNROUTED, ROUTED])
    shown = run(monkeypatch, FakeClient({"ListEntries": listed}), "ledger", "show")
    assert shown.exit_code == 0, shown.output
    unrouted_line, routed_line = shown.output.splitlines()[1:]
    assert "GET (path not recorded)" in unrouted_line and "GET /" not in unrouted_line, shown.output
    assert "GET /github/ " in routed_line, shown.output

    followed = run(monkeypatch, FakeClient({"Follow": [UNROUTED]}), "ledger", "follow")
    assert "GET (path not recorded)" in followed.output and "GET /" not in followed.output, followed.output

    row = record_json(UNROUTED)
    assert (row["service"], row["path"]) == ("", "")
    out = io.StringIO()
    writer = ledger_export.row_writer("csv", out)
    writer.write(row)
    writer.close()
    (exported,) = csv.DictReader(io.StringIO(out.getvalue()))
    assert (exported["service"], exported["path"], exported["method"]) == ("", "", "GET")


def test_stats_counts_say_one_without_a_plural(monkeypatch: pytest.MonkeyPatch) -> None:
    """`1 system events`, found by a new user."""
    one = ledger_pb2.StatsResponse(rows=2, requests=1, system_events=1, allowed=1, first_time_ms=1, last_time_ms=2)
    assert "rows:    2 (1 request, 1 system event)\n" in run(monkeypatch, FakeClient({"Stats": one}),
                                                            "ledger", "stats").output
    more = ledger_pb2.StatsResponse(rows=5, requests=3, system_events=2, allowed=3, first_time_ms=1, last_time_ms=2)
    assert "rows:    5 (3 requests, 2 system events)\n" in run(monkeypatch, FakeClient({"Stats": more}),
                                                              "ledger", "stats").output


def test_revoking_a_grant_the_agent_does_not_have_changes_nothing_and_succeeds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """As granting twice does. aegisd names a missing agent or credential first, and those stay errors."""
    missing = ClientError("agent 'bot' has no grant of credential 'gh'", reason="grant_not_found")
    result = run(monkeypatch, FakeClient(error=missing), "revoke", "bot", "gh")
    assert (result.exit_code, result.output) == (0, "Agent 'bot' has no grant of credential 'gh'; nothing changed.\n")
    unknown = ClientError("no agent named 'ghost'", "see `aegisctl agent list` for the names", "agent_not_found")
    result = run(monkeypatch, FakeClient(error=unknown), "revoke", "ghost", "gh")
    assert result.exit_code == 1 and "no agent named 'ghost'" in result.output, result.output


def stat_of(mode: int, uid: int) -> os.stat_result:
    return os.stat_result((stat.S_IFDIR | mode, 0, 0, 0, uid, 0, 0, 0, 0, 0))


def test_a_shared_socket_directory_is_not_to_be_closed_but_left() -> None:
    """`chmod g-w,o-w /tmp` was advised for a socket in /tmp: that would break the system. For a sticky directory,
    or one that is not the user's, the advice is a directory of one's own, in the daemon's words."""
    me = os.geteuid()
    for info in (stat_of(0o1777, 0), stat_of(0o1777, me), stat_of(0o0777, me + 1)):
        hint = _shared_directory_hint(Path("/tmp"), info)
        assert "chmod" not in hint and "use a directory of your own, e.g. $XDG_RUNTIME_DIR/aegis" in hint, hint
    assert "shared sticky directory (like /tmp)" in _shared_directory_hint(Path("/tmp"), stat_of(0o1777, 0))
    assert f"belongs to uid {me + 1}, not to you" in _shared_directory_hint(Path("/x"), stat_of(0o0777, me + 1))
    own = _shared_directory_hint(Path("/home/me/run"), stat_of(0o0770, me))
    assert own.startswith("run `chmod g-w,o-w /home/me/run`"), own


def test_the_client_refuses_a_socket_in_a_sticky_directory_with_that_advice() -> None:
    directory = Path(tempfile.mkdtemp(prefix="agst", dir="/tmp"))
    path = directory / "aegisd.sock"
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(path))
        directory.chmod(0o1777)  # shared like /tmp: the case under test
        with pytest.raises(ClientError) as refused:
            AegisClient(path).status()
        assert "world-writable (mode 1777)" in refused.value.message and "nothing was sent" in refused.value.message
        assert "chmod" not in refused.value.hint and "a directory of your own" in refused.value.hint
    finally:
        server.close()
        path.unlink(missing_ok=True)
        directory.rmdir()
