"""Serving configuration: a YAML file validated into typed settings, with CLI overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from attention_backend.settings import QadaSettings, describe


class ConfigError(ValueError):
    """The configuration is invalid; the message names the file and the offending keys."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EngineConfig(_Strict):
    max_model_len: int | None = Field(None, gt=0, description="context length; model default if unset")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    enforce_eager: bool = True
    max_num_seqs: int = Field(8, gt=0)
    kv_cache_space_gib: int | None = Field(
        4,
        gt=0,
        le=2**20,
        description="CPU KV cache in whole GiB (VLLM_CPU_KVCACHE_SPACE, which it replaces); unset: "
        "the variable's value or vLLM's default. Checked at launch against what max_model_len needs",
    )
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    enable_prefix_caching: bool = True
    seed: int = 0
    extra_args: list[str] = Field(default_factory=list, description="passed verbatim to vLLM")


class AttentionConfig(QadaSettings):
    """The `attention` section: QAdA's settings, and the server's own keys: whether to use them
    at all (``enabled: false`` serves with vLLM's stock attention backend), where policy files
    live, and whether policy changes are open on a server without keys."""

    enabled: bool = Field(False, description="use the QAdA attention backend")
    files_dir: str | None = Field(
        None,
        description="the one directory policy files (static_heads, calib) are read from, by plain "
        "name (default: the config file's directory)",
    )
    allow_policy_changes: bool = Field(
        False,
        description="allow PUT/PATCH /v1/qada/policy on a server with neither api_key nor "
        "admin_api_key (with a key, they need the admin key)",
    )

    def settings(self) -> QadaSettings:
        """What the worker applies (everything but the server's own keys)."""
        return QadaSettings.model_validate(self.model_dump(exclude=SERVER_KEYS))


SERVER_KEYS = frozenset(set(AttentionConfig.model_fields) - set(QadaSettings.model_fields))


class LimitsConfig(_Strict):
    """What one client may ask of the server (safe defaults; vLLM's own are far wider)."""

    max_n: int = Field(8, ge=1, le=16384, description="most sequences per request, n (VLLM_MAX_N_SEQUENCES)")
    max_header_bytes: int = Field(
        65536, ge=4096, le=2**24, description="request line and headers together, in bytes"
    )
    keep_alive_s: int = Field(
        5, ge=1, le=3600, description="an idle keep-alive connection is closed after this long"
    )
    request_head_timeout_s: float = Field(
        10,
        gt=0,
        le=3600,
        description="a connection that has not sent a whole request line and headers within this "
        "long (when opened, or after its last response) is closed",
    )


class ServeConfig(_Strict):
    model: str = Field(description="a model name known to `qada prepare-model`, or a local HF directory")
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(None, description="needed by every route but health, metrics and version")
    admin_api_key: str | None = Field(
        None, description="needed by policy changes (PUT/PATCH /v1/qada/policy); default: api_key"
    )
    engine: EngineConfig = Field(default_factory=EngineConfig)
    attention: AttentionConfig = Field(default_factory=AttentionConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)


def load_config(path: str | Path, overrides: dict | None = None) -> ServeConfig:
    """Read and validate a YAML config; ``overrides`` maps dotted keys (``engine.max_model_len``)
    to values that replace the file's."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        cfg = ServeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid config {path}: {describe(exc)}") from exc
    # policy files are named relative to one directory: by default the config's own
    cfg.attention = cfg.attention.model_copy(
        update={"files_dir": str((path.parent / (cfg.attention.files_dir or ".")).resolve())}
    )
    return cfg
