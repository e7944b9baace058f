"""vLLM endpoint plugin (`vllm.endpoint_plugins`): our routes on vLLM's OpenAI server.

The decisions are made in the worker process; these routes reach it with
`engine_client.collective_rpc` into methods of `attention_backend.worker.QadaCPUWorker`.
"""

from __future__ import annotations

import json
from argparse import Namespace

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from serving.config import AttentionConfig, describe
from serving.middleware import openai_error

router = APIRouter()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(openai_error(status, message), status_code=status)


async def _rpc(request: Request, method: str, *args):
    """The first worker's answer (one worker per engine on CPU)."""
    return (await request.app.state.qada_engine.collective_rpc(method, args=args))[0]


@router.get("/v1/qada/policy")
async def get_policy(request: Request):
    """The attention policy in force (`{"enabled": false}` on a stock-attention server)."""
    if not request.app.state.qada_enabled:
        return {"enabled": False}
    return {"enabled": True, **await _rpc(request, "qada_settings")}


@router.put("/v1/qada/policy")
async def put_policy(request: Request):
    """Replace the policy of the running engine (same keys as the config's `attention` section).
    Takes effect at the next decode step; counters keep accumulating."""
    if not request.app.state.qada_enabled:
        return _error(409, "QAdA attention is not enabled on this server (attention.enabled: false)")
    try:
        body = await request.json()
        settings = AttentionConfig.model_validate({**body, "enabled": True}).settings().model_dump()
    except ValueError as exc:  # malformed JSON or ValidationError
        detail = describe(exc) if isinstance(exc, ValidationError) else str(exc)
        return _error(400, f"invalid policy: {detail}")
    try:
        applied = await _rpc(request, "qada_configure", settings)
    except Exception as exc:  # a file the worker could not load, for instance
        return _error(400, f"policy rejected by the engine: {exc}")
    return {"enabled": True, **applied}


@router.get("/v1/qada/stats")
async def get_stats(request: Request):
    """Decode-time decisions so far, per layer, at query-head and KV-group level."""
    if not request.app.state.qada_enabled:
        return {"enabled": False}
    counters = await _rpc(request, "qada_counters")
    total = {
        key: sum(layer[key] for layer in counters["layers"].values())
        for key in ("rows", "long_heads", "long_groups", "kv_bytes_read", "kv_bytes_skipped")
    }
    heads, groups = total["rows"] * counters["num_heads"], total["rows"] * counters["num_kv_heads"]
    return {
        "enabled": True,
        "policy": await _rpc(request, "qada_settings"),
        "head_decisions": {"long": total["long_heads"], "local": heads - total["long_heads"]},
        "kv_group_decisions": {"long": total["long_groups"], "local": groups - total["long_groups"]},
        "kv_bytes": {"read": total["kv_bytes_read"], "skipped": total["kv_bytes_skipped"]},
        **counters,
    }


@router.get("/v1/qada/requests/{request_id}/decisions")
async def get_request_decisions(request_id: str, request: Request):
    """For one recent request (its response id): per generated token, per layer, which query
    heads went long (1) or stayed local (0). The worker keeps the most recent requests only."""
    if not request.app.state.qada_enabled:
        return _error(409, "QAdA attention is not enabled on this server")
    trace = await _rpc(request, "qada_request_trace", request_id)
    if trace is None:
        return _error(
            404, f"no decisions recorded for request {request_id!r} (only recent requests are kept)"
        )
    return trace


class QadaEndpoints:
    name = "qada_endpoints"
    required_tasks = None

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)

    async def init_state(self, engine_client, state, args: Namespace) -> None:
        extra = getattr(args, "additional_config", None) or {}
        if isinstance(extra, str):
            extra = json.loads(extra)
        state.qada_enabled = "qada" in extra and engine_client is not None
        state.qada_engine = engine_client


def make_plugin() -> QadaEndpoints:
    return QadaEndpoints()
