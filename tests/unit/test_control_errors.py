"""@rpc and @stream_rpc: the control API's error mapping, for unary and server-streaming handlers alike.

An AegisError becomes its status, reason trailer and message; anything else is answered INTERNAL with a
fixed message and logged by type and place only (log_safe), since its text may hold data."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import Any

import grpc
import pytest

from aegisd.control.errors import INTERNAL_MESSAGE, REASON_KEY, rpc, stream_rpc
from aegisd.errors import InvalidArgument, StorageUnavailable

DATA = "sk-data-in-an-exception-0123456789"


class Context:
    """What the wrappers use of grpc.aio.ServicerContext."""

    def __init__(self) -> None:
        self.trailers: tuple[tuple[str, str], ...] = ()
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.trailers = metadata

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()


class Service:
    def __init__(self) -> None:
        self.closed = False

    @stream_rpc
    async def Numbers(self, request: Exception | None, context: Any) -> AsyncGenerator[int, None]:
        try:
            yield 1
            yield 2
            if request is not None:
                raise request
            yield 3
        finally:
            self.closed = True

    @rpc
    async def One(self, request: Exception, context: Any) -> int:
        raise request


def stream(request: Exception | None) -> tuple[list[int], Context, Service]:
    service, context, got = Service(), Context(), []
    ctx: Any = context

    async def main() -> None:
        async for n in service.Numbers(request, ctx):
            got.append(n)

    with contextlib.suppress(grpc.aio.AbortError):  # the wrapper's abort ends the call; context.aborted says how
        asyncio.run(main())
    return got, context, service


def test_a_stream_that_ends_well_is_untouched() -> None:
    got, context, service = stream(None)
    assert got == [1, 2, 3] and context.aborted is None and service.closed


def test_an_aegis_error_mid_stream_gets_its_status_and_reason() -> None:
    got, context, service = stream(StorageUnavailable("the ledger cannot be read"))
    assert got == [1, 2]
    assert context.aborted == (grpc.StatusCode.UNAVAILABLE, "the ledger cannot be read")
    assert context.trailers == ((REASON_KEY, "storage_unavailable"),)
    assert service.closed


def test_an_unexpected_error_mid_stream_is_internal_and_logged_without_its_text(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="aegisd.control"):
        got, context, _ = stream(ValueError(DATA))
    assert got == [1, 2]
    assert context.aborted == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    assert context.trailers == ((REASON_KEY, "internal"),)
    assert "Numbers" in caplog.text and "ValueError" in caplog.text and "test_control_errors.py" in caplog.text
    assert DATA not in caplog.text and all(r.exc_info is None for r in caplog.records)


def test_a_client_leaving_closes_the_handler_at_once() -> None:
    service, context = Service(), Context()
    ctx: Any = context

    async def main() -> None:
        numbers = service.Numbers(None, ctx)
        assert await anext(numbers) == 1
        await numbers.aclose()  # what grpc does when the call is cancelled

    asyncio.run(main())
    assert service.closed and context.aborted is None


@pytest.mark.parametrize(("error", "status", "reason"), [
    (InvalidArgument("limit must be between 1 and 100000"), grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument"),
    (RuntimeError(DATA), grpc.StatusCode.INTERNAL, "internal"),
])
def test_unary_errors_map_the_same_way(caplog: pytest.LogCaptureFixture, error: Exception,
                                       status: grpc.StatusCode, reason: str) -> None:
    context = Context()
    ctx: Any = context

    async def main() -> None:
        await Service().One(error, ctx)

    with caplog.at_level(logging.ERROR, logger="aegisd.control"), pytest.raises(grpc.aio.AbortError):
        asyncio.run(main())
    assert context.aborted is not None and context.aborted[0] == status
    assert context.trailers == ((REASON_KEY, reason),)
    assert DATA not in caplog.text and all(r.exc_info is None for r in caplog.records)
