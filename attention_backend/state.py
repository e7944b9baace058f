"""Worker-process state shared by the attention layers: per-request key moments and decision
counters. One instance per worker process (`WORKER_STATE`)."""

from __future__ import annotations

import json
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import metrics
from .moments import MomentStore
from .observe import Observation
from .policy import PolicyConfig, group_rule


@dataclass
class RequestDecisions:
    decode_steps: int = 0
    heads: int = 0
    long_heads: int = 0
    groups: int = 0
    long_groups: int = 0
    # with `observe`: the oracle's decisions at the same tau, and the policy's disagreements
    observed_steps: int = 0
    oracle_long_heads: int = 0
    missed_long_heads: int = 0  # oracle long, policy local (false negatives)
    extra_long_heads: int = 0  # policy long, oracle local (false positives)
    oracle_long_groups: int = 0
    missed_long_groups: int = 0
    extra_long_groups: int = 0

    def add(
        self,
        layers: int,
        num_heads: int,
        num_kv_heads: int,
        long_heads: Tensor,
        long_groups: Tensor,
        oracle: tuple[Tensor, Tensor] | None,
    ) -> None:
        """One decode step; long_heads [layers, Hq] and long_groups [layers, Hkv] are bool, and so
        is `oracle`'s (heads, groups) pair."""
        self.decode_steps += 1
        self.heads += layers * num_heads
        self.long_heads += int(long_heads.sum())
        self.groups += layers * num_kv_heads
        self.long_groups += int(long_groups.sum())
        if oracle is not None:
            oracle_heads, oracle_groups = oracle
            self.observed_steps += 1
            self.oracle_long_heads += int(oracle_heads.sum())
            self.missed_long_heads += int((oracle_heads & ~long_heads).sum())
            self.extra_long_heads += int((long_heads & ~oracle_heads).sum())
            self.oracle_long_groups += int(oracle_groups.sum())
            self.missed_long_groups += int((oracle_groups & ~long_groups).sum())
            self.extra_long_groups += int((long_groups & ~oracle_groups).sum())

    def merge(self, other: RequestDecisions) -> None:
        for key, value in other.__dict__.items():
            setattr(self, key, getattr(self, key) + value)

    def as_dict(self) -> dict:
        out = {
            "decode_steps": self.decode_steps,
            "head_decisions": {"long": self.long_heads, "local": self.heads - self.long_heads},
            "kv_group_decisions": {"long": self.long_groups, "local": self.groups - self.long_groups},
        }
        if self.observed_steps:
            out["oracle"] = {
                "decode_steps": self.observed_steps,
                "head_decisions": {
                    "long": self.oracle_long_heads,
                    "missed": self.missed_long_heads,
                    "extra": self.extra_long_heads,
                },
                "kv_group_decisions": {
                    "long": self.oracle_long_groups,
                    "missed": self.missed_long_groups,
                    "extra": self.extra_long_groups,
                },
            }
        return out


