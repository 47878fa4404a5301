"""An answer to every request over stdio, even one the MCP SDK cannot parse.

The SDK's stdio reader parses each line with pydantic, whose JSON parser refuses a lone surrogate escape
(`"\\ud800"`: valid JSON syntax, but no Unicode character); it hands the error to the server loop, which drops
it without a word, so the host waits for ever for that request's answer. `AnsweredParseErrors` sits between
the two and answers such a line with a JSON-RPC parse error (-32700) carrying the request's id, read with
Python's own JSON parser, which accepts the escape. A line that is no JSON (or a JSON object followed by more) gets
the parse error too, as JSON-RPC asks: with the id of the request it starts with, else with id null. A notification
Python can read gets nothing, as JSON-RPC asks; a blank line holds no message and gets nothing either. A line nested
too deeply for either parser (thousands of `[`) is a parse error to id null, never an exception that ends the
server loop and with it the bridge.

JSON that is no JSON-RPC message gets an Invalid Request error (-32600), as JSON-RPC asks: an object without a
string `method` (`{"jsonrpc": "2.0", "id": 4}`), one whose `params` is no object, a bare number or string, and a
batch (a JSON array), which the MCP SDK does not take: each request in it is answered with its own id, else one
error goes to id null. A malformed response (an object with `result` or `error` and no `method`) gets nothing, as
JSON-RPC answers no response.
"""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any

import anyio
from mcp.shared.message import SessionMessage
from mcp.types import INVALID_REQUEST, PARSE_ERROR, ErrorData, JSONRPCError
from pydantic import ValidationError

from aegisctl.mcp.results import SURROGATE

Item = SessionMessage | Exception


class AnsweredParseErrors:
    """The server loop's read stream: the SDK's, with each unparseable request answered on `write` instead of
    passed on to be dropped. Everything else (and the sender's context, `last_context`) passes unchanged."""

    def __init__(self, inner: Any, write: Any) -> None:
        self._inner = inner
        self._write = write

    @property
    def last_context(self) -> Any:
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> Item:
        while True:
            item: Item = await self._inner.receive()
            if isinstance(item, Exception):
                answers = error_answers(item)
                for answer in answers:
                    await self._write.send(SessionMessage(answer))
                if answers:
                    continue
            return item

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __aiter__(self) -> AnsweredParseErrors:
        return self

    async def __anext__(self) -> Item:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> AnsweredParseErrors:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        await self.aclose()
        return None


def error_answers(exc: Exception) -> list[JSONRPCError]:
    """The answers to a line the SDK could not take: a parse error, or Invalid Request errors; none for a blank
    line, a notification, a malformed response, or an error that is not about the line."""
    if not isinstance(exc, ValidationError):
        return []
    answer = parse_error_answer(exc)
    if answer is not None:
        return [answer]
    return invalid_request_answers(exc)


def parse_error_answer(exc: Exception) -> JSONRPCError | None:
    """The answer to a line the SDK could not parse as JSON; None for a blank line or a notification."""
    if not isinstance(exc, ValidationError):
        return None
    errors = exc.errors(include_url=False)
    if len(errors) != 1 or errors[0]["type"] != "json_invalid" or not isinstance(errors[0].get("input"), str):
        return None
    line = errors[0]["input"]
    text = f"Parse error: {errors[0]['msg']}"  # pydantic's words name the position, never quote the line
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's parser goes
        if not line.strip():
            return None
        return _parse_error(_request_id(_leading_object(line)), text)
    request_id = _request_id(message)
    if request_id is None:
        return None
    if _holds_surrogate(message):
        text = ("Parse error: the message holds a lone surrogate (a JSON escape such as \\ud800 without its pair), "
                "which is no Unicode character; send valid Unicode (U+FFFD for a character that cannot be shown)")
    return _parse_error(request_id, text)


def _parse_error(request_id: int | str | None, text: str) -> JSONRPCError:
    return JSONRPCError(jsonrpc="2.0", id=request_id, error=ErrorData(code=PARSE_ERROR, message=text))


def _leading_object(line: str) -> Any:
    """The JSON value the line starts with (junk may follow it), or None: it may name the request to answer."""
    try:
        return json.JSONDecoder().raw_decode(line.lstrip())[0]
    except (ValueError, RecursionError):
        return None


def _request_id(message: Any) -> int | str | None:
    """The id of a request, one an answer can carry; None for anything else."""
    request_id = message.get("id") if isinstance(message, dict) and "method" in message else None
    if isinstance(request_id, bool) or not isinstance(request_id, int | str) or (
            isinstance(request_id, str) and SURROGATE.search(request_id)):
        return None
    return request_id


def invalid_request_answers(exc: ValidationError) -> list[JSONRPCError]:
    """Invalid Request answers to JSON that is no JSON-RPC message (the SDK parsed it, then found no message
    type that fits). The value is read from pydantic's errors: an error about the whole value carries it, and
    so does one about a missing member of the top object."""
    found = _top_value(exc)
    if found is None:
        return []
    value = found[0]
    if isinstance(value, list):
        answered = [_invalid_request(request_id, "a batch (a JSON array) is not supported: send each message on "
                                     "its own line") for request_id in
                    dict.fromkeys(_request_id(each) for each in value) if request_id is not None]
        return answered or [_invalid_request(None, "a batch (a JSON array) is not supported: send each message "
                                                   "on its own line")]
    if isinstance(value, dict):
        # Answered only as a request: JSON-RPC answers no notification, and an object without a method may be the
        # host's own (malformed) response to a request of ours, whose id an answer would seem to answer again.
        request_id = _request_id(value)
        if request_id is None:
            return []
        return [_invalid_request(request_id, "not a JSON-RPC 2.0 request: it needs \"jsonrpc\": \"2.0\", a string "
                                             "\"method\", an integer or string \"id\", and \"params\" (if any) an "
                                             "object")]
    return [_invalid_request(None, "not a JSON-RPC 2.0 message: send one JSON object per line")]


def _top_value(exc: ValidationError) -> tuple[Any] | None:
    for error in exc.errors(include_url=False, include_context=False):
        location = error["loc"]
        if len(location) == 1 or (len(location) == 2 and error["type"] == "missing"):
            return (error.get("input"),)
    return None


def _invalid_request(request_id: int | str | None, why: str) -> JSONRPCError:
    return JSONRPCError(jsonrpc="2.0", id=request_id, error=ErrorData(code=INVALID_REQUEST,
                                                                      message=f"Invalid Request: {why}"))


def _holds_surrogate(value: Any) -> bool:
    """Whether a string anywhere in the value holds a lone surrogate; iterative, as the value may be deep."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if SURROGATE.search(item) is not None:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False
