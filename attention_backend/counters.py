"""Running totals of the decode-time decisions, per layer, mirrored into Prometheus (`metrics`).

The worker adds each step's decisions once (`DecisionCounters.add`); `/v1/qada/stats` reads
`snapshot()` and `/metrics` serves the Prometheus side.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from . import metrics
from .context import StepDecisions
from .ranks import LAYER_SUMS


class DecisionCounters:
    """Exact decode-time decision counts per layer: rows decoded, query heads judged long, KV
    groups read beyond their local set (the totals are rows x heads and rows x groups), KV bytes
    the decisions required and skipped, and with page selection the KV blocks long groups read
    and skipped. With `observe`, also per (layer, query head): rows observed, and how
    often the oracle, the policy, and both said long."""

    FIELDS = ("rows", *LAYER_SUMS)

    def __init__(self) -> None:
        self.num_heads = 0
        self.num_kv_heads = 0
        self.layers: dict[int, dict[str, int]] = defaultdict(lambda: dict.fromkeys(self.FIELDS, 0))
        self.observed: dict[int, Tensor] = {}  # layer -> int64 [4, Hq]

    def add(self, step: StepDecisions) -> None:
        """Count one engine step: per layer, and its long-context fraction."""
        self.num_heads, self.num_kv_heads = step.num_heads, step.num_kv_heads
        rows = step.heads.shape[0]
        bytes_read = step.bytes_read().sum((0, 2))
        copy_read = step.key_copy_bytes_read().sum((0, 2)).tolist()
        bytes_all = int(step.seq_lens.sum()) * self.num_kv_heads * step.token_bytes
        blocks = step.long_group_blocks()
        no_blocks = [0] * len(step.layers)
        blocks_read, blocks_skipped = (
            (no_blocks, no_blocks) if blocks is None else (b.sum((0, 2)).tolist() for b in blocks)
        )
        per_layer = zip(
            step.layers,
            step.heads.sum((0, 2)).tolist(),
            step.groups.sum((0, 2)).tolist(),
            bytes_read.tolist(),
            blocks_read,
            blocks_skipped,
            copy_read,
        )
        for layer, n_heads, n_groups, read, n_read, n_skipped, n_copy in per_layer:
            skipped = bytes_all - read
            counts = self.layers[layer]
            counts["rows"] += rows
            counts["long_heads"] += n_heads
            counts["long_groups"] += n_groups
            counts["kv_bytes_read"] += read
            counts["kv_bytes_skipped"] += skipped
            counts["kv_blocks_read"] += n_read
            counts["kv_blocks_skipped"] += n_skipped
            counts["key_copy_bytes_read"] += n_copy
            label = str(layer)
            for level, long, total in (
                ("head", n_heads, rows * self.num_heads),
                ("kv_group", n_groups, rows * self.num_kv_heads),
            ):
                metrics.HEAD_DECISIONS.labels("long", level, label).inc(long)
                metrics.HEAD_DECISIONS.labels("local", level, label).inc(total - long)
            metrics.KV_BYTES_READ.labels(label).inc(read)
            metrics.KV_BYTES_SKIPPED.labels(label).inc(skipped)
            if blocks is not None:
                metrics.KV_BLOCKS.labels("read", label).inc(n_read)
                metrics.KV_BLOCKS.labels("skipped", label).inc(n_skipped)
            if n_copy:
                metrics.KEY_COPY_BYTES_READ.labels(label).inc(n_copy)
        metrics.LONG_CONTEXT_FRACTION.observe(int(step.groups.sum()) / step.groups.numel())
        if step.oracle_heads is not None:
            for i, layer in enumerate(step.layers):
                oracle, heads = step.oracle_heads[:, i], step.heads[:, i]
                counts = torch.stack(
                    [
                        torch.full((self.num_heads,), rows),
                        oracle.sum(0),
                        heads.sum(0),
                        (oracle & heads).sum(0),
                    ]
                )
                self.observed[layer] = self.observed.get(layer, torch.zeros_like(counts)) + counts

    def snapshot(self) -> dict:
        out = {
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "layers": {layer: dict(counts) for layer, counts in sorted(self.layers.items())},
        }
        if self.observed:
            out["observed"] = {  # per layer, lists over query heads
                layer: dict(zip(("rows", "oracle_long", "policy_long", "both_long"), counts.tolist()))
                for layer, counts in sorted(self.observed.items())
            }
        return out
