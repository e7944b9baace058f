"""ASGI middleware: per-request QAdA decisions in `usage.qada`, for clients that ask.

Opt in per request with the header `X-QAdA-Stats: 1` (it costs one round-trip to the worker
after the response is complete). Non-streaming responses get `usage.qada`; streaming responses
get it in the final usage chunk, so they need `stream_options: {"include_usage": true}`.
"""

from __future__ import annotations

import json

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.middleware import send_body

ROUTES = ("/v1/completions", "/v1/chat/completions")
HEADER = "x-qada-stats"


class QadaRequestStats:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = getattr(scope.get("app"), "state", None)
        if (
            scope["type"] != "http"
            or scope["path"] not in ROUTES
            or Headers(scope=scope).get(HEADER) not in ("1", "true")
            or not getattr(state, "qada_enabled", False)
        ):
            await self.app(scope, receive, send)
            return
        engine = state.qada_engine
        start: Message | None = None
        streaming = False
        pending = b""  # body bytes not yet complete events / JSON

        async def stats_for(payload: dict) -> None:
            usage = payload.get("usage")
            if isinstance(usage, dict) and payload.get("id"):
                usage["qada"] = (await engine.collective_rpc("qada_request_stats", args=(payload["id"],)))[0]

        async def wrapped(message: Message) -> None:
            nonlocal start, streaming, pending
            if message["type"] == "http.response.start":
                content_type = Headers(raw=message.get("headers", [])).get("content-type", "")
                if message["status"] != 200:
                    await send(message)
                    return
                streaming = content_type.startswith("text/event-stream")
                if streaming:
                    await send(message)
                else:
                    start = message  # held: the body length will change
                return
            if message["type"] != "http.response.body" or (start is None and not streaming):
                await send(message)
                return
            pending += message.get("body", b"")
            more = message.get("more_body", False)
            if streaming:
                *events, pending = pending.split(b"\n\n")
                out = [await _with_stats(event, stats_for) for event in events]
                body = b"".join(event + b"\n\n" for event in out)
                if not more:
                    body, pending = body + pending, b""
                await send({"type": "http.response.body", "body": body, "more_body": more})
            elif not more:
                payload = json.loads(pending)
                await stats_for(payload)
                await send_body(send, start, json.dumps(payload).encode())

        await self.app(scope, receive, wrapped)


async def _with_stats(event: bytes, stats_for) -> bytes:
    """An SSE event, with usage.qada added if it is the final usage chunk."""
    if not event.startswith(b"data: {") or b'"usage"' not in event:
        return event
    payload = json.loads(event[len(b"data: ") :])
    if not payload.get("usage"):
        return event
    await stats_for(payload)
    return b"data: " + json.dumps(payload).encode()
