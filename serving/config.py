"""Serving configuration: a YAML file validated into typed settings, with CLI overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from attention_backend.settings import QadaSettings


class ConfigError(ValueError):
    """The configuration is invalid; the message names the file and the offending keys."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EngineConfig(_Strict):
    max_model_len: int | None = Field(None, gt=0, description="context length; model default if unset")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    enforce_eager: bool = True
    max_num_seqs: int = Field(8, gt=0)
    kv_cache_space_gib: float | None = Field(
        4, gt=0, description="CPU KV cache size (VLLM_CPU_KVCACHE_SPACE); ignored on GPU"
    )
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    enable_prefix_caching: bool = True
    seed: int = 0
    extra_args: list[str] = Field(default_factory=list, description="passed verbatim to vLLM")


class AttentionConfig(QadaSettings):
    """The `attention` section: QAdA's settings, and whether to use them at all (``enabled:
    false`` serves with vLLM's stock attention backend)."""

    enabled: bool = Field(False, description="use the QAdA attention backend")

    def settings(self) -> QadaSettings:
        """What the worker applies (everything but `enabled`)."""
        return QadaSettings.model_validate(self.model_dump(exclude={"enabled"}))


class ServeConfig(_Strict):
    model: str = Field(description="a model name known to `qada prepare-model`, or a local HF directory")
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None
    engine: EngineConfig = Field(default_factory=EngineConfig)
    attention: AttentionConfig = Field(default_factory=AttentionConfig)


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
        return ServeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid config {path}: {describe(exc)}") from exc


def describe(exc: ValidationError) -> str:
    """One line naming each offending key, e.g. `engine.max_model_len: Input should be > 0`."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<top>'}: {err['msg']}" for err in exc.errors()
    )
