"""A secret over aegisd's limit gets aegisd's own refusal from aegisctl, whatever its size.

One over gRPC's 4 MiB message limit never reached the daemon's check: aegisctl printed gRPC's
"Received message larger than max". aegisctl now refuses it before sending, in the daemon's words,
and never quotes it."""

from __future__ import annotations

from typing import Any

import grpc

from aegisctl.commands.webhook import MAX_URL_LENGTH as WEBHOOK_CLIENT_MAX
from aegisctl.secrets_input import MAX_SECRET_BYTES as CLIENT_MAX
from aegisd.api.aegis.v1 import credentials_pb2, credentials_pb2_grpc
from aegisd.vault.credentials import MAX_SECRET_BYTES
from aegisd.webhooks.registry import MAX_URL_LENGTH
from tests.e2e.support import assert_failed
from tests.harness import Aegis

HUGE = "sk-huge-secret-" + "0f1e2d3c4b5a6978" * 312_500  # 5 MB: past gRPC's 4 MiB message limit


def daemon_refusal(aegis: Aegis, secret: str) -> str:
    """What aegisd itself says to a secret one byte too long, on the wire."""
    request = credentials_pb2.AddCredentialRequest(name="wire", service="wire", domains=["api.example.com"],
                                                   secret=secret)
    with grpc.insecure_channel(f"unix:{aegis.socket}") as channel:
        try:
            credentials_pb2_grpc.CredentialServiceStub(channel).AddCredential(request, timeout=30)
        except grpc.RpcError as exc:
            err: Any = exc
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            return str(err.details())
    raise AssertionError("aegisd accepted a secret over its limit")


def add(aegis: Aegis, name: str, secret: str) -> Any:
    return aegis.ctl("vault", "add", name, "--service", name, "--domains", "api.example.com", "--secret-stdin",
                     input=secret + "\n")


def test_an_oversized_secret_gets_the_daemons_message(unlocked: Aegis) -> None:
    assert CLIENT_MAX == MAX_SECRET_BYTES  # aegisctl cannot import the daemon's constant; they must agree
    message = daemon_refusal(unlocked, "k" * (MAX_SECRET_BYTES + 1))
    assert message == f"the secret is longer than {MAX_SECRET_BYTES} bytes"

    for result in (add(unlocked, "huge", HUGE),
                   add(unlocked, "over", "k" * (MAX_SECRET_BYTES + 1)),
                   add(unlocked, "wide", "é" * (MAX_SECRET_BYTES // 2 + 1))):  # bytes (UTF-8), not characters
        assert_failed(result, message)
        assert result.err == f"aegisctl: error: {message}\n", result.err
    add(unlocked, "edge", "k" * MAX_SECRET_BYTES).ok()  # the limit itself is allowed

    rotated = unlocked.ctl("vault", "rotate", "edge", "--secret-stdin", input=HUGE + "\n")
    assert_failed(rotated, message)
    assert "larger than max" not in rotated.err
    names = unlocked.ctl("vault", "list", "--json").ok().out
    assert '"edge"' in names and '"huge"' not in names
    unlocked.assert_no_leaks([HUGE[:64]])


def test_an_oversized_webhook_url_gets_the_daemons_message(unlocked: Aegis) -> None:
    """A webhook URL can be a secret too (--url-stdin); one past gRPC's limit got gRPC's error, not aegisd's."""
    assert WEBHOOK_CLIENT_MAX == MAX_URL_LENGTH
    huge = "https://hooks.example.com/" + "T0K3N" * 1_000_000
    for url in (huge, "https://hooks.example.com/" + "x" * MAX_URL_LENGTH):
        result = unlocked.ctl("webhook", "add", "--url-stdin", "--events", "blocked_request", input=url + "\n")
        assert_failed(result, f"the webhook URL is longer than {MAX_URL_LENGTH} characters")
        assert "larger than max" not in result.err
    assert unlocked.ctl("webhook", "list", "--json").ok().out.strip() == "[]"
    unlocked.assert_no_leaks([huge[26:90]])
