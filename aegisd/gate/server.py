"""The gate's listener: aiohttp's low-level server, and a drain on shutdown."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from aegisd.gate.pipeline import GatePipeline


class GateError(Exception):
    """The gate cannot listen; the message says where and why."""


class GateServer:
    def __init__(self, pipeline: GatePipeline, host: str, port: int) -> None:
        self.pipeline = pipeline
        self.host = host
        self.port = port
        # auto_decompress off: a compressed request body is forwarded as sent, with its Content-Encoding
        # (aiohttp would otherwise inflate it and the upstream would get plain bytes labelled gzip).
        server = web.Server(pipeline.handle, access_log=None, auto_decompress=False)
        self._runner = web.ServerRunner(server, handle_signals=False)
        self._site: web.TCPSite | None = None

    async def start(self) -> None:
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        try:
            await self._site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise GateError(f"cannot listen on {self.host}:{self.port} for the gate: {exc.strerror}; "
                            "choose another --gate-listen") from None

    async def stop(self, grace: float) -> None:
        """Stop accepting, answer 503 to new requests on open connections, let in-flight ones finish."""
        self.pipeline.draining = True
        if self._site is not None:
            await self._site.stop()
        deadline = time.monotonic() + grace
        while self.pipeline.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await self._runner.cleanup()
