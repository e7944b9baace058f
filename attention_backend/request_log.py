"""Per-request decisions: counts for `usage.qada` and per-token traces for the heatmap route,
kept for the most recent requests and looked up by exact key, never by id prefix.

The key of an engine request is the tag the API server put into its sampling parameters
(`REQUEST_TAG` in `vllm_xargs`, one fresh tag per HTTP request: `serving.request_stats`), so the
engine requests one API request fans out into (several prompts, `n` > 1) share it, and two API
requests never do, whatever ids their clients chose. Engine requests without a tag (offline use)
are keyed by their engine request id."""

from __future__ import annotations

import os
import secrets
from collections import OrderedDict
from dataclasses import dataclass, fields

from torch import Tensor

from .context import StepDecisions

REQUEST_TAG = "qada_tag"
# The launcher's secret (QADA_TAG_SECRET, shared by the API server and the engine's processes):
# tags begin with it, so a client cannot make up one the worker trusts.
_TAG_SECRET = os.environ.get("QADA_TAG_SECRET", "")


def new_tag() -> str:
    return _TAG_SECRET + secrets.token_hex(12)


def request_keys(runner, req_ids: list[str]) -> list[str]:
    """Each engine request's key: its tag, from the model runner's request states, else its id."""
    states = getattr(runner, "requests", None) or {}
    keys = []
    for req_id in req_ids:
        params = getattr(states.get(req_id), "sampling_params", None)
        tag = (getattr(params, "extra_args", None) or {}).get(REQUEST_TAG)
        trusted = isinstance(tag, str) and tag.startswith(_TAG_SECRET) and len(tag) > len(_TAG_SECRET)
        keys.append(tag if trusted else req_id)
    return keys


@dataclass
class RequestDecisions:
    decode_steps: int = 0
    heads: int = 0
    long_heads: int = 0
    groups: int = 0
    long_groups: int = 0
    kv_bytes_read: int = 0
    kv_bytes_skipped: int = 0
    key_copy_bytes_read: int = 0
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
        heads: Tensor,
        groups: Tensor,
        oracle: tuple[Tensor, Tensor] | None,
        kv_bytes: tuple[int, int, int],
    ) -> None:
        """One decode step: heads [layers, Hq] and groups [layers, Hkv] long (bool), the
        oracle's (heads, groups) with observe, and the KV bytes (read, skipped) and key-copy bytes
        read."""
        self.decode_steps += 1
        self.kv_bytes_read += kv_bytes[0]
        self.kv_bytes_skipped += kv_bytes[1]
        self.key_copy_bytes_read += kv_bytes[2]
        self.heads += heads.numel()
        self.long_heads += int(heads.sum())
        self.groups += groups.numel()
        self.long_groups += int(groups.sum())
        if oracle is not None:
            oracle_heads, oracle_groups = oracle
            self.observed_steps += 1
            self.oracle_long_heads += int(oracle_heads.sum())
            self.missed_long_heads += int((oracle_heads & ~heads).sum())
            self.extra_long_heads += int((heads & ~oracle_heads).sum())
            self.oracle_long_groups += int(oracle_groups.sum())
            self.missed_long_groups += int((oracle_groups & ~groups).sum())
            self.extra_long_groups += int((groups & ~oracle_groups).sum())

    def merge(self, other: RequestDecisions) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict:
        out = {
            "decode_steps": self.decode_steps,
            "head_decisions": {"long": self.long_heads, "local": self.heads - self.long_heads},
            "kv_group_decisions": {"long": self.long_groups, "local": self.groups - self.long_groups},
            "kv_bytes": {
                "read": self.kv_bytes_read,
                "skipped": self.kv_bytes_skipped,
                "key_copy_read": self.key_copy_bytes_read,
            },
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


class RequestLog:
    """Decision counts of the most recent `max_requests` keys (all their engine requests
    together), and per-token traces of the most recent `max_traces` engine requests (each at
    most `max_trace_steps` long)."""

    def __init__(self, max_requests: int = 4096, max_traces: int = 16, max_trace_steps: int = 2048) -> None:
        self.max_requests, self.max_traces, self.max_trace_steps = max_requests, max_traces, max_trace_steps
        self.decisions: OrderedDict[str, RequestDecisions] = OrderedDict()  # by key
        self.traces: OrderedDict[str, list[dict]] = OrderedDict()  # by engine request id
        self.trace_keys: dict[str, str] = {}  # engine request id -> key, for the traces kept
        self.num_heads = 0

    def add(self, step: StepDecisions, keys: list[str]) -> None:
        """Attribute a step's decisions to its rows' requests, whose keys are `keys` (a
        prompt-tail request may have several rows: each is one decode step of it). The tokens a
        resumed request decodes again were recorded the first time, and are skipped."""
        self.num_heads = step.num_heads
        observed = step.oracle_heads is not None
        read = step.bytes_read().sum((1, 2))  # [rows]
        copy_read = step.key_copy_bytes_read().sum((1, 2))
        full = step.seq_lens * len(step.layers) * step.num_kv_heads * step.token_bytes
        for row, (req_id, key) in enumerate(zip(step.req_ids, keys, strict=True)):
            if step.replayed and step.replayed[row]:  # recorded when it was first decoded
                continue
            entry = self.decisions.pop(key, None) or RequestDecisions()
            oracle = (step.oracle_heads[row], step.oracle_groups[row]) if observed else None
            kv_bytes = int(read[row]), int(full[row] - read[row]), int(copy_read[row])
            entry.add(step.heads[row], step.groups[row], oracle, kv_bytes)
            self.decisions[key] = entry  # most recently used last
            trace = self.traces.pop(req_id, [])
            if len(trace) < self.max_trace_steps:
                record = {"long": step.heads[row].clone()}
                if observed:
                    record.update(oracle=step.oracle_heads[row].clone(), top1=step.top1[row].clone())
                trace.append(record)
            self.traces[req_id] = trace
            self.trace_keys[req_id] = key
        while len(self.decisions) > self.max_requests:
            self.decisions.popitem(last=False)
        while len(self.traces) > self.max_traces:
            del self.trace_keys[self.traces.popitem(last=False)[0]]

    def request(self, key: str) -> dict:
        """Decisions of the engine requests of `key` (zero counts when none)."""
        return (self.decisions.get(key) or RequestDecisions()).as_dict()

    def trace(self, key: str) -> dict | None:
        """Per decode step, which (layer, query head) went long, for the first engine request of
        `key`; None if it is not among the most recent ones. Observed steps also give the
        oracle's decisions and each head's top-1 attended position."""
        req_id = next((r for r in self.traces if self.trace_keys[r] == key), None)
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
