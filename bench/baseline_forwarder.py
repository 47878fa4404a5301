"""The "plain Python" baseline: about the least an aiohttp forwarder can do, on uvloop like the gate.

A pooled client session, both bodies streamed, hop-by-hop headers dropped; no checks, no ledger.
`python bench/baseline_forwarder.py PORT UPSTREAM_URL`
"""

from __future__ import annotations

import asyncio
import signal
import sys

import aiohttp
import uvloop
from aiohttp import web
from multidict import CIMultiDict

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                        "upgrade", "host", "content-length"})


def _headers(source: CIMultiDict[str] | web.BaseRequest) -> CIMultiDict[str]:
    items = source.headers.items() if isinstance(source, web.BaseRequest) else source.items()
    return CIMultiDict((k, v) for k, v in items if k.lower() not in HOP_BY_HOP)


async def serve(port: int, upstream: str) -> None:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, limit_per_host=256),
                                    auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())

    async def forward(request: web.BaseRequest) -> web.StreamResponse:
        headers = _headers(request)
        if request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)
        body = request.content.iter_any() if request.body_exists else None
        async with session.request(request.method, upstream + request.raw_path, headers=headers, data=body,
                                   allow_redirects=False) as reply:
            response = web.StreamResponse(status=reply.status, headers=_headers(CIMultiDict(reply.headers)))
            if reply.content_length is not None:
                response.content_length = reply.content_length
            await response.prepare(request)
            async for chunk in reply.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    runner = web.ServerRunner(web.Server(forward, access_log=None), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await runner.cleanup()
    await session.close()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), sys.argv[2].rstrip("/")))
