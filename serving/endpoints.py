"""vLLM endpoint plugin (`vllm.endpoint_plugins`): our routes on vLLM's OpenAI server.

The decisions are made in the worker processes; these routes reach every one of them with
`engine_client.collective_rpc` into methods of `attention_backend.worker.QadaCPUWorker`, and
merge the answers of tensor- and pipeline-parallel ranks into the whole model's
(`attention_backend.ranks`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from argparse import Namespace

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from attention_backend.policy_files import ModelShape, PolicyError, one_line, read_policy_files
from attention_backend.ranks import LAYER_SUMS, merge_counters, merge_same, merge_traces
from attention_backend.settings import ActivePolicy, QadaSettings, describe
from serving.api_server import refusal
from serving.config import SERVER_KEYS
from serving.middleware import openai_error
from serving.request_stats import RequestTags

router = APIRouter()
logger = logging.getLogger("vllm.qada")  # under vLLM's logger: its handler and format


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(openai_error(status, message), status_code=status)


async def _answers(request: Request, method: str, *args) -> list:
    """Every worker's answer: one per rank of the engine."""
    return await request.app.state.qada_engine.collective_rpc(method, args=args)


async def _settings(request: Request) -> dict:
    return merge_same(await _answers(request, "qada_settings"))


@router.get("/v1/qada/policy")
async def get_policy(request: Request):
    """The attention policy in force (`{"enabled": false}` on a stock-attention server)."""
    if not request.app.state.qada_enabled:
        return {"enabled": False}
    return {"enabled": True, **await _settings(request)}


@router.put("/v1/qada/policy")
async def put_policy(request: Request):
    """Replace the policy of the running engine: the body is a whole policy (the keys of the
    config's `attention` section); keys it leaves out take their defaults. Takes effect at the
    next decode step; counters keep accumulating."""
    return await _change_policy(request, merge=False)


@router.patch("/v1/qada/policy")
async def patch_policy(request: Request):
    """Change only the keys the body gives; the others keep their values in force."""
    return await _change_policy(request, merge=True)


async def _change_policy(request: Request, merge: bool):
    """Validate a policy change completely here (keys, bounds from the model, the files it
    names, read from files_dir), then apply it on every rank, whole or not at all: each rank
    prepares it, and only if none refuses do all of them commit it, between the same two engine
    steps (`QadaWorkerMixin.qada_prepare`)."""
    state = request.app.state
    if not state.qada_enabled:
        return _error(409, "QAdA attention is not enabled on this server (attention.enabled: false)")
    try:  # the body is read before the lock: a slow client holds up no other change
        body = _policy_keys(await request.json())
    except (ValueError, RecursionError) as exc:  # malformed JSON, PolicyError
        return _rejected(f"invalid policy: {one_line(exc)}")
    async with state.qada_policy_lock:  # one change at a time: a PATCH merges onto the last
        try:
            base = await _settings(request) if merge else {}
            settings = QadaSettings.model_validate({**base, **body})
            files = await asyncio.to_thread(_checked_files, settings, state)  # off the event loop
        except ValidationError as exc:
            return _rejected(f"invalid policy: {describe(exc)}")
        except ValueError as exc:  # PolicyError
            return _rejected(f"invalid policy: {one_line(exc)}")
        token = secrets.token_hex(8)
        try:
            prepared = await _answers(request, "qada_prepare", settings.model_dump(), files, token)
        except Exception as exc:  # the engine is gone or failing: no traceback to the client
            logger.warning("policy change failed in the engine: %s", one_line(exc))
            return _error(503, "the engine could not apply the policy; the previous one stays")
        refusals = [answer["error"] for answer in prepared if "error" in answer]
        if refusals:  # only if a worker disagrees with the checks above
            return _rejected(f"policy rejected by the engine: {refusals[0]}")
        try:
            commits = await _answers(request, "qada_commit", token)
            failed = [answer["error"] for answer in commits if "error" in answer]
            if failed:  # only if another change came in between (several API servers)
                raise RuntimeError(failed[0])
            applied = merge_same(commits)
        except Exception as exc:
            logger.warning("policy commit failed in the engine: %s", one_line(exc))
            return _error(503, "the engine could not put the policy in force: GET /v1/qada/policy")
    logger.info("policy changed: %s", json.dumps(applied))
    return {"enabled": True, **applied}


def _policy_keys(body) -> dict:
    """The body's policy keys; PolicyError for what is not one."""
    if not isinstance(body, dict):
        raise PolicyError("the body must be a JSON object of policy keys")
    if body.pop("enabled", True) is not True:  # true: what GET says, so GET -> PUT works
        raise PolicyError("enabled: the attention backend is chosen at launch, not by a policy")
    server_keys = sorted(SERVER_KEYS & body.keys())
    if server_keys:
        raise PolicyError(f"{', '.join(server_keys)}: set at launch, not a policy key")
    return body


def _checked_files(settings: QadaSettings, state) -> dict:
    """The contents of the files `settings` name, after everything the worker checks (an
    `ActivePolicy` built on the host); raises PolicyError."""
    files = read_policy_files(settings, state.qada_files_dir)
    ActivePolicy.load(settings, state.qada_shape, files)
    return files


def _rejected(message: str) -> JSONResponse:
    logger.info("policy change rejected: %s", message)
    return _error(400, message)


@router.get("/v1/qada/stats")
async def get_stats(request: Request):
    """Decode-time decisions so far, per layer, at query-head and KV-group level."""
    if not request.app.state.qada_enabled:
        return {"enabled": False}
    counters = merge_counters(await _answers(request, "qada_counters"))
    total = {key: sum(layer[key] for layer in counters["layers"].values()) for key in ("rows", *LAYER_SUMS)}
    heads, groups = total["rows"] * counters["num_heads"], total["rows"] * counters["num_kv_heads"]
    return {
        "enabled": True,
        "policy": await _settings(request),
        "head_decisions": {"long": total["long_heads"], "local": heads - total["long_heads"]},
        "kv_group_decisions": {"long": total["long_groups"], "local": groups - total["long_groups"]},
        "kv_bytes": {
            "read": total["kv_bytes_read"],
            "skipped": total["kv_bytes_skipped"],
            "key_copy_read": total["key_copy_bytes_read"],
        },
        "kv_blocks_of_long_groups": {"read": total["kv_blocks_read"], "skipped": total["kv_blocks_skipped"]},
        **counters,
    }


@router.get("/v1/qada/requests/{request_id}/decisions")
async def get_request_decisions(request_id: str, request: Request):
    """For one recent request (its response id): per generated token, per layer, which query
    heads went long (1) or stayed local (0). The worker keeps the most recent requests only."""
    if not request.app.state.qada_enabled:
        return _error(409, "QAdA attention is not enabled on this server")
    tag = request.app.state.qada_request_tags.get(request_id)
    trace = None if tag is None else merge_traces(await _answers(request, "qada_request_trace", tag))
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
        if state.qada_enabled and (why := refusal(args)):  # vLLM's own entry points: refuse here
            raise RuntimeError(why)
        if state.qada_enabled:
            launch = QadaSettings.model_validate(extra["qada"])
            state.qada_shape = ModelShape.from_vllm_config(
                engine_client.vllm_config, launch.page_chunk, launch.page_rank_bits
            )
            state.qada_files_dir = extra.get("qada_files_dir")
            state.qada_policy_lock = asyncio.Lock()
            state.qada_request_tags = RequestTags()  # response id -> tag (serving.request_stats)


def make_plugin() -> QadaEndpoints:
    return QadaEndpoints()
