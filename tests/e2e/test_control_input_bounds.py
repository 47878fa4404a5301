"""What a control call sends can neither write aegisd's log nor outgrow the answer: found by a review of the
control API.

- A name sent with a wrong passphrase (`UpdateCredential`) was logged before it was validated, and the human log
  wrote it raw, so a newline in it forged whole log lines. Names are now validated first, and every log line
  escapes what is not printable (a stored row's id, edited to hold a newline, is the path that still reaches it).
- A credential took an allowlist of any length (100,000 entries: 9 s to add, and 1.7 s for every later change).
- A 100 kB name came back whole in the error, past gRPC's metadata limit, so the caller got RESOURCE_EXHAUSTED
  instead of the error.

These talk gRPC to the socket with the generated stubs (as any client could), and aegisctl where it matters.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from aegisd.api.aegis.v1 import agents_pb2 as apb
from aegisd.api.aegis.v1 import agents_pb2_grpc, credentials_pb2_grpc, policy_pb2_grpc, webhooks_pb2_grpc
from aegisd.api.aegis.v1 import credentials_pb2 as cpb
from aegisd.api.aegis.v1 import policy_pb2 as ppb
from aegisd.api.aegis.v1 import webhooks_pb2 as wpb
from aegisd.vault.credentials import Credential
from tests.e2e.support import assert_failed, names_in_process, open_vault, rpc_reason, show_in_process
from tests.harness import PASSPHRASE, Aegis

SECRET = "sk-bounds-secret-5a4b3c2d1e0f"
FORGED = "2026-11-28T09:00:00.000Z info    vault locked"
# A log line as HumanFormatter starts one: the time, then the level.
LINE_START = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (debug|info|warning|error|critical) ", re.M)
HUGE = 100_000


@pytest.fixture
def channel(unlocked: Aegis) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"unix:{unlocked.socket}") as chan:
        yield chan


def failure(call: Callable[..., Any], request: Any) -> tuple[grpc.StatusCode, str, str]:
    """Call an RPC that must fail; return its status code, reason trailer and details."""
    try:
        call(request, timeout=60)
    except grpc.RpcError as exc:
        err: Any = exc
        return err.code(), rpc_reason(exc), str(err.details())
    raise AssertionError(f"{type(request).__name__} unexpectedly succeeded")


def forged_lines(log: str) -> list[str]:
    """Lines of the log that begin with the forged text (only a raw newline before it can put it there)."""
    return [line for line in log.splitlines() if line.startswith(FORGED)]


# -- 1. log lines ------------------------------------------------------------------------------------------------

def test_a_name_sent_with_a_wrong_passphrase_forges_no_log_line(unlocked: Aegis, channel: grpc.Channel) -> None:
    """The reviewer's reproduction: the name is refused before the passphrase is tried, so nothing names it."""
    creds = credentials_pb2_grpc.CredentialServiceStub(channel)
    forged = f"x\n{FORGED}\n2026-11-28T09:00:01.000Z info    ledger pruned rows=0"
    code, reason, details = failure(creds.UpdateCredential, cpb.UpdateCredentialRequest(
        name=forged, rate_limit="", passphrase="a wrong guess at the passphrase"))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument"), details
    assert details.startswith("credential name 'x\\n2026-11-28") and "\n" not in details
    log = unlocked.log()
    assert not forged_lines(log) and "2026-11-28T09:00:01.000Z" not in log, log
    assert "credential update refused" not in log  # refused before the passphrase was tried
    assert "ledger pruned" not in log


def test_a_control_character_that_reaches_the_log_is_written_escaped(unlocked: Aegis,
                                                                       channel: grpc.Channel) -> None:
    """A row id edited in vault.db to hold a newline, a carriage return and a bidi override: `vault remove --id`
    takes it as sent and logs it once the row is gone. The line shows it escaped; no line is forged."""
    aegis = unlocked
    aegis.add_credential("edited", SECRET, "--service", "edited", "--domains", "api.edited.example")
    row_id = f"x\r\n{FORGED}\n\u202eevil"
    conn = sqlite3.connect(aegis.data_dir / "vault.db", timeout=10)
    try:
        with conn:  # the id is sealed with the secret: the row no longer opens, so only --id removes it
            conn.execute("UPDATE credentials SET id = ? WHERE name = 'edited'", (row_id,))
    finally:
        conn.close()
    creds = credentials_pb2_grpc.CredentialServiceStub(channel)
    creds.RemoveCredential(cpb.RemoveCredentialRequest(name=row_id, by_id=True), timeout=30)
    assert "edited" not in names_in_process(aegis)
    log = aegis.log()
    assert not forged_lines(log), log
    assert "\u202e" not in log and "\r" not in log
    removed = [line for line in log.splitlines() if "credential row removed" in line]
    assert len(removed) == 1 and LINE_START.match(removed[0]), removed
    assert removed[0].endswith(f"credential row removed id=x\\r\\n{FORGED}\\n\\u202eevil grants_removed=0"), removed