@dataclass
class DecisionCounters:
    """Exact decode-time decision counts per layer: rows decoded, query heads judged long, KV
    groups read in full (the totals are rows x heads and rows x groups), KV bytes the decisions
    required and skipped. Mirrored into Prometheus (`metrics.py`). With `observe`, also per
    (layer, query head): rows observed, and how often the oracle, the policy, and both said long."""

    num_heads: int = 0
    num_kv_heads: int = 0
    rows: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    long_heads: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    long_groups: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    kv_bytes_read: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    kv_bytes_skipped: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    observed: dict[int, Tensor] = field(default_factory=dict)  # layer -> int64 [4, Hq]
    step_req_ids: list[str] = field(default_factory=list)
    step_layers: list[int] = field(default_factory=list)  # the layers recorded this step
    step_heads: list[Tensor] = field(default_factory=list)  # per layer: long heads [rows, Hq]
    step_groups: list[Tensor] = field(default_factory=list)  # per layer: long groups [rows, Hkv]
    step_bytes: tuple = ()  # (seq_lens, local_tokens, token_bytes) of the step
    step_oracle: list[Tensor] = field(default_factory=list)  # per layer, with observe: [rows, Hq]
    step_top1: list[Tensor] = field(default_factory=list)  # per layer, with observe: [rows, Hq]
    per_request: OrderedDict = field(default_factory=OrderedDict)  # req id -> RequestDecisions
    max_requests: int = 4096  # finished requests kept for lookups, oldest dropped first
    traces: OrderedDict = field(default_factory=OrderedDict)  # req id -> list of per-step dicts
    max_traces: int = 16  # the most recent requests keep a per-token trace
    max_trace_steps: int = 2048

    def record(
        self,
        layer: int,
        req_ids: list[str],
        long_heads: Tensor,
        long_groups: Tensor,
        seq_lens: Tensor,
        local_tokens: int,
        token_bytes: int,
        observation: Observation | None = None,
    ) -> None:
        """One layer's decisions for the decode rows of a step; `token_bytes` is the K+V size of
        one token of one KV head. Counted at `end_step`, for all layers at once."""
        self.step_req_ids, self.step_bytes = req_ids, (seq_lens, local_tokens, token_bytes)
        self.step_layers.append(layer)
        self.step_heads.append(long_heads)
        self.step_groups.append(long_groups)
        if observation is not None:
            self.step_oracle.append(observation.oracle_long)
            self.step_top1.append(observation.top1)

    def end_step(self) -> None:
        """Close an engine step: count its decisions per layer, observe its long-context fraction,
        attribute its decisions to requests and keep their per-token traces."""
        if not self.step_heads:
            return
        heads = torch.stack(self.step_heads, dim=1).cpu()  # [rows, layers, Hq]
        groups = torch.stack(self.step_groups, dim=1).cpu()  # [rows, layers, Hkv]
        (rows, layers, self.num_heads), self.num_kv_heads = heads.shape, groups.shape[2]
        self._count_layers(heads, groups)
        observed = len(self.step_oracle) == layers
        oracle = torch.stack(self.step_oracle, dim=1) if observed else None
        oracle_groups = (
            group_rule(oracle.flatten(0, 1), self.num_kv_heads).view(rows, layers, -1) if observed else None
        )
        top1 = torch.stack(self.step_top1, dim=1) if observed else None
        if observed:
            for i, layer in enumerate(self.step_layers):
                counts = torch.stack(
                    [
                        torch.full((self.num_heads,), rows),
                        oracle[:, i].sum(0),
                        heads[:, i].sum(0),
                        (oracle[:, i] & heads[:, i]).sum(0),
                    ]
                )
                self.observed[layer] = self.observed.get(layer, torch.zeros_like(counts)) + counts
        metrics.LONG_CONTEXT_FRACTION.observe(int(groups.sum()) / groups.numel())
        for row, req_id in enumerate(self.step_req_ids):
            entry = self.per_request.pop(req_id, None) or RequestDecisions()
            entry.add(
                layers,
                self.num_heads,
                self.num_kv_heads,
                heads[row],
                groups[row],
                (oracle[row], oracle_groups[row]) if observed else None,
            )
            self.per_request[req_id] = entry  # most recently used last
            trace = self.traces.pop(req_id, [])
            if len(trace) < self.max_trace_steps:
                step = {"long": heads[row].clone()}
                if observed:
                    step.update(oracle=oracle[row].clone(), top1=top1[row].clone())
                trace.append(step)
            self.traces[req_id] = trace
        for table, limit in ((self.per_request, self.max_requests), (self.traces, self.max_traces)):
            while len(table) > limit:
                table.popitem(last=False)
        self.step_heads, self.step_groups, self.step_layers = [], [], []
        self.step_oracle, self.step_top1, self.step_req_ids = [], [], []

    def _count_layers(self, heads: Tensor, groups: Tensor) -> None:
        """Per-layer totals and Prometheus counters of one step (heads/groups [rows, layers, .])."""
        seq_lens, local_tokens, token_bytes = self.step_bytes
        rows = heads.shape[0]
        lengths = seq_lens.long().cpu().view(-1, 1, 1)
        tokens_read = torch.where(groups, lengths, lengths.clamp(max=local_tokens)).sum((0, 2))
        tokens_all = int(lengths.sum()) * self.num_kv_heads
        for layer, n_heads, n_groups, read in zip(
            self.step_layers, heads.sum((0, 2)).tolist(), groups.sum((0, 2)).tolist(), tokens_read.tolist()
        ):
            read, skipped = read * token_bytes, (tokens_all - read) * token_bytes
            self.rows[layer] += rows
            self.long_heads[layer] += n_heads
            self.long_groups[layer] += n_groups
            self.kv_bytes_read[layer] += read
            self.kv_bytes_skipped[layer] += skipped
            label = str(layer)
            for level, long, total in (
                ("head", n_heads, rows * self.num_heads),
                ("kv_group", n_groups, rows * self.num_kv_heads),
            ):
                metrics.HEAD_DECISIONS.labels("long", level, label).inc(long)
                metrics.HEAD_DECISIONS.labels("local", level, label).inc(total - long)
            metrics.KV_BYTES_READ.labels(label).inc(read)
            metrics.KV_BYTES_SKIPPED.labels(label).inc(skipped)

    def trace(self, prefix: str) -> dict | None:
        """Per decode step, which (layer, query head) went long, for the first engine request of
        the API request `prefix`; None if it is not among the most recent ones. Observed steps
        also give the oracle's decisions and each head's top-1 attended position."""
        req_id = next((r for r in self.traces if r.startswith(prefix + "-")), None)
        if req_id is None:
            return None
        steps = self.traces[req_id]
        out = {
            "request_id": req_id,
            "num_layers": steps[0]["long"].shape[0] if steps else 0,
            "num_heads": self.num_heads,
            "long": [step["long"].int().tolist() for step in steps],
        }
        if steps and "oracle" in steps[0]:
            out["oracle"] = [step["oracle"].int().tolist() for step in steps]
            out["top1"] = [step["top1"].tolist() for step in steps]
        return out

    def request(self, prefix: str) -> dict:
        """Decisions of the engine requests whose id starts with `prefix` + "-" (one API request
        may fan out into several, e.g. completions with several prompts)."""
        total = RequestDecisions()
        for req_id, entry in self.per_request.items():
            if req_id.startswith(prefix + "-"):
                total.merge(entry)
        return total.as_dict()

    def snapshot(self) -> dict:
        out = {
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "layers": {
                layer: {
                    "rows": self.rows[layer],
                    "long_heads": self.long_heads[layer],
                    "long_groups": self.long_groups[layer],
                    "kv_bytes_read": self.kv_bytes_read[layer],
                    "kv_bytes_skipped": self.kv_bytes_skipped[layer],
                }
                for layer in sorted(self.rows)
            },
        }
        if self.observed:
            out["observed"] = {  # per layer, lists over query heads
                layer: dict(zip(("rows", "oracle_long", "policy_long", "both_long"), counts.tolist()))
                for layer, counts in sorted(self.observed.items())
            }
        return out


