"""vLLM endpoint plugin (`vllm.endpoint_plugins`): our routes on vLLM's OpenAI server."""
from __future__ import annotations

import json
from argparse import Namespace

from fastapi import APIRouter, FastAPI, Request

router = APIRouter()


@router.get("/v1/qada/config")
async def qada_config(request: Request) -> dict:
    """The attention settings this server runs with (``enabled: false`` means stock vLLM)."""
    return request.app.state.qada_config


class QadaEndpoints:
    name = "qada_endpoints"
    required_tasks = None

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)

    async def init_state(self, engine_client, state, args: Namespace) -> None:
        extra = getattr(args, "additional_config", None) or {}
        if isinstance(extra, str):
            extra = json.loads(extra)
        state.qada_config = {"enabled": "qada" in extra, **extra.get("qada", {})}


def make_plugin() -> QadaEndpoints:
    return QadaEndpoints()
