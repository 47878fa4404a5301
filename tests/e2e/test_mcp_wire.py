"""What the MCP bridge makes of bytes at the edges: a request that is no valid Unicode, an answer without a
Content-Type, a header repeated in another case, an answer in a content coding, a request body without a type.

A real daemon, the real `aegisctl mcp serve`, and an upstream that sends exactly the bytes under test.
"""

from __future__ import annotations

import base64
import functools
import gzip
import json
import select
import subprocess
import time
import zlib
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from mcp.types import CallToolResult

from tests.e2e.gate_support import GateWorld, ScriptedUpstream
from tests.e2e.mcp_support import Bridge, bridge_env, text_of, value_of, write_token_file
from tests.harness import AEGISCTL
from tests.upstreams import Upstream

SECRET = "mcpWireSecret-0123456789abcdefABCDEFGH"
REPLY_TIMEOUT = 10.0


LONG_HEADER = "v" * 30_000  # aiohttp's client refuses a header over 8190 bytes, or over 128 headers, by default
MANY_HEADERS = b"".join(b"X-N%d: %d\r\n" % (i, i) for i in range(1000))


DEEP_ERROR = b"[" * 100_000  # JSON nested past Python's parser, in a body the bridge reads whole (under 100 KB)
SMALL_DEEP_ERROR = b'{"error": ' + b"[" * 5_000  # small, and starts as the gate's refusals do


def answer(target: str) -> bytes:
    """/plain: text without a Content-Type; /big: a head the gate relays (under 64 KiB) that aiohttp's defaults
    refuse; /deep and /deep-small: a JSON error nested deeper than Python parses; /dup: one header sent three
    times in two spellings."""
    if target.startswith("/deep"):
        body = SMALL_DEEP_ERROR if target.startswith("/deep-small") else DEEP_ERROR
        return b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (
            len(body), body)
    if target.startswith("/plain"):
        return b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nplain words"
    if target.startswith("/big"):
        return b"HTTP/1.1 200 OK\r\nX-Long: %b\r\n%bContent-Length: 4\r\n\r\ndone" % (LONG_HEADER.encode(),
                                                                                          MANY_HEADERS)
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Dup: a\r\nx-dup: b\r\nX-Dup: c\r\n"
            b"Content-Length: 2\r\n\r\nok")


@pytest.fixture
def world() -> Iterator[GateWorld]:
    instance = GateWorld.start()
    yield instance
    instance.close()


def setup(world: GateWorld) -> tuple[ScriptedUpstream, str, Bridge]:
    up = ScriptedUpstream(answer)
    world.credential("api", SECRET, up.entry())
    token = world.agent("bot", "api")
    token_file = write_token_file(world.aegis.root / "bot.token", token)
    return up, token, Bridge(world.aegis.gate_url, token_file, world.aegis.root / "bridge.err")


def test_text_without_content_type_is_text_and_a_header_repeated_in_another_case_is_joined(world: GateWorld) -> None:
    up, token, bridge = setup(world)
    try:
        async def run() -> None:
            async with bridge.stdio() as session:
                plain = value_of(await bridge.call(session, "aegis_proxy_request", service="api", path="/plain"))
                assert (plain["body"], plain["body_encoding"]) == ("plain words", "text"), plain
                assert not any(name.lower() == "content-type" for name in plain["headers"]), plain["headers"]
                dup = value_of(await bridge.call(session, "aegis_proxy_request", service="api", path="/dup"))
                spelled = [name for name in dup["headers"] if name.lower() == "x-dup"]
                assert spelled == ["X-Dup"], dup["headers"]  # one key, its first spelling
                assert dup["headers"]["X-Dup"] == "a, b, c", dup["headers"]
                # A POST carried out upstream, whose answer head is large: the model gets the answer, not
                # gate_unreachable (which would invite it to send the write again).
                big = value_of(await bridge.call(session, "aegis_proxy_request", service="api", path="/big",
                                                 method="POST"))
                assert (big["status"], big["body"]) == (200, "done"), big
                assert big["headers"]["X-Long"] == LONG_HEADER and big["headers"]["X-N999"] == "999"

        anyio.run(run)
    finally:
        up.stop()
    world.aegis.assert_no_leaks([SECRET, token], extra_text=bridge.outputs())


