"""Config loading/validation and the vLLM command line it turns into."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.config import ConfigError, load_config
from serving.launcher import bind_threads, engine_ranks, thread_binding, vllm_command, vllm_environment

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    assert load_config(path).model


def test_default_config_is_stock_smollm2_on_cpu():
    cfg = load_config(CONFIGS / "smollm2-cpu.yaml")
    assert cfg.model == "smollm2-135m-instruct" and cfg.engine.enforce_eager
    assert cfg.engine.max_model_len == 8192 and not cfg.attention.enabled


def test_overrides_replace_file_values():
    cfg = load_config(
        CONFIGS / "smollm2-cpu.yaml",
        {"port": 9001, "engine.max_model_len": 2048, "attention.policy": "full", "api_key": None},
    )
    assert (cfg.port, cfg.engine.max_model_len, cfg.attention.policy) == (9001, 2048, "full")


@pytest.mark.parametrize(
    "text, needle",
    [
        ("model: m\nengin: {}\n", "engin"),  # typo in a key
        ("model: m\nengine: {max_model_len: -1}\n", "engine.max_model_len"),
        ("model: m\nattention: {policy: magic}\n", "attention.policy"),
        ("model: m\nattention: {tau: 1.5}\n", "attention.tau"),
        ("engine: {}\n", "model"),  # missing required key
        ("model: [unclosed\n", "not valid YAML"),
        ("- a list\n", "mapping"),
    ],
)
def test_invalid_configs_name_the_problem(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"bad\.yaml") as info:
        load_config(path)
    assert needle in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_vllm_command_and_environment(tmp_path):
    cfg = load_config(CONFIGS / "smollm2-cpu-qada.yaml", {"api_key": "k", "port": 1234})
    cmd = vllm_command(cfg, tmp_path)
    assert cmd[1:3] == ["-m", "serving.api_server"]  # vLLM's entry point with our uvicorn limits
    assert cmd[cmd.index("--model") + 1] == str(tmp_path)
    assert cmd[cmd.index("--port") + 1] == "1234"
    assert "k" not in cmd and "--api-key" not in cmd  # keys travel in the environment
    assert "--enforce-eager" in cmd
    extra = json.loads(cmd[cmd.index("--additional-config") + 1])
    assert extra["qada"]["policy"] == "qada" and extra["qada"]["t_local"] == 128
    assert extra["qada_files_dir"] == str(CONFIGS.resolve())  # default: the config's directory
    env = vllm_environment(cfg, base={})
    assert env["QADA_API_KEY"] == "k" and "QADA_ADMIN_API_KEY" not in env
    assert env["QADA_ALLOW_POLICY_CHANGES"] == "0"
    assert env["VLLM_MAX_N_SEQUENCES"] == "8" and env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] == "5"
    assert cmd[cmd.index("--h11-max-incomplete-event-size") + 1] == "65536"
    assert env["VLLM_PLUGINS"] == "qada,qada_endpoints" and env["QADA_ENABLE"] == "1"
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "0"  # the worker reads the V1 runner's batch
    assert Path(env["PROMETHEUS_MULTIPROC_DIR"]).is_dir()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    ray_copies = env["VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"].split(",")  # Ray workers get what they read
    assert {"QADA_ENABLE", "QADA_TAG_SECRET", "PROMETHEUS_MULTIPROC_DIR"} <= set(ray_copies)
    assert "QADA_API_KEY" not in ray_copies
    assert cmd[cmd.index("--worker-cls") + 1] == "attention_backend.worker.QadaCPUWorker"
    assert "--attention-backend" not in cmd
    gpu = vllm_command(cfg, tmp_path, on_cpu=False)
    assert gpu[gpu.index("--attention-backend") + 1] == "CUSTOM"
    assert gpu[gpu.index("--worker-cls") + 1] == "attention_backend.gpu_worker.QadaGPUWorker"


def test_parallel_cpu_workers_get_threads_of_their_own_or_in_turn():
    assert engine_ranks(["--tensor-parallel-size", "3"]) == 3
    assert engine_ranks(["-tp=2", "--pipeline-parallel-size", "2", "--seed", "4"]) == 4
    assert engine_ranks(["--max-num-seqs", "3"]) == 1
    assert thread_binding(3, [0, 1]) == "0|1|0"  # fewer CPUs than workers: they share, in turn
    assert thread_binding(2, [0, 1, 2, 3, 4]) == "0,1|2,3"
    from vllm.utils.cpu_resource_utils import get_visible_memory_node

    env = {}
    bind_threads(["--tensor-parallel-size", "3"], env)
    if len(get_visible_memory_node()) < 3:  # vLLM's "auto" would refuse: bound by us
        assert env["VLLM_CPU_OMP_THREADS_BIND"].count("|") == 2
    else:
        assert env == {}
    chosen = {"VLLM_CPU_OMP_THREADS_BIND": "0-1|0-1|0-1"}
    bind_threads(["--tensor-parallel-size", "3"], chosen)
    assert chosen == {"VLLM_CPU_OMP_THREADS_BIND": "0-1|0-1|0-1"}  # the user's binding stays
    single = {}
    bind_threads([], single)
    assert single == {}


def test_stock_config_does_not_enable_qada():
    cfg = load_config(CONFIGS / "smollm2-cpu.yaml")
    assert "--additional-config" not in vllm_command(cfg, Path("/m"))
    assert "QADA_ENABLE" not in vllm_environment(cfg, base={})


def test_attention_settings_are_one_model_for_file_flags_and_worker():
    """The `attention` section, the `qada serve` flags and what the worker applies come from one
    settings model: every setting has a flag, and the worker gets the section less `enabled`."""
    from attention_backend.settings import QadaSettings
    from serving.cli import build_parser, serve_config

    args = build_parser().parse_args(
        [
            "serve",
            "--config",
            str(CONFIGS / "smollm2-cpu.yaml"),
            "--policy",
            "local",
            "--t-local",
            "64",
            "--min-bulk",
            "10",
            "--observe",
            "--",
            "--foo",
        ]
    )
    cfg = serve_config(args)
    assert cfg.attention.enabled and cfg.engine.extra_args == ["--foo"]
    assert cfg.attention.settings() == QadaSettings(policy="local", t_local=64, min_bulk=10, observe=True)
    flags = build_parser()._subparsers._group_actions[0].choices["serve"]._option_string_actions
    assert all("--" + name.replace("_", "-") in flags for name in QadaSettings.model_fields)
    config = ["--config", str(CONFIGS / "smollm2-cpu.yaml")]
    layers = build_parser().parse_args(
        ["serve", *config, "--policy", "qada", "--page-top-k", "8", "--page-rank-layers", "2", "15"]
    )
    assert serve_config(layers).attention.settings().page_rank_layers == (2, 15)  # a list flag
    bits = build_parser().parse_args(["serve", *config, "--policy", "qada", "--page-rank-bits", "4"])
    assert serve_config(bits).attention.settings().page_rank_bits == 4  # int choices
    for flag, value in (("--stats", "magic"), ("--page-rank-bits", "3")):
        with pytest.raises(SystemExit):  # argparse's own error for a value outside the choices
            build_parser().parse_args(["serve", flag, value])
    qada = json.loads(
        vllm_command(cfg, Path("/m"))[vllm_command(cfg, Path("/m")).index("--additional-config") + 1]
    )
    assert QadaSettings.model_validate(qada["qada"]) == cfg.attention.settings()  # what the worker validates


def test_kv_cache_space_is_whole_gib_and_fits_one_sequence(tmp_path, capsys):
    from serving.config import ConfigError
    from serving.launcher import check_kv_cache

    with pytest.raises(ConfigError, match="kv_cache_space_gib"):  # vLLM parses an int
        load_config(CONFIGS / "smollm2-cpu-qada.yaml", {"engine.kv_cache_space_gib": 0.25})
    model = tmp_path / "model"
    model.mkdir()
    hf = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}
    (model / "config.json").write_text(json.dumps(hf))
    # fp32 SmolLM2: 2 * 30 * 3 * 64 * 4 = 46080 bytes a token, 8192 tokens = 0.35 GiB
    cfg = load_config(CONFIGS / "smollm2-cpu-qada.yaml", {"engine.kv_cache_space_gib": 1})
    check_kv_cache(cfg, model, vllm_environment(cfg, base={}))
    big = load_config(
        CONFIGS / "smollm2-cpu-qada.yaml", {"engine.max_model_len": 32768, "engine.kv_cache_space_gib": 1}
    )
    with pytest.raises(
        ConfigError, match="kv_cache_space_gib=1 GiB cannot hold one sequence of max_model_len 32768"
    ):
        check_kv_cache(big, model, vllm_environment(big, base={}))
    # the config's value replaces an inherited variable, and says so
    env = vllm_environment(cfg, base={"VLLM_CPU_KVCACHE_SPACE": "64"})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert "replaces VLLM_CPU_KVCACHE_SPACE=64" in capsys.readouterr().err
    # without one, the variable is what vLLM uses, and it is checked too
    unset = load_config(CONFIGS / "smollm2-cpu-qada.yaml")
    unset.engine = unset.engine.model_copy(update={"kv_cache_space_gib": None})
    with pytest.raises(ConfigError, match="VLLM_CPU_KVCACHE_SPACE must be a whole number"):
        check_kv_cache(unset, model, vllm_environment(unset, base={"VLLM_CPU_KVCACHE_SPACE": "0.5"}))


@pytest.mark.parametrize(
    "override, needle",
    [
        ("engine.kv_cache_space_gib=0.25", "kv_cache_space_gib"),  # was: vLLM crashed at start
        ("engine.max_model_len=131072", "cannot hold one sequence of max_model_len 131072"),
    ],
)
def test_serve_refuses_a_kv_cache_vllm_cannot_start_with(model_path, override, needle):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "serving.cli", "serve", "--config", str(CONFIGS / "smollm2-cpu-qada.yaml")]
    done = subprocess.run([*cmd, "--set", override], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and needle in done.stderr and "Traceback" not in done.stderr
