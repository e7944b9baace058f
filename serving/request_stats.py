"""ASGI middleware: each generation request tagged, so its decisions are found exactly, and
per-request QAdA decisions in `usage.qada` for clients that ask.

Every completion and chat request gets a fresh tag in its `vllm_xargs`
(`attention_backend.request_log.REQUEST_TAG`, replacing any a client sent), which vLLM carries into
the sampling parameters the worker sees: the worker keys its per-request log by it. The response
id is mapped to the tag here (`RequestTags`), so lookups by response id are exact even when
clients choose ids (`X-Request-Id`, `request_id`) that repeat or prefix one another.

Opt in to `usage.qada` per request with the header `X-QAdA-Stats: 1` (one round-trip to the
worker after the response is complete). Non-streaming responses get it in `usage`; streaming
responses in the final usage chunk, so they need `stream_options: {"include_usage": true}`.
"""

from __future__ import annotations

import json
import secrets
from collections import OrderedDict

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from attention_backend.request_log import REQUEST_TAG
from serving.middleware import send_body

ROUTES = ("/v1/completions", "/v1/chat/completions")
HEADER = "x-qada-stats"


class RequestTags:
    """Response id -> tag of the most recent `limit` responses (a repeated id: the latest)."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit, self.tags = limit, OrderedDict()

    def record(self, response_id: str, tag: str) -> None:
        self.tags.pop(response_id, None)
        self.tags[response_id] = tag
        while len(self.tags) > self.limit:
            self.tags.popitem(last=False)

    def get(self, response_id: str) -> str | None:
        return self.tags.get(response_id)


class QadaRequestStats:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = getattr(scope.get("app"), "state", None)
        if (
            scope["type"] != "http"
            or scope["path"] not in ROUTES
            or scope.get("method") != "POST"
            or not getattr(state, "qada_enabled", False)
        ):
            await self.app(scope, receive, send)
            return
        tag = secrets.token_hex(12)
        body = _tagged(await _read_body(receive), tag)
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        wants_stats = Headers(scope=scope).get(HEADER) in ("1", "true")
        engine, tags = state.qada_engine, state.qada_request_tags
        start: Message | None = None
        streaming, recorded = False, False
        pending = b""  # body bytes not yet complete events / JSON

        async def note(payload: dict, final: bool) -> None:
            """Map the response id to the tag; add usage.qada to a final usage payload."""
            nonlocal recorded
            if not recorded and isinstance(payload.get("id"), str):
                tags.record(payload["id"], tag)
                recorded = True
            usage = payload.get("usage")
            if final and wants_stats and isinstance(usage, dict):
                usage["qada"] = (await engine.collective_rpc("qada_request_stats", args=(tag,)))[0]

        async def wrapped(message: Message) -> None:
            nonlocal start, streaming, pending
            if message["type"] == "http.response.start":
                content_type = Headers(raw=message.get("headers", [])).get("content-type", "")
                streaming = content_type.startswith("text/event-stream")
                if message["status"] != 200 or streaming:
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
                out = [await _noted(event, note, recorded, wants_stats) for event in events]
                body = b"".join(event + b"\n\n" for event in out)
                if not more:
                    body, pending = body + pending, b""
                await send({"type": "http.response.body", "body": body, "more_body": more})
            elif not more:
                payload = json.loads(pending)
                await note(payload, final=True)
                await send_body(send, start, json.dumps(payload).encode())

        await self.app(scope, _replay(body, receive), wrapped)


async def _read_body(receive: Receive) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def _tagged(body: bytes, tag: str) -> bytes:
    """The request body with the tag in its vllm_xargs (unchanged if it is not a JSON object
    with an object or no vllm_xargs: vLLM answers that with its own 400)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body
    if not isinstance(payload, dict) or not isinstance(payload.get("vllm_xargs") or {}, dict):
        return body
    payload["vllm_xargs"] = {**(payload.get("vllm_xargs") or {}), REQUEST_TAG: tag}
    return json.dumps(payload).encode()


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the app `body` first, then the client's own messages (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _noted(event: bytes, note, recorded: bool, wants_stats: bool) -> bytes:
    """An SSE event, noted if it carries the first id or the final usage (with usage.qada added)."""
    if not event.startswith(b"data: {") or (recorded and not (wants_stats and b'"usage"' in event)):
        return event
    payload = json.loads(event[len(b"data: ") :])
    final = bool(payload.get("usage"))
    await note(payload, final)
    return b"data: " + json.dumps(payload).encode() if final and wants_stats else event
