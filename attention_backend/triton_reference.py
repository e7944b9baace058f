"""Plain PyTorch reference for `triton_kernel.qada_decode`, over the same Triton paged layout
(key_cache / value_cache [num_blocks, block_size, Hkv, D]). Gathers each row's keys, decides with
`policy.decide_long_heads` / `group_rule`, and attends in fp32 on CPU. For tests, not speed."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .policy import PolicyConfig, decide_long_heads, estimated_bulk_lse, group_rule


class ReferenceResult(NamedTuple):
    output: Tensor  # fp32 [B, Hq, D]
    long_heads: Tensor  # [B, Hq] bool
    long_groups: Tensor  # [B, Hkv] bool
    log_ratio: Tensor | None  # [B, Hq] bulk_lse - local_lse the decision thresholds (oracle, qada)


def gather_row(cache: Tensor, block_row: Tensor, start: int, end: int) -> Tensor:
    """fp32 [end - start, Hkv, D]: positions [start, end) of one sequence."""
    pos = torch.arange(start, end, device=cache.device)
    return cache[block_row[pos // cache.shape[1]].long(), pos % cache.shape[1]].float().cpu()


def local_mask(seq_len: int, t_sink: int, t_local: int) -> Tensor:
    pos = torch.arange(seq_len)
    return (pos < t_sink) | (pos > seq_len - 1 - t_local)


def reference_decode(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    scale: float,
    cfg: PolicyConfig,
    *,
    moments=None,
    calib=None,
    static_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> ReferenceResult:
    batch, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    q = query.float().cpu()
    local_lse, bulk_lse, mean, var, out_local, out_full = ([] for _ in range(6))
    for b, length in enumerate(seq_lens.tolist()):
        k = gather_row(key_cache, block_table[b], 0, length).repeat_interleave(group, 1)  # [L, Hq, D]
        v = gather_row(value_cache, block_table[b], 0, length).repeat_interleave(group, 1)
        scores = scale * torch.einsum("hd,lhd->hl", q[b], k)  # [Hq, L]
        local = local_mask(length, cfg.t_sink, cfg.t_local)
        s_local = scores[:, local]
        local_lse.append(s_local.logsumexp(-1))
        bulk_lse.append(scores[:, ~local].logsumexp(-1))  # -inf when the bulk is empty
        mean.append(s_local.mean(-1))
        var.append(s_local.var(-1, unbiased=False))
        out_local.append(torch.einsum("hl,lhd->hd", s_local.softmax(-1), v[local]))
        out_full.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), v))
    local_lse, bulk_lse = torch.stack(local_lse), torch.stack(bulk_lse)
    n_bulk = (seq_lens.long().cpu() - cfg.t_sink - cfg.t_local).clamp(min=0)
    stats = dict(
        moments=_cpu(moments), calib=_cpu(calib), local_score_stats=(torch.stack(mean), torch.stack(var))
    )
    long_heads = decide_long_heads(
        cfg,
        local_lse=local_lse,
        bulk_lse=bulk_lse,
        n_bulk=n_bulk,
        query=q,
        scale=scale,
        num_kv_heads=num_kv_heads,
        static_mask=None if static_mask is None else static_mask.cpu(),
        generator=generator,
        **stats,
    )
    long_groups = group_rule(long_heads, num_kv_heads)
    log_ratio = None
    if cfg.policy == "oracle":
        log_ratio = bulk_lse - local_lse
    elif cfg.policy == "qada":
        est = estimated_bulk_lse(cfg, n_bulk=n_bulk, query=q, scale=scale, num_kv_heads=num_kv_heads, **stats)
        log_ratio = est - local_lse
    use_full = long_groups.repeat_interleave(group, 1).unsqueeze(-1)
    output = torch.where(use_full, torch.stack(out_full), torch.stack(out_local))
    return ReferenceResult(output, long_heads, long_groups, log_ratio)


def _cpu(tensors):
    return None if tensors is None else tuple(t.cpu() for t in tensors)
