"""Shared fixtures: the prepared real model and one real server per test session (stock and
QAdA attention). The Triton interpreter suite (tests/interpreter) is its own pytest invocation
with TRITON_INTERPRET=1 (`make test` runs both): Triton reads the variable when kernels are
decorated, so it cannot be switched on inside this session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from serving.testing import API_KEY, REPO, Server

collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["interpreter"]


@pytest.fixture(scope="session")
def model_path() -> Path:
    from serving.models import prepare_model

    return prepare_model()  # instant when `make test` prepared it already


def _running(config: str, log_dir: Path, *args: str):
    srv = Server(["--config", str(REPO / "configs" / config), *args], log_dir / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def server(model_path, tmp_path_factory):
    """Stock-attention server on the default config (real engine, real model, loopback), with
    1 GiB of KV cache (23k tokens: its tests are short) to leave memory for the other servers."""
    kv_cache = "engine.kv_cache_space_gib=1"
    yield from _running("smollm2-cpu.yaml", tmp_path_factory.mktemp("server"), "--set", kv_cache)


@pytest.fixture(scope="session")
def qada_files_dir(tmp_path_factory) -> Path:
    """The QAdA server's `attention.files_dir`: the one place its policies read files from."""
    return tmp_path_factory.mktemp("qada_files")


@pytest.fixture(scope="session")
def qada_server(model_path, tmp_path_factory, qada_files_dir):
    """QAdA-attention server (its policy is switched per test through PUT /v1/qada/policy), with
    a 4-bit key copy kept for page_rank_bits."""
    files, head = f"attention.files_dir={qada_files_dir}", "limits.request_head_timeout_s=3"
    copy = "attention.page_rank_bits=4"
    yield from _running(
        "smollm2-cpu-qada.yaml",
        tmp_path_factory.mktemp("qada_server"),
        *("--set", files, "--set", head, "--set", copy),
    )


def openai_client(server: Server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=600)


@pytest.fixture(scope="session")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="session")
def qada_client(qada_server):
    return openai_client(qada_server)