def test_an_upstreams_deeply_nested_json_error_is_its_answer(world: GateWorld) -> None:
    """An upstream's JSON error nested deeper than Python's parser goes once escaped the bridge's check for a gate
    refusal (RecursionError), and the model got a generic tool error instead of the upstream's answer."""
    up, token, bridge = setup(world)
    try:
        async def run() -> list[dict[str, Any]]:
            async with bridge.stdio() as session:
                return [value_of(await bridge.call(session, "aegis_proxy_request", service="api", path=path))
                        for path in ("/deep", "/deep-small", "/plain")]

        deep, small, plain = anyio.run(run)
    finally:
        up.stop()
    for got, sent in ((deep, DEEP_ERROR), (small, SMALL_DEEP_ERROR)):
        assert (got["status"], got["body"], got["truncated"]) == (400, sent.decode(), False), got["status"]
        assert got["request_id"] and got["headers"]["X-Aegis-Request-Id"] == got["request_id"]
    assert plain["body"] == "plain words"  # and the bridge goes on serving
    world.aegis.assert_no_leaks([SECRET, token], extra_text=bridge.outputs())


def _send(proc: subprocess.Popen[bytes], message: dict[str, Any] | str | bytes) -> None:
    assert proc.stdin is not None
    if isinstance(message, dict):
        message = json.dumps(message)
    proc.stdin.write((message if isinstance(message, bytes) else message.encode()) + b"\n")
    proc.stdin.flush()


def _reply(proc: subprocess.Popen[bytes], wanted: int | str | None) -> dict[str, Any]:
    """The bridge's answer to request `wanted`, or a failure after REPLY_TIMEOUT: a host would hang there."""
    assert proc.stdout is not None
    deadline = time.monotonic() + REPLY_TIMEOUT
    while True:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no reply to request {wanted} within {REPLY_TIMEOUT} s: the host would hang")
        line = proc.stdout.readline()
        assert line, "the bridge closed stdout"
        message: dict[str, Any] = json.loads(line)
        if "id" in message and message["id"] == wanted:
            return message


def _start(bridge: Bridge) -> subprocess.Popen[bytes]:
    """A stdio bridge driven line by line, initialized."""
    proc = subprocess.Popen([AEGISCTL, "mcp", "serve", "--token-file", str(bridge.token_file)],
                            env=bridge_env(bridge.gate_url), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=bridge.stderr_path.open("ab"), bufsize=0)  # unbuffered: select sees every line
    _send(proc, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "wire-test", "version": "1"}}})
    _reply(proc, 1)
    _send(proc, {"jsonrpc": "2.0", "method": "notifications/initialized"})
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def test_lines_too_deep_or_no_request_are_answered_and_the_bridge_goes_on(world: GateWorld) -> None:
    """A line nested deeper than Python's JSON parser goes once ended the bridge (RecursionError in its answer to
    a line the SDK refused); JSON that is no JSON-RPC request (a batch, an id without a method) got no answer, and
    the host would wait for ever. Each now gets its error, and the bridge answers what follows."""
    _up, token, bridge = setup(world)
    proc = _start(bridge)
    outputs: list[str] = []

    def answered(line: str, wanted: int | str | None, code: int) -> dict[str, Any]:
        _send(proc, line)
        reply = _reply(proc, wanted)
        outputs.append(json.dumps(reply))
        assert reply["error"]["code"] == code, reply
        return reply

    try:
        deep = "[" * 5_000
        for line in (f'{{"jsonrpc":"2.0","id":70,"method":"ping","params":{{"a":{deep}{"]" * 5_000}}}}}',
                     f'{{"jsonrpc":"2.0","id":71,"method":"ping","params":{{"a":{deep}}}'):
            assert answered(line, None, -32700)["error"]["message"].startswith("Parse error"), line[:60]
        # A batch: the SDK takes none; each request in it is answered with its own id.
        _send(proc, '[{"jsonrpc":"2.0","id":"b1","method":"ping"},{"jsonrpc":"2.0","id":72,"method":"ping"}]')
        for wanted in ("b1", 72):
            reply = _reply(proc, wanted)
            outputs.append(json.dumps(reply))
            assert reply["error"]["code"] == -32600 and "batch" in reply["error"]["message"], reply
        answered("[]", None, -32600)
        # An id and no method may be the host's own malformed response to a request of ours: not answered (else
        # the host could take it for a second answer to that id); nor is a notification with bad params.
        _send(proc, '{"jsonrpc":"2.0","id":73}')
        _send(proc, '{"jsonrpc":"2.0","method":"notifications/x","params":5}')
        _send(proc, '{"jsonrpc":"2.0","id":74,"method":"ping","params":5}')
        assert proc.stdout is not None and select.select([proc.stdout], [], [], REPLY_TIMEOUT)[0]
        following = json.loads(proc.stdout.readline())  # the very next line out: nothing came for 73
        outputs.append(json.dumps(following))
        assert following["id"] == 74 and following["error"]["code"] == -32600, following
        answered("5", None, -32600)
        _send(proc, '{"jsonrpc":"2.0","id":75,"method":"ping"}')
        assert _reply(proc, 75)["result"] == {}
    finally:
        _stop(proc)
    assert proc.returncode == 0, bridge.stderr()
    world.aegis.assert_no_leaks([SECRET, token], extra_text=[*outputs, bridge.stderr()])


