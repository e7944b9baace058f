"""ASGI middleware: the server's keys, on every route.

vLLM's own `--api-key` check guards only paths under /v1, /v2, /inference and /cohere, so
`/invocations` (which generates), `/tokenize`, `/detokenize`, `/scale_elastic_ep` and the scoring
routes stay open. Here every route needs the API key except the public ones below, and policy
changes (`ADMIN_METHODS` on `/v1/qada/policy`) need the admin key (`admin_api_key`, else
`api_key`). A server with no key at all takes no policy change unless
`attention.allow_policy_changes` is set. The keys come from the launcher's environment
(`QADA_API_KEY`, `QADA_ADMIN_API_KEY`, `QADA_ALLOW_POLICY_CHANGES`); tokens are compared with
vLLM's own constant-time check.
"""

from __future__ import annotations

import os

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

from serving.middleware import openai_error

PUBLIC_PATHS = ("/health", "/ping", "/metrics", "/version")  # GET/HEAD only, no key
POLICY_PATH = "/v1/qada/policy"
ADMIN_METHODS = ("PUT", "PATCH", "POST", "DELETE")


def _key_check(key: str | None):
    """A token check for `key` (vLLM's), or None without a key."""
    return AuthenticationMiddleware(None, [key]).verify_token if key else None


class ApiKeys:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        api_key, admin_key = os.environ.get("QADA_API_KEY"), os.environ.get("QADA_ADMIN_API_KEY")
        self.api_ok, self.admin_ok = _key_check(api_key), _key_check(admin_key or api_key)
        self.policy_changes_open = os.environ.get("QADA_ALLOW_POLICY_CHANGES") == "1"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        denial = self._denial(scope)
        if denial is None:
            await self.app(scope, receive, send)
            return
        status, message = denial
        await JSONResponse(openai_error(status, message), status_code=status)(scope, receive, send)

    def _denial(self, scope: Scope) -> tuple[int, str] | None:
        """(status, message) when the request may not pass, else None."""
        path = scope["path"].removeprefix(scope.get("root_path", "")).rstrip("/") or "/"
        method = scope.get("method", "GET")
        headers = Headers(scope=scope)
        if path == POLICY_PATH and method in ADMIN_METHODS:
            if self.admin_ok is None:
                if self.policy_changes_open:
                    return None
                return 403, (
                    "policy changes are off on this server: start it with admin_api_key (or "
                    "api_key), or with attention.allow_policy_changes: true"
                )
            if self.admin_ok(headers):
                return None
            if self.api_ok is not None and self.api_ok(headers):
                return 403, "policy changes need the admin key"
            return 401, "policy changes need the admin key (Authorization: Bearer ...)"
        if self.api_ok is None or method == "OPTIONS":
            return None
        if method in ("GET", "HEAD") and path in PUBLIC_PATHS:
            return None
        if self.api_ok(headers) or (self.admin_ok is not None and self.admin_ok(headers)):
            return None
        return 401, "a valid API key is needed (Authorization: Bearer ...)"
