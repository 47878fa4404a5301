"""Real local upstream servers for gate tests: HTTP or HTTPS, each recording what reached it.

The gate's promises are about what crosses the wire (which credential, which headers, whether
anything was sent at all), so the upstream records every connection and request it receives.
Each server runs its own event loop in a background thread, so synchronous and asyncio tests
can both drive it. Endpoints that must pause (SSE, hang, hold, stream) wait on named gates the
test opens with `release`, which proves streaming by ordering instead of by timing.

TLS material comes from `make_pki`: a throwaway CA and a server certificate for localhost and
127.0.0.1, generated with `cryptography` at test time.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

BLOCK = bytes(range(256)) * 256  # 64 KiB of a known pattern, for large-body tests
HOLD_LIMIT_SECONDS = 30.0  # a held endpoint gives up after this, so a broken test fails instead of hanging


def accepted(server: socket.socket) -> Iterator[socket.socket]:
    """Each connection a raw test server accepts, until the server is closed: the loop of the hand-written
    upstreams, which answer byte by byte what aiohttp would not."""
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        yield conn


def pattern(size: int) -> bytes:
    """The first `size` bytes of the repeating pattern the /stream endpoint sends."""
    whole, rest = divmod(size, len(BLOCK))
    return BLOCK * whole + BLOCK[:rest]


@dataclass(frozen=True)
class Seen:
    """One request as the upstream received it. `body` is None when it never arrived whole."""

    method: str
    path: str  # raw path, still percent-encoded, without the query
    query: str  # raw query string
    headers: tuple[tuple[str, str], ...]
    body: bytes | None
    tls: bool
    peer: int = 0  # the client's port: requests with the same one came on the same connection

    def header(self, name: str) -> list[str]:
        """Every value of header `name` (case-insensitive), in order."""
        return [value for key, value in self.headers if key.lower() == name.lower()]

    @property
    def header_names(self) -> set[str]:
        return {key.lower() for key, _ in self.headers}


class Upstream:
    """An aiohttp server on 127.0.0.1 (optionally TLS) in its own thread and loop.

    Endpoints (any method unless said):
      /echo/...            200 JSON {"n", "method", "path", "body"}; never echoes headers or query
      /status/NNN          that status with a short body
      /cookie              200 with Set-Cookie headers
      /redirect?to=URL     302 with Location: URL (default https://elsewhere.example/landing)
      /sse?gate=G          text/event-stream: one event, wait for gate G (default "sse"), then the rest
      /hang?gate=G         wait for gate G (default "hang") before answering
      /hold/NAME           wait for gate NAME, then 200 "held NAME"
      /stream?bytes=N&hold_at=M&length=1&gate=G
                           N bytes of `pattern`, chunked (or with Content-Length when length=1);
                           after M bytes it waits for gate G (default "stream")
    """

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="upstream", daemon=True)
        self._lock = threading.Lock()
        self._seen: list[Seen] = []
        self._connections = 0
        self._gates: dict[str, asyncio.Event] = {}
        self._arrived: dict[str, threading.Event] = {}
        self._released: dict[str, bool] = {}
        self._waiting: dict[str, web.Request] = {}  # the request waiting on each gate (hang and sse)
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Upstream:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        for name in list(self._gates):
            self.release(name)
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> Upstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        server = self._runner.server
        assert server is not None

        def counting_factory() -> asyncio.BaseProtocol:
            with self._lock:
                self._connections += 1
            return server()

        self._server = await self._loop.create_server(counting_factory, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- what the test reads and controls --------------------------------------------------------

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    def entry(self, host: str = "127.0.0.1") -> str:
        """An allowlist entry naming this server, e.g. http://127.0.0.1:PORT."""
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def requests(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    def contacts(self) -> tuple[int, int]:
        """(connections accepted, requests received): unchanged means nothing reached this server."""
        with self._lock:
            return self._connections, len(self._seen)

    def requests_to(self, path_prefix: str) -> list[Seen]:
        return [seen for seen in self.requests if seen.path.startswith(path_prefix)]

    def release(self, name: str) -> None:
        """Open gate `name`: a waiting endpoint continues (and any later one does not wait)."""
        self._loop.call_soon_threadsafe(self._gate(name).set)

    def arrived(self, name: str) -> threading.Event:
        """Set once an endpoint has started waiting on gate `name`."""
        with self._lock:
            return self._arrived.setdefault(name, threading.Event())

    def dropped(self, name: str) -> bool:
        """True once the connection of the request waiting on gate `name` (hang, sse) has closed."""
        with self._lock:
            request = self._waiting.get(name)
        return request is not None and request.transport is None

    def was_released(self, name: str) -> bool:
        """True when the endpoint waiting on `name` went on because the test opened the gate."""
        with self._lock:
            return self._released.get(name, False)

    # -- the server side -------------------------------------------------------------------------

    def _gate(self, name: str) -> asyncio.Event:
        event = self._gates.get(name)
        if event is None:
            event = self._gates[name] = asyncio.Event()
        return event

    async def _wait(self, name: str, request: web.Request | None = None) -> None:
        gate = self._gate(name)
        if request is not None:
            with self._lock:
                self._waiting[name] = request
        self.arrived(name).set()
        try:
            await asyncio.wait_for(gate.wait(), HOLD_LIMIT_SECONDS)
        except TimeoutError:
            return
        with self._lock:
            self._released[name] = True

    def _record(self, request: web.Request, body: bytes | None) -> int:
        path, _, query = request.raw_path.partition("?")
        peername = request.transport.get_extra_info("peername") if request.transport is not None else None
        seen = Seen(request.method, path, query, tuple(request.headers.items()), body,
                    self.ssl_context is not None, int(peername[1]) if peername else 0)
        with self._lock:
            self._seen.append(seen)
            return len(self._seen) - 1

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            body: bytes | None = await request.read()
        except Exception:
            body = None
        n = self._record(request, body)
        if body is None:
            raise web.HTTPBadRequest()
        parts = request.path.strip("/").split("/")
        endpoint = parts[0]
        if endpoint == "status" and len(parts) > 1 and parts[1].isdigit():
            return web.Response(status=int(parts[1]), text=f"status {parts[1]}")
        if endpoint == "cookie":
            response = web.Response(text="cookie set", headers={"X-Upstream": "kept"})
            response.headers.add("Set-Cookie", "session=abc123; Path=/; HttpOnly")
            response.headers.add("Set-Cookie", "other=def456")
            return response
        if endpoint == "redirect":
            target = request.query.get("to", "https://elsewhere.example/landing")
            return web.Response(status=302, headers={"Location": target}, text="moved")
        if endpoint == "sse":
            return await self._sse(request)
        if endpoint == "hang":
            await self._wait(request.query.get("gate", "hang"), request)
            return web.Response(text="too late")
        if endpoint == "hold" and len(parts) > 1:
            await self._wait(parts[1])
            return web.Response(text=f"held {parts[1]}")
        if endpoint == "stream":
            return await self._stream(request)
        payload: dict[str, Any] = {"n": n, "method": request.method, "path": request.path,
                                   "body": body.decode("utf-8", "replace")}
        return web.json_response(payload)

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        await response.write(b"event: message\ndata: first\n\n")
        await self._wait(request.query.get("gate", "sse"), request)
        await response.write(b"data: second\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        size = int(request.query.get("bytes", "0"))
        hold_at = int(request.query.get("hold_at", "-1"))
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if request.query.get("length") == "1":
            response.content_length = size
        await response.prepare(request)
        data = memoryview(pattern(size))
        pos = 0
        while pos < size:
            if pos == hold_at:
                await self._wait(request.query.get("gate", "stream"))
            end = min(pos + len(BLOCK), size)
            if pos < hold_at < end:
                end = hold_at
            await response.write(data[pos:end])
            pos = end
        await response.write_eof()
        return response


# -- TLS material ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PKI:
    """A CA and one server certificate signed by it, as PEM files."""

    ca_pem: Path
    cert_pem: Path
    key_pem: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_pem, self.key_pem)
        return context

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_pem))


def make_pki(directory: Path, names: Iterable[str] = ("localhost",),
             addresses: Iterable[str] = ("127.0.0.1", "::1"), label: str = "Aegis Test") -> PKI:
    """Write a fresh CA and a server certificate for `names` and `addresses` into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{label} CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{label} server")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pki = PKI(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    pki.ca_pem.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    pki.key_pem.chmod(0o600)
    return pki
