"""Evaluation-only observation of a decode step: what the oracle would decide and where each
head's attention peaks, from the exact scores over the whole context.

Reads every key of every row (the cost of full attention), so it runs only when the settings ask
for it (`observe: true`); the decode output itself is unchanged.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .moments import gather_keys
from .policy import PolicyConfig


class Observation(NamedTuple):
    oracle_long: Tensor  # [B, Hq] bool: bulk share of the softmax mass > tau
    top1: Tensor  # [B, Hq] int64: position of the largest score (for retrieval scores)


def observe_decode(query: Tensor, key_cache: Tensor, block_table: Tensor, seq_lens: list[int],
                   scale: float, cfg: PolicyConfig) -> Observation:
    """query [B, Hq, D]; key_cache in the CPU "vec" layout [num_blocks, Hkv, bs, D]."""
    batch, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[1]
    q = query.float().view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    oracle_long = torch.zeros(batch, num_heads, dtype=torch.bool)
    top1 = torch.zeros(batch, num_heads, dtype=torch.long)
    for b, length in enumerate(seq_lens):
        keys = gather_keys(key_cache, block_table[b], 0, length)  # [t, Hkv, D]
        scores = torch.einsum("kgd,tkd->kgt", q[b], keys).flatten(0, 1) * scale  # [Hq, t]
        top1[b] = scores.argmax(-1)
        pos = torch.arange(length)
        local = (pos < cfg.t_sink) | (pos > length - 1 - cfg.t_local)
        if local.all():
            continue
        local_lse = scores[:, local].logsumexp(-1)
        bulk_lse = scores[:, ~local].logsumexp(-1)
        oracle_long[b] = bulk_lse - local_lse > cfg.logit_tau
    return Observation(oracle_long, top1)
