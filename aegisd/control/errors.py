"""Map daemon errors to gRPC statuses, with the stable reason in the `aegis-reason` trailer.

`@rpc` wraps unary handlers, `@stream_rpc` server-streaming ones (async generators): an AegisError
becomes its status, reason and message, whether it is raised before the first message or between two.
Anything else is logged as log_safe allows (its type and where it was raised, never its text, which may
hold data) and answered INTERNAL with a fixed message.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import traceback
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from aegisd.errors import AegisError, Kind, log_safe

log = logging.getLogger("aegisd.control")

STATUS: dict[Kind, grpc.StatusCode] = {
    Kind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Kind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Kind.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Kind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Kind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Kind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Kind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Kind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Kind.DATA_LOSS: grpc.StatusCode.DATA_LOSS,
    Kind.INTERNAL: grpc.StatusCode.INTERNAL,
}
REASON_KEY = "aegis-reason"
INTERNAL_MESSAGE = "internal error in aegisd; see its log"
# A status message travels in a trailer, percent-encoded (a byte outside printable ASCII takes three), and gRPC
# drops trailers past its metadata limits (8 KiB soft, 16 KiB hard): the client got RESOURCE_EXHAUSTED instead.
# Messages quote input shortened (domains.quoted); this bound is for any that still grows with it.
MAX_MESSAGE_BYTES = 2048

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self = TypeVar("Self")
Ctx = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Self, Req, Ctx], Awaitable[Resp]]
StreamHandler = Callable[[Self, Req, Ctx], AsyncGenerator[Resp, None]]


def rpc(handler: Handler[Self, Req, Resp]) -> Handler[Self, Req, Resp]:
    """Wrap an RPC so daemon errors become precise statuses and nothing else leaks out."""

    @functools.wraps(handler)
    async def wrapper(self: Self, request: Req, context: Ctx) -> Resp:
        try:
            return await handler(self, request, context)
        except Exception as exc:
            await _fail(context, handler.__name__, exc)

    return wrapper


def stream_rpc(handler: StreamHandler[Self, Req, Resp]) -> StreamHandler[Self, Req, Resp]:
    """@rpc for a server-streaming RPC: the same mapping, for errors raised anywhere in the stream."""

    @functools.wraps(handler)
    async def wrapper(self: Self, request: Req, context: Ctx) -> AsyncGenerator[Resp, None]:
        try:
            # aclosing: a stream the client leaves (cancel, deadline) closes the handler's generator now,
            # so its `with` blocks (a ledger subscription, a scratch directory) end with the call.
            async with contextlib.aclosing(handler(self, request, context)) as stream:
                async for message in stream:
                    yield message
        except Exception as exc:
            await _fail(context, handler.__name__, exc)

    return wrapper


async def abort(context: Ctx, exc: AegisError) -> NoReturn:
    """End the call with the error's status and message, its reason in the trailer."""
    context.set_trailing_metadata(((REASON_KEY, exc.reason),))
    await context.abort(STATUS[exc.kind], bounded(exc.message))
    raise AssertionError("unreachable: abort raises")


def bounded(message: str) -> str:
    """`message`, cut to MAX_MESSAGE_BYTES of UTF-8 (at a character) and marked so when longer."""
    data = message.encode(errors="replace")
    if len(data) <= MAX_MESSAGE_BYTES:
        return message
    return data[:MAX_MESSAGE_BYTES].decode(errors="ignore") + " [... message cut]"


async def _fail(context: Ctx, name: str, exc: Exception) -> NoReturn:
    """How a failed RPC ends, unary or streaming: a daemon error with its status, an abort as it is, anything
    else as INTERNAL."""
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    if isinstance(exc, AegisError):
        await abort(context, exc)
    await _internal(context, name, exc)


async def _internal(context: Ctx, name: str, exc: Exception) -> NoReturn:
    log.error("control RPC %s failed: %s at %s", name, log_safe(exc), _where(exc))
    context.set_trailing_metadata(((REASON_KEY, "internal"),))
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    raise AssertionError("unreachable: abort raises")


def _where(exc: BaseException) -> str:
    """The innermost line of aegisd's own code the exception passed through, past these wrappers (else the
    innermost line): file, line and function are code, not data, so a log line may name them."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != __file__]
    if not frames:
        return "an unknown place"
    marker = f"{os.sep}aegisd{os.sep}"
    frame = next((f for f in reversed(frames) if marker in f.filename), frames[-1])
    path = frame.filename
    shown = path[path.rfind(marker) + 1:] if marker in path else os.path.basename(path)
    return f"{shown}:{frame.lineno} in {frame.name}"
