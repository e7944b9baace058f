"""ASGI middleware: each generation request tagged, so its decisions are found exactly, and
per-request QAdA decisions in `usage.qada` for clients that ask.

Every completion and chat request gets a fresh tag in its `vllm_xargs`
(`attention_backend.request_log.REQUEST_TAG`, replacing any a client sent; it begins with the
launch's secret, so a tag a client puts into another route is not trusted), which vLLM carries
into the sampling parameters the worker sees: the worker keys its per-request log by it. The response
id is mapped to the tag here (`RequestTags`), so lookups by response id are exact even when
clients choose ids (`X-Request-Id`, `request_id`) that repeat or prefix one another.

Opt in to `usage.qada` per request with the header `X-QAdA-Stats: 1` (one round-trip to the
worker after the response is complete). Non-streaming responses get it in `usage`; streaming
responses in the final usage chunk, so they need `stream_options: {"include_usage": true}`.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from attention_backend.ranks import merge_request_stats
from attention_backend.request_log import REQUEST_TAG, new_tag
from serving.middleware import send_body

ROUTES = ("/v1/completions", "/v1/chat/completions")
HEADER = "x-qada-stats"
_RESPONSE_ID = re.compile(rb'"id"\s*:\s*"([^"\\]{1,512})"')


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
        tag = new_tag()
        body = _tagged(await _read_body(receive), tag)
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        wants_stats = Headers(scope=scope).get(HEADER) in ("1", "true")
        engine, tags = state.qada_engine, state.qada_request_tags
        start: Message | None = None  # held until the body is complete (usage.qada, not streamed)
        streaming, ok, recorded = False, False, False
        pending = b""  # body bytes not yet complete events / JSON

        async def add_stats(payload: dict) -> None:
            if isinstance(payload.get("usage"), dict):
                answers = await engine.collective_rpc("qada_request_stats", args=(tag,))
                payload["usage"]["qada"] = merge_request_stats(answers)  # every rank's decisions

        async def wrapped(message: Message) -> None:
            nonlocal start, streaming, ok, recorded, pending
            if message["type"] == "http.response.start":
                content_type = Headers(raw=message.get("headers", [])).get("content-type", "")
                streaming, ok = content_type.startswith("text/event-stream"), message["status"] == 200
                if ok and wants_stats and not streaming:
                    start = message  # held: the body length will change
                else:
                    await send(message)
                return
            if message["type"] != "http.response.body" or not ok:
                await send(message)
                return
            if not recorded:  # the response id comes first in vLLM's JSON and in every chunk
                found = _RESPONSE_ID.search(message.get("body", b"")[:4096])
                if found:
                    tags.record(found.group(1).decode(), tag)
                    recorded = True
            if not wants_stats:
                await send(message)
                return
            pending += message.get("body", b"")
            more = message.get("more_body", False)
            if streaming:
                *events, pending = pending.split(b"\n\n")
                out = [await _with_stats(event, add_stats) for event in events]
                body = b"".join(event + b"\n\n" for event in out)
                if not more:
                    body, pending = body + pending, b""
                await send({"type": "http.response.body", "body": body, "more_body": more})
            elif not more:
                payload = json.loads(pending)
                await add_stats(payload)
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
    except (ValueError, RecursionError):
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


async def _with_stats(event: bytes, add_stats) -> bytes:
    """An SSE event, with usage.qada added if it is the final usage chunk."""
    if not event.startswith(b"data: {") or b'"usage"' not in event:
        return event
    payload = json.loads(event[len(b"data: ") :])
    if not payload.get("usage"):
        return event
    await add_stats(payload)
    return b"data: " + json.dumps(payload).encode()