def test_a_request_holding_a_lone_surrogate_is_answered_not_dropped(world: GateWorld) -> None:
    """`"\\ud800"` is a JSON escape of no character: the SDK cannot parse the line. The host must still get an
    answer to that request id (else it waits forever), and the bridge must go on serving. So must a line that is no
    JSON at all, or has junk after its JSON: JSON-RPC answers it with a parse error, to id null if none can be read."""
    _up, token, bridge = setup(world)
    proc = subprocess.Popen([AEGISCTL, "mcp", "serve", "--token-file", str(bridge.token_file)],
                            env=bridge_env(bridge.gate_url), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=bridge.stderr_path.open("ab"), bufsize=0)  # unbuffered: select sees every line
    outputs: list[str] = []
    try:
        _send(proc, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "wire-test", "version": "1"}}})
        outputs.append(json.dumps(_reply(proc, 1)))
        _send(proc, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        for wanted, arguments in ((2, '{"zz":"\\ud800"}'), (3, '{"zz":"\\udc00\\ud800x"}')):
            _send(proc, f'{{"jsonrpc":"2.0","id":{wanted},"method":"tools/call","params":{{"name":"aegis_health",'
                        f'"arguments":{arguments}}}}}')
            refused = _reply(proc, wanted)
            outputs.append(json.dumps(refused))
            assert "error" in refused and refused["error"]["code"] == -32700, refused
            assert "surrogate" in refused["error"]["message"], refused
        # A line that is no JSON gets a parse error too: with the id of the request it starts with, else null.
        for line, wanted_id in ((b'{"jsonrpc":"2.0","id":5,"method":"ping"} \xff\xfejunk', 5), (b"not json", None)):
            _send(proc, line)
            refused = _reply(proc, wanted_id)
            outputs.append(json.dumps(refused))
            assert refused["error"]["code"] == -32700 and refused["error"]["message"].startswith("Parse error"), refused
        # A pair is a character: served. And the bridge still answers afterwards.
        _send(proc, '{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"aegis_health",'
                    '"arguments":{"zz":"\\ud83d\\ude00"}}}')
        served = _reply(proc, 4)
        outputs.append(json.dumps(served))
        assert served["result"]["structuredContent"]["agent_token"] == "valid", served
    finally:
        _stop(proc)
    world.aegis.assert_no_leaks([SECRET, token], extra_text=[*outputs, bridge.stderr()])


# -- answers in a content coding, relayed as sent for a credential whose body inspection is off ------------------

BODY_LIMIT = 100 * 1024
DATA = b'{"hello": "world"}'


def _raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


@functools.cache
def _encoded(target: str) -> tuple[str, bytes]:
    """(Content-Encoding, body) for each target; the bomb is 64 MiB of zeros in ~64 KB of gzip."""
    return {"/gzip": ("gzip", gzip.compress(DATA)), "/raw-deflate": ("deflate", _raw_deflate(DATA)),
            "/members": ("gzip", gzip.compress(b"hello ") + b"\0" * 64 + gzip.compress(b"world")),
            "/br": ("br", b"\x8b\x08\x80" + DATA), "/zstd": ("zstd", b"\x28\xb5\x2f\xfd" + DATA),
            "/custom": ("x-custom", DATA), "/stacked": ("gzip, gzip", gzip.compress(gzip.compress(DATA))),
            "/damaged": ("gzip", b"\x1f\x8b\x08\x00garbage" * 10), "/cut": ("gzip", gzip.compress(DATA)[:-4]),
            "/bomb": ("gzip", gzip.compress(b"\0" * (64 << 20), 9)),
            # 4 MiB of empty members: nothing to decode, and (endless) it was read and decoded for ever
            "/padding": ("gzip", gzip.compress(b"", mtime=0) * ((4 << 20) // 20))}[target]


def encoded_answer(target: str) -> bytes:
    coding, body = _encoded(target)
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: %b\r\nContent-Length: %d\r\n"
            b"\r\n%b" % (coding.encode(), len(body), body))


def test_an_answer_in_a_content_coding_is_decoded_or_shown_as_it_is(world: GateWorld) -> None:
    """With body inspection off the gate relays an upstream's Content-Encoding as sent. The bridge let aiohttp
    decode: br or zstd (which the model may ask for) raised, and the model got outcome_unknown for an answer the
    gate had delivered in full; any other coding passed as if it were none, with its Content-Encoding dropped, so
    the model read compressed bytes as the answer. Now gzip and deflate are decoded (within the 100 KB a result
    carries: a bomb costs no more), and anything else comes back as received, base64, its coding named."""
    up = ScriptedUpstream(encoded_answer)
    world.credential("off", SECRET, up.entry(), "--body-inspection", "off")
    token = world.agent("bot", "off")
    bridge = Bridge(world.aegis.gate_url, write_token_file(world.aegis.root / "bot.token", token),
                    world.aegis.root / "bridge.err")
    targets = ("/gzip", "/raw-deflate", "/members", "/br", "/zstd", "/custom", "/stacked", "/damaged", "/cut",
               "/bomb", "/padding")
    try:
        async def run() -> dict[str, CallToolResult]:
            async with bridge.stdio() as session:
                return {target: await bridge.call(session, "aegis_proxy_request", service="off", path=target)
                        for target in targets}

        results = anyio.run(run)
    finally:
        up.stop()
    failed = {target: text_of(result)[:80] for target, result in results.items() if result.is_error}
    assert not failed, failed  # every one is the upstream's answer, delivered in full
    got = {target: value_of(result) for target, result in results.items()}
    for target in ("/gzip", "/raw-deflate", "/members"):
        answer = got[target]
        assert (answer["status"], answer["body_encoding"], answer["truncated"]) == (200, "text", False), answer
        assert answer["body"] == ("hello world" if target == "/members" else DATA.decode()), answer
        assert "Content-Encoding" not in answer["headers"] and "note" not in answer, answer
    for target in ("/br", "/zstd", "/custom", "/stacked", "/damaged", "/cut"):
        answer, (coding, body) = got[target], _encoded(target)
        assert (answer["status"], answer["body_encoding"], answer["truncated"]) == (200, "base64", False), answer
        assert base64.b64decode(answer["body"]) == body and answer["headers"]["Content-Encoding"] == coding, answer
        assert answer["request_id"] == answer["headers"]["X-Aegis-Request-Id"], answer
        assert "not decoded" in answer["note"], answer
    bomb = got["/bomb"]
    assert (bomb["body"], bomb["truncated"]) == ("\0" * BODY_LIMIT, True), (len(bomb["body"]), bomb["truncated"])
    # Found by the review of the decoder: compressed input is bounded too (a few times the limit), not only output.
    padding = got["/padding"]
    assert (padding["body"], padding["truncated"]) == ("", True), (len(padding["body"]), padding["truncated"])
    assert "cut after its first 0 bytes" in padding["note"], padding["note"]  # not "100000", as it first said
    assert "Traceback" not in bridge.stderr(), bridge.stderr()
    world.assert_no_leaks(extra=bridge.outputs())


def test_a_request_body_without_a_content_type_is_sent_without_one(world: GateWorld) -> None:
    """aiohttp labels a body sent without a Content-Type `application/octet-stream`: a JSON body the model sent
    without headers reached the upstream as binary data, a type the model never chose. One it gives goes as given."""
    up: Upstream = world.upstream()
    world.credential("api", SECRET, up.entry())
    token = world.agent("bot", "api")
    bridge = Bridge(world.aegis.gate_url, write_token_file(world.aegis.root / "bot.token", token),
                    world.aegis.root / "bridge.err")

    async def run() -> None:
        async with bridge.stdio() as session:
            for path, headers in (("/echo/untyped", None), ("/echo/typed", {"content-type": "text/csv"})):
                sent = {"headers": headers} if headers else {}
                value_of(await bridge.call(session, "aegis_proxy_request", service="api", path=path, method="POST",
                                           body='{"a": 1}', **sent))

    anyio.run(run)
    untyped, typed = up.requests_to("/echo/untyped")[-1], up.requests_to("/echo/typed")[-1]
    assert (untyped.body, untyped.header("Content-Type")) == (b'{"a": 1}', []), sorted(untyped.header_names)
    assert typed.header("Content-Type") == ["text/csv"]
    world.assert_no_leaks(extra=bridge.outputs())