POLICY_KEYS = ("policy", "tau", "t_sink", "t_local", "stats", "random_fraction", "seed", "min_bulk")


class WorkerState:
    """The active policy (shared by all layers, replaceable at run time), per-request moments,
    and decision counters."""

    def __init__(self) -> None:
        self.runner = None  # the worker's model runner, set by QadaCPUWorker
        self.moments = MomentStore()
        self.counters = DecisionCounters()
        self.settings: dict = {}
        self.policy = PolicyConfig()
        self.static_heads: Tensor | None = None  # bool [layers, heads]
        self.calib: tuple[Tensor, Tensor] | None = None  # mu [layers, Hkv, D], sigma [layers, Hkv, D, D]
        self.generator = torch.Generator()
        self.observe = False  # also compute the oracle's decisions and top-1 positions (eval only)
        self.decode_tail = 0  # decode the last N prompt tokens on our path too (eval only)

    def configure(self, settings: dict) -> dict:
        """Validate and apply QAdA settings (the `attention` config section); returns them."""
        policy = PolicyConfig(**{k: settings[k] for k in POLICY_KEYS if k in settings})
        static_heads = _load_static_heads(settings.get("static_heads")) if policy.policy == "static" else None
        calib = (
            _load_calib(settings.get("calib"))
            if policy.policy == "qada" and policy.stats == "calib"
            else None
        )
        if policy.policy == "static" and static_heads is None:
            raise ValueError("policy 'static' needs static_heads: a JSON file of long heads")
        if policy.policy == "qada" and policy.stats == "calib" and calib is None:
            raise ValueError("stats 'calib' needs calib: a safetensors file with mu and sigma")
        if (policy.t_sink, policy.t_local) != (self.policy.t_sink, self.policy.t_local):
            self.moments.clear()  # they cover a bulk range that no longer exists
        if self.settings:
            metrics.POLICY.labels(*_policy_labels(self.policy)).set(0)
        metrics.POLICY.labels(*_policy_labels(policy)).set(1)
        self.policy, self.static_heads, self.calib = policy, static_heads, calib
        self.generator = torch.Generator().manual_seed(policy.seed)
        self.observe = bool(settings.get("observe", False))
        self.decode_tail = int(settings.get("decode_tail", 0))
        self.settings = {**settings, **policy.__dict__}
        return self.settings

    def request_ids(self, num_rows: int) -> list[str]:
        """Ids of the first `num_rows` rows of the batch being built (batch order)."""
        if self.runner is None:
            raise RuntimeError(
                "QAdA needs its worker class to know request ids: start vLLM with "
                "--worker-cls attention_backend.worker.QadaCPUWorker (`qada serve` does)"
            )
        batch = getattr(self.runner, "input_batch", None)
        if batch is None:
            raise RuntimeError(
                f"QAdA reads request ids from vLLM's V1 model runner, not {type(self.runner).__name__}: "
                "set VLLM_USE_V2_MODEL_RUNNER=0 (`qada serve` does)"
            )
        return list(batch.req_ids[:num_rows])

    def forget(self, req_ids) -> None:
        """Drop the moments of finished or preempted requests (rebuilt from the cache if resumed)."""
        self.moments.forget(req_ids)


WORKER_STATE = WorkerState()


def _policy_labels(policy: PolicyConfig) -> tuple[str, ...]:
    return policy.policy, policy.stats, f"{policy.tau:g}", str(policy.t_sink), str(policy.t_local)


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