# -- 2. the allowlist's size ---------------------------------------------------------------------------------------

def hosts(n: int, prefix: str = "h") -> list[str]:
    return [f"{prefix}{i}.bounds.example" for i in range(n)]


def test_an_allowlist_of_1001_entries_is_refused_and_nothing_is_written(unlocked: Aegis) -> None:
    aegis = unlocked
    too_many = ",".join(hosts(1001))
    result = aegis.ctl("vault", "add", "big", "--service", "big", "--domains", too_many, "--secret-stdin",
                       input=SECRET + "\n")
    assert_failed(result, "an allowlist holds at most 1000 entries; 1001 were given")
    assert names_in_process(aegis) == []

    aegis.add_credential("big", SECRET, "--service", "big", "--domains", ",".join(hosts(1000)))  # the most there is
    assert len(show_in_process(aegis, "big")["domains"]) == 1000
    update = aegis.ctl("vault", "update", "big", "--domains", ",".join(hosts(1001, "g")), "--passphrase-stdin",
                       input=PASSPHRASE + "\n")
    assert_failed(update, "at most 1000 entries")
    assert show_in_process(aegis, "big")["domains"][:2] == ["h0.bounds.example", "h1.bounds.example"]
    assert "credential updated" not in aegis.log()


def test_the_cap_is_counted_before_the_entries_are_parsed(unlocked: Aegis, channel: grpc.Channel) -> None:
    """The reviewer's 100,000 entries: refused at once with the status and reason, not parsed for seconds."""
    creds = credentials_pb2_grpc.CredentialServiceStub(channel)
    request = cpb.AddCredentialRequest(name="huge", service="huge", domains=hosts(100_000), secret=SECRET)
    try:
        creds.AddCredential(request, timeout=3)  # parsing them all took 9 s
    except grpc.RpcError as exc:
        err: Any = exc
        assert (err.code(), rpc_reason(exc)) == (grpc.StatusCode.INVALID_ARGUMENT, "too_many_domains"), err.details()
        assert "100000 were given" in err.details()
    else:
        raise AssertionError("100,000 allowlist entries were accepted")
    assert names_in_process(unlocked) == []


