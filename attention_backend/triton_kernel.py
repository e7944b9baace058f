"""QAdA decode attention over vLLM's Triton paged KV cache (the GPU path), in three launches.

Layout (vLLM `TritonAttentionBackend`): key_cache / value_cache [num_blocks, block_size, Hkv, D]
with any strides but a contiguous last dim (the default NHD layout interleaves K and V per token
and head), block_table [B, max_blocks] int32, seq_lens [B] including the current token, whose K/V
is already in the cache. One query per row, query [B, Hq, D]; query head h reads KV head h // G.

1. `_local_kernel`, grid (B, Hkv): the G query heads of a KV group attend to the local set
   (sinks [0, t_sink) and window (t - t_local, t], as `policy.local_mask` defines it); then the
   policy decides per query head on device (`policy.decide_long_heads`, with the local scores'
   statistics of `policy.score_stats` for qada/local) and the group rule (`policy.group_rule`)
   marks the group long if any of its heads is.
2. `_bulk_kernel`, grid (B, Hkv, splits): split-K attention over the bulk [t_sink, t - t_local]
   (`policy.bulk_range`). Programs of local groups return at once: a local group reads only its
   local keys.
3. `_merge_kernel`, grid (B, Hkv): log-sum-exp merge of the local and bulk partials for long
   groups (all heads of a long group get the full result).

The oracle needs the exact bulk mass, so for it stage 2 runs for every group with a bulk and
stage 3 decides. Grids and scratch sizes depend only on shapes, and nothing syncs with the host,
so a decode step can be captured in a CUDA graph.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch import Tensor

from .policy import NO_INPUTS, DecodeBatch, DecodeResult, PolicyInputs

if TYPE_CHECKING:
    from .settings import QadaSettings

# Policy codes (constexpr): the kernel is specialised per policy, named as the settings name
# them; MASK is static and random alike (their decisions come as a mask).
# QADA_PAGES reads a bulk log-mass estimated before the launch (`page_estimate`).
FULL, LOCAL, ORACLE, MASK, QADA_PROMPT, QADA_CALIB, QADA_LOCAL, QADA_PAGES = (
    tl.constexpr(i) for i in range(8))
NEG = tl.constexpr(-1.0e30)  # running-max start: finite, so fully masked tiles give exp(-inf - NEG) = 0


@triton.jit
def _attend(q, k_ptr, v_ptr, bt_row, start, end, m, l, acc, ssum, ssq, scale,
            stride_kb, stride_kt, stride_vb, stride_vt,
            BS: tl.constexpr, TILE: tl.constexpr, D: tl.constexpr,
            STATS: tl.constexpr, IEEE: tl.constexpr):
    """Online softmax of q [GP, D] over positions [start, end) of one KV head (k_ptr / v_ptr
    already point at it). Returns the updated (m, l, acc, ssum, ssq); ssum / ssq accumulate the
    sum and sum of squares of the scores when STATS. Dots take the cache dtype, or fp32 (IEEE,
    q fp32) for fp32 caches and for bf16 in the interpreter, whose bf16 dot is wrong."""
    offs_t = tl.arange(0, TILE)
    offs_d = tl.arange(0, D)
    for s in range(start, end, TILE):
        pos = s + offs_t
        valid = pos < end
        blk = tl.load(bt_row + pos // BS, mask=valid, other=0).to(tl.int64)
        tok = (pos % BS).to(tl.int64)
        k = tl.load(k_ptr + blk[:, None] * stride_kb + tok[:, None] * stride_kt + offs_d[None, :],
                    mask=valid[:, None], other=0.0)
        if IEEE:
            scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(valid[None, :], scores * scale, float("-inf"))  # [GP, TILE]
        if STATS:
            ssum += tl.sum(tl.where(valid[None, :], scores, 0.0), 1)
            ssq += tl.sum(tl.where(valid[None, :], scores * scores, 0.0), 1)
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + blk[:, None] * stride_vb + tok[:, None] * stride_vt + offs_d[None, :],
                    mask=valid[:, None], other=0.0)
        if IEEE:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m = m_new
    return m, l, acc, ssum, ssq


@triton.jit
def _decide(ratio, g_ok, has_bulk, logit_tau, tau, G: tl.constexpr, GROUP_MEAN: tl.constexpr):
    """Long heads of one KV group from log(bulk / local mass) per head (`policy.decide_long_heads`):
    each head against logit(tau), or (GROUP_MEAN) all of them when their bulk shares average
    above tau."""
    if GROUP_MEAN:
        share = tl.where(g_ok, 1.0 / (1.0 + tl.exp(-ratio)), 0.0)
        group_long = (tl.sum(share, 0) > tau * G).to(tl.int32)  # ints: the interpreter's & of a
        return (g_ok & has_bulk).to(tl.int32) * group_long != 0  # vector and a scalar bool fails
    return g_ok & has_bulk & (ratio > logit_tau)


@triton.jit
def _local_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, seq_ptr, mask_ptr, slot_ptr, n_ptr, m1_ptr, m2_ptr, bulk_ptr,
    lout_ptr, llse_ptr, ratio_ptr, long_heads_ptr, long_groups_ptr,
    scale, logit_tau, tau, t_sink, t_local,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_btb, stride_mb, stride_mh, stride_m1b, stride_m1h, stride_m2b, stride_m2h,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DC: tl.constexpr, BS: tl.constexpr,
    TILE: tl.constexpr, POLICY: tl.constexpr, GROUP_MEAN: tl.constexpr, IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    num_kv = tl.num_programs(1)
    seq_len = tl.load(seq_ptr + b)
    n_bulk = tl.maximum(seq_len - t_sink - t_local, 0)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    g_ok = offs_g < G
    heads = h * G + offs_g
    q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    qf = tl.load(q_rows + offs_d[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
    q = qf if IEEE else qf.to(k_ptr.dtype.element_ty)
    k_head = k_ptr + h * stride_kh
    v_head = v_ptr + h * stride_vh
    bt_row = bt_ptr + b * stride_btb

    m = tl.full([GP], NEG, tl.float32)
    l = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    ssum = tl.zeros([GP], tl.float32)
    ssq = tl.zeros([GP], tl.float32)
    STATS: tl.constexpr = POLICY == QADA_LOCAL
    sink_end = tl.minimum(t_sink, seq_len)
    win_start = tl.maximum(t_sink, seq_len - t_local)
    m, l, acc, ssum, ssq = _attend(q, k_head, v_head, bt_row, 0, sink_end, m, l, acc, ssum, ssq,
                                   scale, stride_kb, stride_kt, stride_vb, stride_vt,
                                   BS, TILE, D, STATS, IEEE)
    m, l, acc, ssum, ssq = _attend(q, k_head, v_head, bt_row, win_start, seq_len, m, l, acc, ssum,
                                   ssq, scale, stride_kb, stride_kt, stride_vb, stride_vt,
                                   BS, TILE, D, STATS, IEEE)
    local_lse = m + tl.log(l)
    row = (b * num_kv + h) * G + offs_g  # scratch rows [B, Hkv, G]
    tl.store(lout_ptr + row[:, None] * D + offs_d[None, :], acc / l[:, None], mask=g_ok[:, None])
    tl.store(llse_ptr + row, local_lse, mask=g_ok)

    has_bulk = n_bulk > 0
    if POLICY == FULL or POLICY == ORACLE:  # oracle: provisional, stage 3 decides
        long = g_ok & has_bulk
    elif POLICY == LOCAL:
        long = offs_g < 0
    elif POLICY == MASK:
        flag = tl.load(mask_ptr + b * stride_mb + heads * stride_mh, mask=g_ok, other=0)
        long = (flag != 0) & has_bulk
    elif POLICY == QADA_PAGES:
        bulk_lse = tl.load(bulk_ptr + b * num_kv * G + heads, mask=g_ok, other=float("-inf"))
        ratio = bulk_lse - local_lse
        tl.store(ratio_ptr + b * num_kv * G + heads, ratio, mask=g_ok)
        long = _decide(ratio, g_ok, has_bulk, logit_tau, tau, G, GROUP_MEAN)
    else:
        if POLICY == QADA_LOCAL:  # mean / population variance of the local scores (one pass)
            count = (sink_end + seq_len - win_start).to(tl.float32)
            mean = ssum / count
            var = tl.maximum(ssq / count - mean * mean, 0.0)
        else:  # q.mu and q^T S q with (mu, S) = (S1/n, S2/n) or (mu, sigma)
            mb = tl.load(slot_ptr + b).to(tl.int64)  # this row's moments (calib: stride 0)
            m1 = tl.load(m1_ptr + mb * stride_m1b + h * stride_m1h + offs_d)
            q_mu = tl.sum(qf * m1[None, :], 1)
            q_s_q = tl.zeros([GP], tl.float32)
            offs_c = tl.arange(0, DC)
            for c in tl.static_range(0, D, DC):
                qc = tl.load(q_rows + c + offs_c[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
                s2 = tl.load(m2_ptr + mb * stride_m2b + h * stride_m2h
                             + (c + offs_c)[:, None] * D + offs_d[None, :])
                sq = tl.dot(qc, s2, input_precision="ieee")  # [GP, D]: rows c.. of S, times q
                q_s_q += tl.sum(sq * qf, 1)
            if POLICY == QADA_PROMPT:
                count = tl.maximum(tl.load(n_ptr + b).to(tl.float32), 1.0)
                q_mu = q_mu / count
                var = tl.maximum(q_s_q / count - q_mu * q_mu, 0.0)  # fp32 cancellation
            else:
                var = q_s_q
            mean = scale * q_mu
            var = scale * scale * var
        ratio = tl.log(n_bulk.to(tl.float32)) + mean + var / 2 - local_lse  # -inf without bulk
        tl.store(ratio_ptr + b * num_kv * G + heads, ratio, mask=g_ok)
        long = _decide(ratio, g_ok, has_bulk, logit_tau, tau, G, GROUP_MEAN)
    if POLICY != ORACLE:
        tl.store(long_heads_ptr + b * num_kv * G + heads, long.to(tl.int8), mask=g_ok)
    tl.store(long_groups_ptr + b * num_kv + h, tl.max(long.to(tl.int8), 0))


@triton.jit
def _bulk_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, seq_ptr, long_groups_ptr, pout_ptr, plse_ptr,
    scale, t_sink, t_local,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_btb,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, TILE: tl.constexpr,
    SPLITS: tl.constexpr, IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    num_kv = tl.num_programs(1)
    if tl.load(long_groups_ptr + b * num_kv + h) == 0:
        return  # local group: its bulk is never read
    seq_len = tl.load(seq_ptr + b)
    bulk_end = seq_len - t_local
    per_split = tl.cdiv(tl.cdiv(bulk_end - t_sink, TILE), SPLITS) * TILE
    start = t_sink + s * per_split
    end = tl.minimum(start + per_split, bulk_end)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    g_ok = offs_g < G
    heads = h * G + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None], other=0.0).to(tl.float32)
    if not IEEE:
        q = q.to(k_ptr.dtype.element_ty)
    m = tl.full([GP], NEG, tl.float32)
    l = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    m, l, acc, _, _ = _attend(q, k_ptr + h * stride_kh, v_ptr + h * stride_vh, bt_ptr + b * stride_btb,
                              start, end, m, l, acc, l, l, scale,
                              stride_kb, stride_kt, stride_vb, stride_vt, BS, TILE, D, False, IEEE)
    empty = l == 0.0  # a split past the end of the bulk
    lse = tl.where(empty, float("-inf"), m + tl.log(l))
    out = acc / tl.where(empty, 1.0, l)[:, None]
    row = ((b * num_kv + h) * SPLITS + s) * G + offs_g  # scratch rows [B, Hkv, SPLITS, G]
    tl.store(pout_ptr + row[:, None] * D + offs_d[None, :], out, mask=g_ok[:, None])
    tl.store(plse_ptr + row, lse, mask=g_ok)


@triton.jit
def _merge_kernel(
    out_ptr, lout_ptr, llse_ptr, pout_ptr, plse_ptr, ratio_ptr, long_heads_ptr, long_groups_ptr,
    logit_tau, tau, stride_ob, stride_oh,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, POLICY: tl.constexpr,
    GROUP_MEAN: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    num_kv = tl.num_programs(1)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    g_ok = offs_g < G
    heads = h * G + offs_g
    row = (b * num_kv + h) * G + offs_g
    out = tl.load(lout_ptr + row[:, None] * D + offs_d[None, :], mask=g_ok[:, None], other=0.0)
    local_lse = tl.load(llse_ptr + row, mask=g_ok, other=0.0)
    flag = tl.load(long_groups_ptr + b * num_kv + h).to(tl.int32)
    read = flag != 0
    # Partials exist only where stage 2 ran: masked loads leave local groups with no bulk mass.
    p_ok = offs_g < G * flag  # g_ok & read (a bool & of vector and scalar breaks the interpreter)
    prow = (b * num_kv + h) * SPLITS * G + offs_g
    lse_max = local_lse
    for s in range(SPLITS):
        lse_max = tl.maximum(lse_max, tl.load(plse_ptr + prow + s * G, mask=p_ok, other=float("-inf")))
    w_local = tl.exp(local_lse - lse_max)
    acc = out * w_local[:, None]
    w_bulk = tl.zeros([GP], tl.float32)
    for s in range(SPLITS):
        w = tl.exp(tl.load(plse_ptr + prow + s * G, mask=p_ok, other=float("-inf")) - lse_max)
        o = tl.load(pout_ptr + (prow + s * G)[:, None] * D + offs_d[None, :], mask=p_ok[:, None], other=0.0)
        acc += o * w[:, None]
        w_bulk += w
    if POLICY == ORACLE:  # exact bulk log-mass lse_max + log(w_bulk); -inf without bulk
        ratio = tl.log(w_bulk) + lse_max - local_lse
        tl.store(ratio_ptr + b * num_kv * G + heads, ratio, mask=g_ok)
        long = _decide(ratio, g_ok, True, logit_tau, tau, G, GROUP_MEAN)
        read = tl.max(long.to(tl.int8), 0) != 0
        tl.store(long_heads_ptr + b * num_kv * G + heads, long.to(tl.int8), mask=g_ok)
        tl.store(long_groups_ptr + b * num_kv + h, read.to(tl.int8))
    out = tl.where(read, acc / (w_local + w_bulk)[:, None], out)
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])


def policy_code(settings: QadaSettings) -> int:
    if settings.given_mask:
        return MASK.value
    if settings.needs_pages:
        return QADA_PAGES.value
    if settings.estimates_bulk:
        return {"prompt": QADA_PROMPT, "calib": QADA_CALIB, "local": QADA_LOCAL}[settings.stats].value
    return {"full": FULL, "local": LOCAL, "oracle": ORACLE}[settings.policy].value


def default_splits(batch: int, num_kv_heads: int, device: torch.device, max_seq_len: int | None = None,
                   tile: int = 64) -> int:
    """Bulk splits per (row, KV head): enough programs to fill the GPU even when few groups are
    long (a power of two in [8, 64] on CUDA), fewer when `max_seq_len` leaves splits empty."""
    if device.type != "cuda":
        return 4
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    splits = min(64, max(8, triton.next_power_of_2(triton.cdiv(16 * sms, batch * num_kv_heads))))
    if max_seq_len is not None:
        splits = min(splits, triton.next_power_of_2(triton.cdiv(max_seq_len, 4 * tile)))
    return max(splits, 1)


def alloc_workspace(batch: int, num_kv_heads: int, group: int, head_dim: int, splits: int,
                    device: torch.device) -> dict[str, Tensor]:
    f32 = dict(device=device, dtype=torch.float32)
    return {
        "local_out": torch.empty(batch, num_kv_heads, group, head_dim, **f32),
        "local_lse": torch.empty(batch, num_kv_heads, group, **f32),
        "part_out": torch.empty(batch, num_kv_heads, splits, group, head_dim, **f32),
        "part_lse": torch.empty(batch, num_kv_heads, splits, group, **f32),
        "log_ratio": torch.empty(batch, num_kv_heads * group, **f32),
        "long_heads": torch.empty(batch, num_kv_heads * group, device=device, dtype=torch.int8),
        "long_groups": torch.empty(batch, num_kv_heads, device=device, dtype=torch.int8),
    }


def qada_decode(
    decode: DecodeBatch,
    settings: QadaSettings,
    inputs: PolicyInputs = NO_INPUTS,
    *,
    out: Tensor | None = None,
    workspace: dict[str, Tensor] | None = None,
    splits: int | None = None,
    tile: int = 64,
    num_warps: int = 4,
) -> DecodeResult:
    """One decode step of one layer. The policy's `inputs` as `policy.PolicyInputs` (the moments'
    pooled sums are read in place by `rows`). Decisions stay on device. `workspace` (from
    `alloc_workspace`, reusable across layers and steps of the same shape) holds the scratch, the
    int8 decisions and, for oracle / qada, log_ratio [B, Hq] = bulk_lse - local_lse."""
    query, key_cache, value_cache, block_table, seq_lens, scale = decode
    batch, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    if num_heads % num_kv_heads or group > 16:
        raise ValueError(f"{num_heads} query heads over {num_kv_heads} KV heads: need G | Hq, G <= 16")
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"head size must be a power of two >= 16, got {head_dim}")
    if query.stride(-1) != 1 or key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError("query and K/V caches need a contiguous last dimension")
    code = policy_code(settings)
    dev = query.device
    if splits is None:
        splits = (workspace["part_lse"].shape[2] if workspace
                  else default_splits(batch, num_kv_heads, dev, tile=tile))
    dummy = seq_lens
    mask, stride_mb, stride_mh = dummy, 0, 0
    moments, calib, long_mask, bulk_lse = inputs[:4]  # pages, blocks: no page selection on GPU yet
    bulk = dummy
    if code == QADA_PAGES.value:
        if bulk_lse is None:
            raise ValueError("qada/pages needs bulk_lse")
        bulk = bulk_lse.float().contiguous()
    if code == MASK.value:
        if long_mask is None:
            raise ValueError(f"policy {settings.policy!r} needs long_mask")
        mask = long_mask.to(device=dev, dtype=torch.int8)
        if mask.dim() == 1:
            mask = mask.unsqueeze(0).expand(batch, num_heads)
        stride_mb, stride_mh = mask.stride()
    n, m1, m2, rows = dummy, dummy, dummy, dummy
    m_strides = (0, 0, 0, 0)
    if code == QADA_PROMPT.value:
        if moments is None:
            raise ValueError("qada/prompt needs moments")
        n, m1, m2 = moments.n, moments.s1.float().contiguous(), moments.s2.float().contiguous()
        rows = torch.arange(batch, device=dev) if moments.rows is None else moments.rows
        m_strides = (m1.stride(0), m1.stride(1), m2.stride(0), m2.stride(1))
    elif code == QADA_CALIB.value:
        if calib is None:
            raise ValueError("qada/calib needs calib")
        m1, m2 = calib[0].float().contiguous(), calib[1].float().contiguous()
        m_strides = (0, m1.stride(0), 0, m2.stride(0))

    ws = workspace or alloc_workspace(batch, num_kv_heads, group, head_dim, splits, dev)
    if ws["part_lse"].shape[:3] != (batch, num_kv_heads, splits):
        raise ValueError("workspace was allocated for another batch, KV head or split count")
    if out is None:
        out = torch.empty_like(query)

    group_mean = settings.groups == "mean"
    meta = dict(G=group, GP=max(16, triton.next_power_of_2(group)), D=head_dim, num_warps=num_warps)
    ieee = key_cache.dtype == torch.float32 or (
        key_cache.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")
    cache_args = (key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
                  value_cache.stride(0), value_cache.stride(1), value_cache.stride(2))
    q_strides = (query.stride(0), query.stride(1))
    _local_kernel[(batch, num_kv_heads)](
        query, key_cache, value_cache, block_table, seq_lens, mask, rows, n, m1, m2, bulk,
        ws["local_out"], ws["local_lse"], ws["log_ratio"], ws["long_heads"], ws["long_groups"],
        scale, settings.logit_tau, settings.tau, settings.t_sink, settings.t_local,
        *q_strides, *cache_args, block_table.stride(0), stride_mb, stride_mh, *m_strides,
        DC=min(32, head_dim), BS=block_size, TILE=tile, POLICY=code, GROUP_MEAN=group_mean, IEEE=ieee,
        **meta,
    )
    _bulk_kernel[(batch, num_kv_heads, splits)](
        query, key_cache, value_cache, block_table, seq_lens,
        ws["long_groups"], ws["part_out"], ws["part_lse"], scale, settings.t_sink, settings.t_local,
        *q_strides, *cache_args, block_table.stride(0),
        BS=block_size, TILE=tile, SPLITS=splits, IEEE=ieee, **meta,
    )
    _merge_kernel[(batch, num_kv_heads)](
        out, ws["local_out"], ws["local_lse"], ws["part_out"], ws["part_lse"], ws["log_ratio"],
        ws["long_heads"], ws["long_groups"],
        settings.logit_tau, settings.tau, out.stride(0), out.stride(1), SPLITS=splits, POLICY=code,
        GROUP_MEAN=group_mean, **meta,
    )
    return DecodeResult(out, ws["long_heads"].view(torch.bool), ws["long_groups"].view(torch.bool))
