"""An upstream that echoes the credential it was sent, for response-redaction tests.

`LeakyUpstream` is tests/upstreams.py's Upstream plus /leak/... endpoints. Each takes the secret
from what the gate injected (`Authorization: Bearer S`, the raw value of `Authorization: Basic ...`,
or `X-Custom-Key`) and sends it back in one form, so a test proves what the agent gets instead.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import zlib
from urllib.parse import quote

from aiohttp import web

from tests.upstreams import Upstream


def injected(request: web.Request) -> str:
    """The credential as the gate put it on the wire (the Bearer token, or the whole header value)."""
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        return auth[7:]
    return auth or request.headers.get("X-Custom-Key", "")


class LeakyUpstream(Upstream):
    """Endpoints (any method):
      /leak/raw        text body "key=S;"
      /leak/json       {"echo": S}
      /leak/header     header X-Echo: S, body "ok"
      /leak/b64?pad=N  base64(N bytes + S + 3 bytes), N = 0..5
      /leak/url        "next=" + quote(S)
      /leak/sse        an event plus the first half of S; waits for gate "leak"; the rest, [DONE]
      /leak/gzip       {"echo": S} gzip-compressed with Content-Encoding: gzip (?connection=V: with Connection: V too)
      /leak/bomb?size=N   N zero bytes gzip-compressed (a few KB for megabytes) with Content-Encoding: gzip
      /leak/br         Content-Encoding: br (bytes the gate cannot decode; ?connection=V: with Connection: V too)
      /leak/length     "no secret here" with a Content-Length
      /leak/prefix     "total: 3 items, next: " + the first half of S (not S itself), with a Content-Length
      /leak/gzip-cut   gzip of a clean text with its last 12 bytes cut off, Content-Encoding: gzip
      /leak/reason?stream=1   401 with the reason phrase "Bad credential S" (streamed: no Content-Length)
      /leak/range      {"auth": S}; a `Range: bytes=A-B` gets 206 with just those bytes
      /leak/escaped?style=php|net|net-mixed&stream=1   {"auth": S} with S's characters JSON-escaped as encoders
                       do (`escaped_json`); streamed: in two chunks cut inside an escape
      /leak/store      keeps S (a request-bin, an audit log); /leak/fetch answers "stored=" + what was kept
      /leak/whoami     {"user": the Basic credential's username}, as a whoami endpoint names its caller
      /leak/gz-file    {"echo": S} gzip-compressed with no Content-Encoding (a `.gz` download); /leak/zlib-file
                       the same zlib-compressed; /leak/clean-gz a gzip of text without S, likewise
    """

    stored = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if not request.path.startswith("/leak/"):
            return await super()._handle(request)
        self._record(request, await request.read())
        secret = injected(request)
        kind = request.path.removeprefix("/leak/")
        if kind == "raw":
            return web.Response(text=f"key={secret};")
        if kind == "json":
            return web.json_response({"echo": secret})
        if kind == "header":
            return web.Response(text="ok", headers={"X-Echo": secret})
        if kind == "b64":
            pad = int(request.query.get("pad", "0"))
            blob = base64.b64encode(bytes(range(1, pad + 1)) + secret.encode() + b"\xfe\xfd\xfc")
            return web.Response(body=b'{"content": "' + blob + b'"}', content_type="application/json")
        if kind == "url":
            return web.Response(text="next=" + quote(secret, safe=""))
        if kind == "sse":
            return await self._leak_sse(request, secret.encode())
        # An answer whose Connection header lists its own Content-Encoding, which a hop-by-hop strip would lose.
        listed = {"Connection": request.query["connection"]} if "connection" in request.query else {}
        if kind == "gzip":
            body = gzip.compress(json.dumps({"echo": secret}).encode())
            return web.Response(body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json",
                                                    **listed})
        if kind == "bomb":
            body = gzip.compress(bytes(int(request.query.get("size", "0"))), compresslevel=9)
            return web.Response(body=body, headers={"Content-Encoding": "gzip"})
        if kind == "br":
            return web.Response(body=b"\x0b\x02\x80hello\x03", headers={"Content-Encoding": "br", **listed})
        if kind == "length":
            return web.Response(body=b"no secret here", content_type="text/plain")
        if kind == "prefix":  # ends in what could still grow into the secret: the redactor holds it back
            return web.Response(text="total: 3 items, next: " + secret[: len(secret) // 2])
        if kind == "reason":
            return await self._leak_reason(request, secret)
        if kind == "range":
            return _ranged(request, json.dumps({"auth": secret}).encode())
        if kind == "escaped":
            return await self._leak_escaped(request, escaped_json(secret, request.query.get("style", "")))
        if kind == "store":
            self.stored = secret
            return web.Response(text="ok")
        if kind == "fetch":
            return web.Response(text=f"stored={self.stored}")
        if kind == "whoami":
            user = base64.b64decode(secret.removeprefix("Basic ")).split(b":", 1)[0].decode()
            return web.json_response({"user": user})
        if kind in ("gz-file", "zlib-file", "clean-gz"):
            data = b"nothing secret here" if kind == "clean-gz" else json.dumps({"echo": secret}).encode()
            packed = zlib.compress(data) if kind == "zlib-file" else gzip.compress(data)
            return web.Response(body=packed, content_type="application/gzip")
        if kind == "gzip-cut":
            body = gzip.compress(b"hello world, a compressed answer")[:-12]
            return web.Response(body=body, headers={"Content-Encoding": "gzip"})
        raise web.HTTPNotFound()

    async def _leak_reason(self, request: web.Request, secret: str) -> web.StreamResponse:
        response = web.StreamResponse(status=401, reason=f"Bad credential {secret}")
        if request.query.get("stream") != "1":
            response.content_length = 2
        await response.prepare(request)
        await response.write(b"no")
        await response.write_eof()
        return response

    async def _leak_escaped(self, request: web.Request, body: bytes) -> web.StreamResponse:
        if request.query.get("stream") != "1":
            return web.Response(body=body, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})  # chunked
        await response.prepare(request)
        cut = body.index(b"\\") + 1  # the first escape, cut after its backslash
        await response.write(body[:cut])
        await response.write(body[cut:])
        await response.write_eof()
        return response

    async def _leak_sse(self, request: web.Request, secret: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        half = len(secret) // 2
        await response.write(b"event: message\ndata: first\n\ndata: {\"key\": \"" + secret[:half])
        await self._wait("leak")
        await response.write(secret[half:] + b"\"}\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def escaped_json(secret: str, style: str) -> bytes:
    """`{"auth": secret}` as PHP's json_encode writes it (`\\/` for every `/`), or as .NET's System.Text.Json
    does (`\\u002B` for `+`), here with `/` and `=` escaped too, in lower- and upper-case hex. `net-mixed`:
    `{"auth": "clé " + secret}` as System.Text.Json writes it by default, `"` as `\\u0022` next to `\\\\`, and
    non-ASCII as `\\u00E9`, so one string mixes every kind of escape."""
    if style == "net-mixed":
        spelled = "".join(f"\\u{ord(c):04X}" if c in "\"+&'<>" or ord(c) > 0x7E else "\\\\" if c == "\\" else c
                          for c in "clé " + secret)
        return ('{"auth": "' + spelled + '"}').encode()
    text = json.dumps({"auth": secret})
    if style == "php":
        return text.replace("/", "\\/").encode()
    return text.replace("+", "\\u002B").replace("/", "\\u002f").replace("=", "\\u003D").encode()


def _ranged(request: web.Request, document: bytes) -> web.Response:
    """The document, or the byte range a `Range: bytes=A-B` header asks for (206)."""
    asked = re.fullmatch(r"bytes=(\d+)-(\d+)", request.headers.get("Range", ""))
    if asked is None:
        return web.Response(body=document)
    first, last = int(asked.group(1)), min(int(asked.group(2)), len(document) - 1)
    return web.Response(status=206, body=document[first:last + 1],
                        headers={"Content-Range": f"bytes {first}-{last}/{len(document)}"})
