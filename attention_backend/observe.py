"""Exact scores over the whole context of each decode row: the oracle policy's bulk mass, and
for evaluation (`observe: true`) what the oracle would decide and where each head's attention
peaks.

Reads every key of every row (the cost of full attention), so it runs only for the oracle policy
or when the settings ask for it; the decode output itself is unchanged.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .moments import gather_keys
from .policy import PolicyConfig


class ExactLse(NamedTuple):
    local: Tensor  # [B, Hq] log-sum-exp of the scores over the sinks and the window
    bulk: Tensor  # [B, Hq] over the rest (-inf where the bulk is empty)
    top1: Tensor  # [B, Hq] int64: position of the largest score


class Observation(NamedTuple):
    oracle_long: Tensor  # [B, Hq] bool: bulk share of the softmax mass > tau
    top1: Tensor  # [B, Hq] int64: position of the largest score (for retrieval scores)


def exact_lse(
    query: Tensor,
    key_cache: Tensor,
    block_table: Tensor,
    seq_lens: list[int],
    scale: float,
    cfg: PolicyConfig,
) -> ExactLse:
    """query [B, Hq, D]; key_cache in the CPU "vec" layout [num_blocks, Hkv, bs, D]."""
    batch, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[1]
    q = query.float().view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    local_lse = torch.empty(batch, num_heads)
    bulk_lse = torch.full((batch, num_heads), -math.inf)
    top1 = torch.zeros(batch, num_heads, dtype=torch.long)
    for b, length in enumerate(seq_lens):
        keys = gather_keys(key_cache, block_table[b], 0, length)  # [t, Hkv, D]
        scores = torch.einsum("kgd,tkd->kgt", q[b], keys).flatten(0, 1) * scale  # [Hq, t]
        top1[b] = scores.argmax(-1)
        pos = torch.arange(length)
        local = (pos < cfg.t_sink) | (pos > length - 1 - cfg.t_local)
        local_lse[b] = scores[:, local].logsumexp(-1)
        if not local.all():
            bulk_lse[b] = scores[:, ~local].logsumexp(-1)
    return ExactLse(local_lse, bulk_lse, top1)


def observe_decode(
    query: Tensor,
    key_cache: Tensor,
    block_table: Tensor,
    seq_lens: list[int],
    scale: float,
    cfg: PolicyConfig,
) -> Observation:
    lse = exact_lse(query, key_cache, block_table, seq_lens, scale, cfg)
    return Observation(lse.bulk - lse.local > cfg.logit_tau, lse.top1)
