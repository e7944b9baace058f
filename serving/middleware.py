"""ASGI middleware giving every JSON error OpenAI's shape.

Most vLLM errors already are ``{"error": {"message", "type", "code", ...}}``, but some (its API-key
check answers ``{"error": "Unauthorized"}``) are not; clients parse ``error.message``.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}


def openai_error(status: int, message: str) -> dict:
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


class OpenAIErrorShape:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def reshape(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if message["status"] >= 400 and headers.get(b"content-type", b"").startswith(
                    b"application/json"
                ):
                    start = message  # hold it until we have seen the body
                    return
                await send(message)
            elif start is not None and message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                await _send_reshaped(send, start, b"".join(chunks))
            else:
                await send(message)

        await self.app(scope, receive, reshape)


async def _send_reshaped(send: Send, start: Message, body: bytes) -> None:
    status = start["status"]
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        message = error if isinstance(error, str) else HTTPStatus(status).phrase
        body = json.dumps(openai_error(status, message)).encode()
    await send_body(send, start, body)


async def send_body(send: Send, start: Message, body: bytes) -> None:
    """Send a held `http.response.start` with a rewritten body and its new content-length."""
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({**start, "headers": headers})
    await send({"type": "http.response.body", "body": body})
