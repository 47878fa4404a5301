"""Response redaction through the real daemon: an upstream that echoes the injected secret (raw, in a
header, base64 at any offset, URL-encoded, gzip-compressed, or split across two chunks of an SSE stream
that pauses in between) never gets it to the agent, and the ledger row says `response_redacted`."""

from __future__ import annotations

import base64
import gzip
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

import pytest

from aegisd.gate.pipeline import WHOLE_DECODED_MAX
from tests.e2e.gate_support import GateWorld, Reply, _dechunk
from tests.e2e.inspection_support import LeakyUpstream, escaped_json

REDACTED = "[REDACTED]"
SECRETS = {"blk": "blk-Secret/for+redaction=Q7w8E9", "wrn": "wrn-secret-for-redaction-A1s2D3",
           "off": "off-secret-for-redaction-Z9x8", "bas": "svcuser:basic-pass-R4t5Y6u7",
           "mix": 'mix-Se"cr\\et/for+redaction=K3', "key": "KEYfd1234567890abcdef:X"}


@dataclass
class Redacting:
    world: GateWorld
    up: LeakyUpstream


@pytest.fixture(scope="module")
def red() -> Iterator[Redacting]:
    world = GateWorld.start()
    try:
        up = LeakyUpstream()
        world.upstreams.append(up)
        up.start()
        world.credential("blk", SECRETS["blk"], up.entry())
        world.credential("wrn", SECRETS["wrn"], up.entry(), "--body-inspection", "warn")
        world.credential("off", SECRETS["off"], up.entry(), "--body-inspection", "off")
        world.credential("bas", SECRETS["bas"], up.entry(), "--auth-type", "basic")
        world.credential("mix", SECRETS["mix"], up.entry())
        world.credential("key", SECRETS["key"], up.entry(), "--auth-type", "basic")  # the key is the username
        world.secrets.append(SECRETS["key"].split(":")[0])
        for secret in (SECRETS["blk"], SECRETS["bas"]):  # every form the upstream sends back is a needle too
            world.secrets += [base64.b64encode(secret.encode()).decode(), quote(secret, safe="")]
        world.secrets += [escaped_json(SECRETS["blk"], style).decode()[10:-2] for style in ("php", "net")]
        world.secrets += [escaped_json(SECRETS["mix"], "net-mixed").decode()[19:-2], json.dumps(SECRETS["mix"])[1:-1]]
        world.agent("bot", "blk", "wrn", "off", "bas", "mix", "key")
        yield Redacting(world, up)
    finally:
        world.close()


def assert_redacted(world: GateWorld, reply: Reply, rows: list[dict[str, object]], *, body: bool = True) -> None:
    assert reply.status == 200, reply.text()
    if body:
        assert REDACTED.encode() in reply.body, reply.text()
        # A small answer of declared length is read whole, so it goes out with its redacted length.
        assert reply.header("Content-Length") == str(len(reply.body))
    row = world.row(reply.request_id, rows)
    assert (row["decision"], row["flags"]) == ("allowed", "response_redacted"), row


def test_echoes_in_body_header_base64_and_url_form_are_redacted(red: Redacting) -> None:
    world = red.world
    replies = {kind: world.call("GET", f"/blk/leak/{kind}", agent="bot") for kind in ("raw", "json", "url")}
    header = world.call("GET", "/blk/leak/header", agent="bot")
    b64 = [world.call("GET", f"/blk/leak/b64?pad={pad}", agent="bot") for pad in range(6)]
    warned = world.call("GET", "/wrn/leak/raw", agent="bot")  # warn is about requests; responses are redacted
    rows = world.ledger()
    assert replies["raw"].body == b"key=[REDACTED];"
    assert replies["json"].json() == {"echo": REDACTED}
    assert replies["url"].body == b"next=[REDACTED]"
    for reply in (*replies.values(), *b64, warned):
        assert_redacted(world, reply, rows)
    assert_redacted(world, header, rows, body=False)
    assert header.header("X-Echo") == REDACTED and header.body == b"ok"
    assert warned.body == b"key=[REDACTED];"
    world.assert_no_leaks()


