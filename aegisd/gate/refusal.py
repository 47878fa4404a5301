"""A refused request: HTTP status, stable error code and a message safe to show an agent."""

from __future__ import annotations

import json

from aiohttp import web

REQUEST_ID_HEADER = "X-Aegis-Request-Id"


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


def error_response(refusal: Refusal, request_id: str) -> web.Response:
    body = json.dumps({"error": {"code": refusal.code, "message": refusal.message, "request_id": request_id}})
    response = web.Response(status=refusal.status, text=body, content_type="application/json",
                            headers={REQUEST_ID_HEADER: request_id, **refusal.headers})
    if refusal.close:
        response.force_close()
    return response
