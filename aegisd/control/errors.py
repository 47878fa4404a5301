"""Map daemon errors to gRPC statuses, with the stable reason in the `aegis-reason` trailer.

`@rpc` wraps unary handlers, `@stream_rpc` server-streaming ones (async generators): an AegisError
becomes its status, reason and message, whether it is raised before the first message or between two.
Anything else is logged as log_safe allows (its type and where it was raised, never its text, which may
hold data) and answered INTERNAL with a fixed message. A request grpc cannot decode (not protobuf, a string field
not UTF-8) is answered INVALID_ARGUMENT, reason `undecodable_request`: see RequestDecoding, the server's interceptor.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import traceback
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar, cast

import grpc

from aegisd.errors import AegisError, InvalidArgument, Kind, log_safe
from aegisd.logs import event

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


UNDECODABLE = "undecodable_request"


class RequestDecoding(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]  # generic in the stubs only
    """Hands grpc handlers that decode their request themselves, so bytes that are not the request (malformed
    protobuf, a string field that is not UTF-8) end the call INVALID_ARGUMENT with a fixed message and one warning
    line in the log.

    grpc decodes a request before the handler runs, out of reach of @rpc: a failure there answered UNKNOWN with
    protobuf's own text ("Unexpected <class 'DecodeError'>: ...") and logged a traceback. A unary request now comes
    to the handler as bytes and is decoded there, where the call can be ended properly. A streamed one (Restore's
    chunks) is decoded as the handler reads it, inside @rpc, which answers the InvalidArgument its decoder raises."""

    def __init__(self) -> None:
        # per method: grpc's handler and ours for it, made once (the services are registered before the start)
        self._handlers: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler: grpc.RpcMethodHandler[Any, Any] | None = await continuation(handler_call_details)
        if handler is None:  # no such method (the stubs leave None out): grpc answers UNIMPLEMENTED
            return None  # type: ignore[return-value]
        method = handler_call_details.method
        known = self._handlers.get(method)
        if known is None or known[0] is not handler:
            known = self._handlers[method] = (handler, _decoding(handler, method.lstrip("/")))
        return known[1]


def _decoding(handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler`, its request decoded by _decoder: by its behaviour for a unary request (grpc passes it the bytes),
    by grpc as the behaviour reads them for a streamed one. Handlers of another shape (sync) are left as they are."""
    deserialize = handler.request_deserializer
    if deserialize is None:
        return handler
    decode, serialize = _decoder(deserialize, method), handler.response_serializer
    if handler.request_streaming:
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(cast(Any, handler.stream_stream), decode, serialize)
        return grpc.stream_unary_rpc_method_handler(cast(Any, handler.stream_unary), decode, serialize)
    if handler.response_streaming:
        behaviour: Any = handler.unary_stream
        if inspect.isasyncgenfunction(behaviour):
            return grpc.unary_stream_rpc_method_handler(_decoded_stream(behaviour, decode), None, serialize)
        if inspect.iscoroutinefunction(behaviour):  # writes its messages (context.write): the health service's Watch
            return grpc.unary_stream_rpc_method_handler(_decoded(behaviour, decode), None, serialize)
        return handler
    behaviour = handler.unary_unary
    if inspect.iscoroutinefunction(behaviour):
        return grpc.unary_unary_rpc_method_handler(_decoded(behaviour, decode), None, serialize)
    return handler


def _decoder(deserialize: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
    """`deserialize`, raising InvalidArgument (and logging a line) where it fails; no byte of the request is
    repeated, in the message or the log."""
    wanted = getattr(getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None), "full_name", "request")

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # protobuf's DecodeError (whatever its decoder raises: the bytes are at fault)
            utf8 = "utf-8" in str(exc).lower()  # upb: "String field had bad UTF-8"; python: "'utf-8' codec ..."
            problem = "a string field is not valid UTF-8" if utf8 else f"it is not a well-formed {wanted}"
            event(log, logging.WARNING, "control request could not be decoded", method=method,
                  problem="bad_utf8" if utf8 else "malformed")
            raise InvalidArgument(f"the request could not be decoded: {problem}", reason=UNDECODABLE) from None

    return decode


def _decoded(behaviour: Callable[[Any, Ctx], Awaitable[Any]], decode: Callable[[bytes], Any]
             ) -> Callable[[bytes, Ctx], Awaitable[Any]]:
    async def call(data: bytes, context: Ctx) -> Any:
        return await behaviour(await _request(decode, data, context), context)

    return call


def _decoded_stream(behaviour: Callable[[Any, Ctx], AsyncGenerator[Any, None]], decode: Callable[[bytes], Any]
                    ) -> Callable[[bytes, Ctx], AsyncGenerator[Any, None]]:
    async def stream(data: bytes, context: Ctx) -> AsyncGenerator[Any, None]:
        request = await _request(decode, data, context)
        async with contextlib.aclosing(behaviour(request, context)) as messages:  # closed with this one, as @stream_rpc
            async for message in messages:
                yield message

    return stream


async def _request(decode: Callable[[bytes], Any], data: bytes, context: Ctx) -> Any:
    try:
        return decode(data)
    except InvalidArgument as exc:
        await abort(context, exc)