@pytest.mark.parametrize("stream", ["0", "1"])
def test_json_escaped_echoes_are_redacted(red: Redacting, stream: str) -> None:
    """PHP's json_encode writes `\\/` for `/`, .NET's System.Text.Json `\\u002B` for `+`, `\\u0022` for `"` next
    to `\\\\`, and non-ASCII as `\\u00E9`: found by cold reviews, such an echo reached the agent whole, read
    whole (Content-Length) or streamed (chunked; here cut after the backslash of an escape), and the row had
    no flag."""
    world = red.world
    calls = [("blk", "php", REDACTED), ("blk", "net", REDACTED), ("mix", "net-mixed", "clé " + REDACTED)]
    replies = [(world.call("GET", f"/{name}/leak/escaped?style={style}&stream={stream}", agent="bot"), expected)
               for name, style, expected in calls]
    rows = world.ledger()
    for reply, expected in replies:
        assert (reply.status, reply.json()) == (200, {"auth": expected}), reply.text()
        assert reply.header("Content-Length") == (None if stream == "1" else str(len(reply.body)))
        row = world.row(reply.request_id, rows)
        assert (row["decision"], row["flags"]) == ("allowed", "response_redacted"), row
    assert SECRETS["mix"] not in replies[2][0].json()["auth"]
    world.assert_no_leaks()


def test_basic_auth_echo_is_redacted(red: Redacting) -> None:
    world = red.world
    reply = world.call("GET", "/bas/leak/raw", agent="bot")
    assert reply.body == b"key=Basic [REDACTED];"
    assert_redacted(world, reply, world.ledger("--credential", "bas"))
    world.assert_no_leaks()


def test_a_key_sent_as_the_basic_username_is_redacted_when_echoed_alone(red: Redacting) -> None:
    """Found by a red-team pass: Stripe's `sk_live_...:` and Freshdesk's `KEY:X` put the key in the username,
    and a whoami answer named it in clear: only `user:password`, its base64 and the password were redacted."""
    world = red.world
    reply = world.call("GET", "/key/leak/whoami", agent="bot")
    assert reply.json() == {"user": REDACTED}, reply.text()
    assert_redacted(world, reply, world.ledger("--credential", "key"))
    world.assert_no_leaks()


def test_a_secret_another_credential_left_at_the_same_host_is_redacted(red: Redacting) -> None:
    """Found by a red-team pass: an upstream that keeps what it is sent (a request-bin, an audit log) gave one
    credential's secret back in clear to an agent calling it with another: redaction knew only its own. Answers
    are now redacted of every credential whose allowlist reaches the same host."""
    world = red.world
    assert world.call("POST", "/blk/leak/store", agent="bot").status == 200
    reply = world.call("GET", "/wrn/leak/fetch", agent="bot")
    assert reply.body == f"stored={REDACTED}".encode(), reply.text()
    assert_redacted(world, reply, world.ledger("--credential", "wrn"))
    world.assert_no_leaks()


