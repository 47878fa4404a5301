"""A refused request: HTTP status, stable error code and a message safe to show an agent."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aegisd.gate.agent_connection import GateRequest

REQUEST_ID_HEADER = "X-Aegis-Request-Id"
JSON_CONTENT_TYPE = "application/json; charset=utf-8"


class Refusal(Exception):
    """Ends the pipeline with `{"error": {"code", "message", "request_id"}}`."""

    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None,
                 close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.close = close


async def send_refusal(request: GateRequest, refusal: Refusal, request_id: str) -> None:
    """Answer with the refusal's status and JSON error; closes the connection after if the refusal says so."""
    body = json.dumps({"error": {"code": refusal.code, "message": refusal.message, "request_id": request_id}})
    headers = {"Content-Type": JSON_CONTENT_TYPE, REQUEST_ID_HEADER: request_id, **refusal.headers}
    await request.respond(refusal.status, body.encode(), headers, close=refusal.close)