def test_a_stored_allowlist_over_the_cap_is_kept_and_still_updated(unlocked: Aegis) -> None:
    """A list stored before the cap (by an older aegisd, in a backup restored since) is not re-checked, as plain
    http entries are not: the credential keeps its entries and its other fields can still change; only a new
    list must fit."""
    aegis = unlocked
    aegis.stop()
    with open_vault(aegis.data_dir) as vault:
        vault.add_credential(Credential(id="", name="older", service="older", domains=hosts(1001)), SECRET)
    aegis.start()
    aegis.ctl_in_process("unlock", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    aegis.ctl_in_process("vault", "update", "older", "--rate-limit", "10/min").ok()
    shown = show_in_process(aegis, "older")
    assert (len(shown["domains"]), shown["rate_limit"]) == (1001, "10/min")


# -- 3. oversized input in errors ----------------------------------------------------------------------------------

def test_a_100_kb_name_gets_a_short_clear_error(unlocked: Aegis, channel: grpc.Channel) -> None:
    aegis = unlocked
    aegis.add_credential("known", SECRET, "--service", "known", "--domains", "api.known.example")
    aegis.ctl_in_process("agent", "add", "bot").ok()
    creds = credentials_pb2_grpc.CredentialServiceStub(channel)
    agents = agents_pb2_grpc.AgentServiceStub(channel)
    hooks = webhooks_pb2_grpc.WebhookServiceStub(channel)
    policy = policy_pb2_grpc.PolicyServiceStub(channel)
    big = "n" * HUGE
    calls: list[tuple[str, Callable[..., Any], Any]] = [
        ("credential name", creds.AddCredential,
         cpb.AddCredentialRequest(name=big, service="s", domains=["a.example"], secret=SECRET)),
        ("service", creds.AddCredential,
         cpb.AddCredentialRequest(name="s", service=big, domains=["a.example"], secret=SECRET)),
        ("domain entry", creds.AddCredential,
         cpb.AddCredentialRequest(name="s", service="s", domains=[big], secret=SECRET)),
        ("rate", creds.AddCredential, cpb.AddCredentialRequest(name="s", service="s", domains=["a.example"],
                                                               secret=SECRET, rate_limit=big)),
        ("header name", creds.AddCredential, cpb.AddCredentialRequest(
            name="s", service="s", domains=["a.example"], secret=SECRET, auth_type=cpb.AUTH_TYPE_HEADER,
            header_name=big)),
        ("unknown scope", creds.AddCredential, cpb.AddCredentialRequest(name="s", service="s", domains=["a.example"],
                                                                        secret=SECRET, scopes=[big])),
        ("credential name", creds.GetCredential, cpb.GetCredentialRequest(name=big)),
        ("credential name", creds.UpdateCredential, cpb.UpdateCredentialRequest(name=big, rate_limit="")),
        ("credential name", creds.RotateCredential, cpb.RotateCredentialRequest(name=big, secret=SECRET)),
        ("credential name", creds.RemoveCredential, cpb.RemoveCredentialRequest(name=big)),
        ("credential id", creds.RemoveCredential, cpb.RemoveCredentialRequest(name=big, by_id=True)),
        ("rate", creds.UpdateCredential, cpb.UpdateCredentialRequest(name="known", rate_limit=big)),
        ("agent name", agents.AddAgent, apb.AddAgentRequest(name=big)),
        ("agent name", agents.GetAgent, apb.GetAgentRequest(name=big)),
        ("agent name", agents.RemoveAgent, apb.RemoveAgentRequest(name=big)),
        ("agent id", agents.RemoveAgent, apb.RemoveAgentRequest(name=big, by_id=True)),
        ("agent name", agents.RegenerateToken, apb.RegenerateTokenRequest(name=big)),
        ("agent name", agents.SetRateLimit, apb.SetAgentRateLimitRequest(name=big, rate_limit="1/min")),
        ("rate", agents.SetRateLimit, apb.SetAgentRateLimitRequest(name="bot", rate_limit=big)),
        ("agent name", agents.Grant, apb.GrantRequest(agent=big, credential="known")),
        ("credential name", agents.Grant, apb.GrantRequest(agent="bot", credential=big)),
        ("agent name", agents.Revoke, apb.RevokeRequest(agent=big, credential="known")),
        ("credential name", agents.Revoke, apb.RevokeRequest(agent="bot", credential=big)),
        ("webhook id", hooks.RemoveWebhook, wpb.RemoveWebhookRequest(id=big)),
        ("webhook id", hooks.TestWebhook, wpb.TestWebhookRequest(id=big)),
        ("webhook event", hooks.AddWebhook, wpb.AddWebhookRequest(url="https://hooks.example/x", events=[big])),
        ("method", policy.Test, ppb.TestPolicyRequest(agent="bot", service="known", method=big, path="/")),
        ("service", policy.Test, ppb.TestPolicyRequest(agent="bot", service=big + "/", method="GET", path="/")),
        ("path", policy.Test, ppb.TestPolicyRequest(agent="bot", service="known", method="GET", path=big)),
    ]
    for what, call, request in calls:
        code, reason, details = failure(call, request)
        where = f"{type(request).__name__} ({what}): {code} {details[:200]}"
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), where
        assert reason, where
        assert what in details and "'nnnnnnnnnn" in details and "'..." in details, where
        assert len(details) < 400, where
    # aegisctl says the same, on one line.
    result = aegis.ctl_in_process("vault", "show", big)
    assert_failed(result, "credential name 'nnnnnnnnnn", "too long (100000 characters)")
    assert len(result.err) < 1000
    assert big[:200] not in aegis.log()


def test_an_error_that_still_grows_with_its_input_is_cut_not_dropped(unlocked: Aegis, channel: grpc.Channel) -> None:
    """The bound on every status message: 20,000 unknown webhook events are each short, but the error names them
    all (aegisd/webhooks/events.py). Past gRPC's limit the caller got RESOURCE_EXHAUSTED; now a cut message."""
    hooks = webhooks_pb2_grpc.WebhookServiceStub(channel)
    events = [f"no-such-event-{i}" for i in range(20_000)]
    code, reason, details = failure(hooks.AddWebhook, wpb.AddWebhookRequest(url="https://hooks.example/x",
                                                                            events=events))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument"), details[:300]
    assert details.startswith("unknown webhook event 'no-such-event-0'") and details.endswith("[... message cut]")
    assert len(details.encode()) < 2100