def test_secret_split_across_a_paused_sse_stream(red: Redacting) -> None:
    """The upstream sends an event and half the secret, then waits for the test: the agent already has the
    event (the stream flows), not the half secret (held back); after the rest, only [REDACTED] arrives."""
    world, up = red.world, red.up
    secret = SECRETS["blk"].encode()
    request = (f"GET /blk/leak/sse HTTP/1.1\r\nHost: 127.0.0.1:{world.port}\r\nX-Aegis-Agent: {world.tokens['bot']}"
               "\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", world.port), timeout=30) as sock:
        sock.sendall(request)
        received = b""
        while b"data: first\n\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, f"stream ended early: {received!r}"
            received += chunk
        assert up.arrived("leak").wait(30) and not up.was_released("leak")  # the upstream is still waiting
        assert secret[: len(secret) // 2] not in received
        up.release("leak")
        while chunk := sock.recv(65536):
            received += chunk
    world.received.append(received.decode("latin-1"))
    head, _, chunked = received.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower() and b"content-length" not in head.lower()
    body = _dechunk(chunked)
    assert body == (b'event: message\ndata: first\n\ndata: {"key": "[REDACTED]"}\n\ndata: [DONE]\n\n')
    request_id = next(line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                      if line.lower().startswith(b"x-aegis-request-id:"))
    row = world.row(request_id, world.ledger("--credential", "blk"))
    assert row["flags"] == "response_redacted" and row["status"] == 200
    world.assert_no_leaks()


def test_gzip_response_is_decoded_and_redacted(red: Redacting) -> None:
    world, up = red.world, red.up
    reply = world.call("GET", "/blk/leak/gzip", [("Accept-Encoding", "gzip, br")], agent="bot")
    assert reply.json() == {"echo": REDACTED} and reply.header("Content-Encoding") is None
    assert up.requests_to("/leak/gzip")[-1].header("Accept-Encoding") == ["identity"]
    assert_redacted(world, reply, world.ledger("--credential", "blk"))
    world.assert_no_leaks()


def test_undecodable_response_encoding_is_refused(red: Redacting) -> None:
    world = red.world
    reply = world.call("GET", "/blk/leak/br", agent="bot")
    world.assert_refused(reply, 502, "response_not_redactable", credential="blk")
    world.assert_no_leaks()


def test_compressed_data_without_a_content_encoding_holding_the_secret_is_refused(red: Redacting) -> None:
    """Found by a red-team pass: a gzip or zlib answer with no Content-Encoding (a `.gz` download) went out as it
    came, and the agent decompressed the echo itself. Clean compressed data still passes byte for byte."""
    world = red.world
    for kind in ("gz-file", "zlib-file"):
        reply = world.call("GET", f"/blk/leak/{kind}", agent="bot")
        world.assert_refused(reply, 502, "response_not_redactable", credential="blk")
    clean = world.call("GET", "/blk/leak/clean-gz", agent="bot")
    assert clean.status == 200 and gzip.decompress(clean.body) == b"nothing secret here", clean.text()
    world.assert_no_leaks()


@pytest.mark.parametrize("listed", ["Content-Encoding", "keep-alive, content-encoding", "Date,Content-Encoding"])
def test_a_connection_header_listing_content_encoding_cannot_hide_the_coding(red: Redacting, listed: str) -> None:
    """A cold review found that an answer saying `Connection: Content-Encoding` lost its Content-Encoding with the
    hop-by-hop headers before the redactor looked: a gzip echo of the secret reached the agent undecoded and
    unredacted, and a `br` one was not refused. The coding is kept whatever Connection lists."""
    world, up = red.world, red.up
    reply = world.call("GET", f"/blk/leak/gzip?connection={quote(listed)}", agent="bot")
    assert up.requests_to("/leak/gzip")[-1].header("Accept-Encoding") == ["identity"]
    assert reply.json() == {"echo": REDACTED} and reply.header("Content-Encoding") is None, reply.text()
    assert_redacted(world, reply, world.ledger("--credential", "blk"))
    refused = world.call("GET", f"/blk/leak/br?connection={quote(listed)}", agent="bot")
    world.assert_refused(refused, 502, "response_not_redactable", credential="blk")
    # Where nothing is redacted the agent gets the body as coded, and the header that says how.
    plain = world.call("GET", f"/off/leak/gzip?connection={quote(listed)}", agent="bot")
    assert (plain.status, plain.header("Content-Encoding")) == (200, "gzip"), plain.text()
    assert json.loads(gzip.decompress(plain.body)) == {"echo": SECRETS["off"]}
    world.assert_no_leaks()


def test_clean_responses_pass_and_keep_their_length(red: Redacting) -> None:
    world = red.world
    clean = world.call("GET", "/blk/leak/length", agent="bot")
    head = world.call("HEAD", "/blk/leak/length", agent="bot")
    untouched = world.call("GET", "/off/leak/length", agent="bot")
    rows = world.ledger()
    assert clean.body == b"no secret here" and clean.header("Content-Length") == "14"
    assert head.status == 200 and head.header("Content-Length") == "14" and head.body == b""
    assert untouched.body == b"no secret here" and untouched.header("Content-Length") == "14"
    for reply in (clean, head, untouched):
        assert world.row(reply.request_id, rows)["flags"] == ""
    world.assert_no_leaks()


def test_a_small_answer_ending_in_a_prefix_of_the_secret_arrives_whole(red: Redacting) -> None:
    """Read whole, the answer's held-back tail (what could still have grown into the secret) is released at
    its end: not a byte is lost, and its length says so."""
    world = red.world
    for service in ("blk", "wrn", "bas"):
        reply = world.call("GET", f"/{service}/leak/prefix", agent="bot")
        secret = SECRETS[service] if service != "bas" else "Basic " + base64.b64encode(SECRETS["bas"].encode()).decode()
        expected = ("total: 3 items, next: " + secret[: len(secret) // 2]).encode()
        assert (reply.status, reply.body) == (200, expected), reply.text()
        assert reply.header("Content-Length") == str(len(expected))
        assert world.row(reply.request_id)["flags"] == ""
    world.assert_no_leaks()


def _status_line(sock: socket.socket) -> bytes:
    received = b""
    while b"\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a status line: {received!r}"
        received += chunk
    return received.split(b"\r\n", 1)[0]


@pytest.mark.parametrize("stream", ["0", "1"])
def test_a_reason_phrase_echoing_the_secret_is_replaced_by_the_standard_one(red: Redacting, stream: str) -> None:
    """Read whole or streamed, the status line carries the standard phrase where redaction is on; with
    inspection off the upstream's own phrase passes, as everything else does."""
    world = red.world
    for service, expected in (("blk", b"HTTP/1.1 401 Unauthorized"), ("off", b"HTTP/1.1 401 Bad credential")):
        request = (f"GET /{service}/leak/reason?stream={stream} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   f"X-Aegis-Agent: {world.tokens['bot']}\r\nConnection: close\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", world.port), timeout=30) as sock:
            sock.sendall(request)
            status_line = _status_line(sock)
        if service == "blk":
            world.received.append(status_line.decode("latin-1"))
        assert status_line.startswith(expected), status_line
    world.assert_no_leaks()


def test_range_requests_cannot_split_an_echo_past_redaction(red: Redacting) -> None:
    """Two ranges, each with half of an echoed secret, would each pass redaction: where redaction is on the
    gate asks for the whole body, so both come back whole and redacted."""
    world, up = red.world, red.up
    halves = [world.call("GET", "/blk/leak/range", [("Range", f"bytes={first}-{last}"), ("If-Range", '"v1"')],
                         agent="bot") for first, last in ((0, 19), (20, 60))]
    for reply in halves:
        assert (reply.status, reply.json()) == (200, {"auth": REDACTED}), reply.text()
    for seen in up.requests_to("/leak/range"):
        assert seen.header("Range") == [] and seen.header("If-Range") == []
    untouched = world.call("GET", "/off/leak/range", [("Range", "bytes=0-9")], agent="bot")
    assert (untouched.status, untouched.body) == (206, b'{"auth": "')  # off: the request passes as sent
    world.assert_no_leaks()


def test_a_small_truncated_gzip_answer_is_refused_not_passed_as_complete(red: Redacting) -> None:
    world = red.world
    reply = world.call("GET", "/blk/leak/gzip-cut", agent="bot")
    world.assert_refused(reply, 502, "upstream_error", credential="blk")
    world.assert_no_leaks()


def test_a_small_compressed_answer_that_decodes_past_the_limit_is_refused_to_http10(red: Redacting) -> None:
    """Read whole to be redacted in one pass, a few KB of gzip must not become megabytes in the daemon. An
    HTTP/1.0 agent, which can tell a cut body only by its length, is refused an answer that decodes past 1 MiB
    (it used to be held up to 16 MiB); an HTTP/1.1 agent gets it streamed, as a larger one would be
    (tests/e2e/test_redaction_limits.py)."""
    world = red.world
    size = WHOLE_DECODED_MAX + 1
    reply = world.raw(f"GET /blk/leak/bomb?size={size} HTTP/1.0\r\nHost: 127.0.0.1\r\n"
                      f"X-Aegis-Agent: {world.tokens['bot']}\r\nConnection: close\r\n\r\n".encode())
    row = world.assert_refused(reply, 502, "upstream_error")
    assert "decodes to more than" in reply.error()["message"]
    assert row["path"] == "/leak/bomb"
    world.assert_no_leaks()
