"""Worker-process state shared by the attention layers: per-request key moments and decision
counters. One instance per worker process (`WORKER_STATE`)."""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .moments import KeyMoments, stack_moments
from .policy import PolicyConfig


@dataclass
class DecisionCounters:
    """Exact decode-time decision counts per layer: rows decoded, query heads judged long, KV
    groups read in full (the totals are rows x heads and rows x groups)."""

    num_heads: int = 0
    num_kv_heads: int = 0
    rows: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    long_heads: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    long_groups: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def record(self, layer: int, long_heads: Tensor, long_groups: Tensor) -> None:
        self.num_heads, self.num_kv_heads = long_heads.shape[1], long_groups.shape[1]
        self.rows[layer] += long_heads.shape[0]
        self.long_heads[layer] += int(long_heads.sum())
        self.long_groups[layer] += int(long_groups.sum())

    def snapshot(self) -> dict:
        layers = sorted(self.rows)
        return {
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "layers": {
                layer: {"rows": self.rows[layer], "long_heads": self.long_heads[layer],
                        "long_groups": self.long_groups[layer]}
                for layer in layers
            },
        }


POLICY_KEYS = ("policy", "tau", "t_sink", "t_local", "stats", "random_fraction", "seed")


class WorkerState:
    """The active policy (shared by all layers, replaceable at run time), per-request moments,
    and decision counters."""

    def __init__(self) -> None:
        self.runner = None  # the worker's model runner, set by QadaCPUWorker
        self.moments: dict[str, dict[int, KeyMoments]] = {}
        self.counters = DecisionCounters()
        self.settings: dict = {}
        self.policy = PolicyConfig()
        self.static_heads: Tensor | None = None  # bool [layers, heads]
        self.calib: tuple[Tensor, Tensor] | None = None  # mu [layers, Hkv, D], sigma [layers, Hkv, D, D]
        self.generator = torch.Generator()

    def configure(self, settings: dict) -> dict:
        """Validate and apply QAdA settings (the `attention` config section); returns them."""
        policy = PolicyConfig(**{k: settings[k] for k in POLICY_KEYS if k in settings})
        static_heads = _load_static_heads(settings.get("static_heads")) if policy.policy == "static" else None
        calib = _load_calib(settings.get("calib")) if policy.policy == "qada" and policy.stats == "calib" else None
        if policy.policy == "static" and static_heads is None:
            raise ValueError("policy 'static' needs static_heads: a JSON file of long heads")
        if policy.policy == "qada" and policy.stats == "calib" and calib is None:
            raise ValueError("stats 'calib' needs calib: a safetensors file with mu and sigma")
        if (policy.t_sink, policy.t_local) != (self.policy.t_sink, self.policy.t_local):
            self.moments.clear()  # they cover a bulk range that no longer exists
        self.policy, self.static_heads, self.calib = policy, static_heads, calib
        self.generator = torch.Generator().manual_seed(policy.seed)
        self.settings = {**settings, **policy.__dict__}
        return self.settings

    def request_ids(self, num_rows: int) -> list[str]:
        """Ids of the first `num_rows` rows of the batch being built (batch order)."""
        if self.runner is None:
            raise RuntimeError(
                "QAdA needs its worker class to know request ids: start vLLM with "
                "--worker-cls attention_backend.worker.QadaCPUWorker (`qada serve` does)"
            )
        return list(self.runner.input_batch.req_ids[:num_rows])

    def forget(self, req_ids) -> None:
        """Drop the moments of finished or preempted requests (rebuilt from the cache if resumed)."""
        for req_id in req_ids or ():
            self.moments.pop(req_id, None)

    def prompt_moments(
        self, layer: int, req_ids: list[str], key_cache: Tensor, block_table: Tensor,
        seq_lens: list[int], cfg: PolicyConfig,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Exact bulk-key moments of each row for this layer: built from the cache the first time
        a row has a bulk, then advanced by the keys that left the window since."""
        rows = []
        for row, (req_id, seq_len) in enumerate(zip(req_ids, seq_lens)):
            per_layer = self.moments.setdefault(req_id, {})
            moments = per_layer.get(layer)
            if moments is None:
                if seq_len - cfg.t_local - cfg.t_sink <= 0:
                    rows.append(None)
                    continue
                moments = per_layer[layer] = KeyMoments.build(
                    key_cache, block_table[row], seq_len, cfg.t_sink, cfg.t_local)
            else:
                moments.advance(key_cache, block_table[row], seq_len, cfg.t_sink, cfg.t_local)
            rows.append(moments)
        return stack_moments(rows, key_cache.shape[1], key_cache.shape[3])


WORKER_STATE = WorkerState()


def _load_static_heads(path: str | None) -> Tensor | None:
    """JSON {"num_layers": L, "num_heads": H, "long_heads": [[layer, head], ...]} -> bool [L, H]."""
    if path is None:
        return None
    with open(path) as f:
        spec = json.load(f)
    mask = torch.zeros(spec["num_layers"], spec["num_heads"], dtype=torch.bool)
    for layer, head in spec["long_heads"]:
        mask[layer, head] = True
    return mask


def _load_calib(path: str | None) -> tuple[Tensor, Tensor] | None:
    """safetensors with mu [L, Hkv, D] and sigma [L, Hkv, D, D]."""
    if path is None:
        return None
    from safetensors.torch import load_file

    tensors = load_file(path)
    return tensors["mu"].float(), tensors["sigma"].float()
