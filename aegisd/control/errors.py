"""Map daemon errors to gRPC statuses, with the stable reason in the `aegis-reason` trailer."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from aegisd.errors import AegisError, Kind

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

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self = TypeVar("Self")
Handler = Callable[[Self, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]


def rpc(handler: Handler[Self, Req, Resp]) -> Handler[Self, Req, Resp]:
    """Wrap an RPC so daemon errors become precise statuses and nothing else leaks out."""

    @functools.wraps(handler)
    async def wrapper(self: Self, request: Req, context: grpc.aio.ServicerContext[Any, Any]) -> Resp:
        try:
            return await handler(self, request, context)
        except AegisError as exc:
            context.set_trailing_metadata(((REASON_KEY, exc.reason),))
            await context.abort(STATUS[exc.kind], exc.message)
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("control RPC %s failed", handler.__name__)
            context.set_trailing_metadata(((REASON_KEY, "internal"),))
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in aegisd; see its log")
        raise AssertionError("unreachable: abort raises")

    return wrapper
