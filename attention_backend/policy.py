"""Per-(row, query head) long/local decisions for QAdA decoding, and the host-side definitions
every path shares (the CPU kernel, the Triton kernel's comments, the references, the counters).

A decode row of length L, whose current token is at position L - 1, splits its context into
- the local set: the sinks, positions [0, t_sink), and the window, positions > L - 1 - t_local;
- the bulk: everything else, positions [t_sink, L - t_local).
A head is "long" when the bulk may carry more than a share `tau` of its softmax mass; a KV group
is read in full when any of its query heads is long. All functions here work on small per-head
tensors; reading the KV cache is the kernels' job.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .key_codes import KeyCopy
    from .page_estimate import PageMasses
    from .settings import QadaSettings


class DecodeBatch(NamedTuple):
    """One layer's decode step over a paged KV cache, as the kernels and references take it."""

    query: Tensor  # [B, Hq, D], one query per row (strided rows allowed)
    key_cache: Tensor  # in the kernel's layout (`kv_layout`)
    value_cache: Tensor
    block_table: Tensor  # [B, max_blocks]
    seq_lens: Tensor  # [B], including the current token (its K/V is in the cache already)
    scale: float


class DecodeResult(NamedTuple):
    """One layer's decode step, from either kernel."""

    output: Tensor  # [B, Hq, D], query dtype
    long_heads: Tensor  # [B, Hq] bool
    long_groups: Tensor  # [B, Hkv] bool
    kept_blocks: Tensor | None = None  # with page selection: [B, Hkv] KV blocks a long group reads


class Moments(NamedTuple):
    """Bulk-key moments of the decode rows: n [B] int64, S1 = sum k [R, Hkv, D] and
    S2 = sum k k^T [R, Hkv, D, D] (fp32). With `rows` [B], row b's sums are S1[rows[b]] of a
    pool of R; without, R = B."""

    n: Tensor
    s1: Tensor
    s2: Tensor
    rows: Tensor | None = None

    def per_row(self) -> Moments:
        if self.rows is None:
            return self
        return Moments(self.n, self.s1.index_select(0, self.rows), self.s2.index_select(0, self.rows))


class PolicyInputs(NamedTuple):
    """What a policy reads besides the query and the cache: bulk-key moments (qada/prompt),
    calibrated statistics mu [Hkv, D] and sigma [Hkv, D, D] (qada/calib), or the decisions as a
    mask, [Hq] or [B, Hq] (static, random), or the bulk log-mass [B, Hq] estimated before the
    kernel runs (qada/pages, `page_estimate`). The settings' `needs_*` properties say which."""

    moments: Moments | None = None
    calib: tuple[Tensor, Tensor] | None = None
    long_mask: Tensor | None = None
    bulk_lse: Tensor | None = None
    pages: PageMasses | None = None  # with page selection: what it ranks
    blocks: Tensor | None = None  # with page_rank_layers: bool [B, nb], the blocks a rank layer chose
    key_copy: KeyCopy | None = None  # with page_rank_bits: the layer's low-bit keys

    def to_cpu(self) -> PolicyInputs:
        return PolicyInputs(
            None if self.moments is None else Moments(*(t.cpu() for t in self.moments.per_row()[:3])),
            None if self.calib is None else tuple(t.cpu() for t in self.calib),
            None if self.long_mask is None else self.long_mask.cpu(),
            None if self.bulk_lse is None else self.bulk_lse.cpu(),
            None if self.pages is None else type(self.pages)(*(t.cpu() for t in self.pages)),
            None if self.blocks is None else self.blocks.cpu(),
            None
            if self.key_copy is None
            else self.key_copy._replace(codes=self.key_copy.codes.cpu(), stats=self.key_copy.stats.cpu()),
        )


NO_INPUTS = PolicyInputs()


def bulk_range(seq_len: int, t_sink: int, t_local: int) -> tuple[int, int]:
    """Half-open bulk positions [start, end) of a row of length `seq_len`; empty when end == start."""
    return t_sink, max(t_sink, seq_len - t_local)


def bulk_sizes(seq_lens: Tensor, settings: QadaSettings) -> Tensor:
    """[B] int64: the number of bulk positions of each row."""
    return (seq_lens.long() - settings.t_sink - settings.t_local).clamp(min=0)


def local_mask(positions: Tensor, seq_lens: Tensor | int, t_sink: int, t_local: int) -> Tensor:
    """Bool, the shape of `positions`: which positions of rows of length `seq_lens` (broadcast
    against them) are in the local set. Positions >= the length are not."""
    last = seq_lens - 1
    return ((positions < t_sink) | (positions > last - t_local)) & (positions <= last)


def score_stats(scores: Tensor, valid: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Mean and population variance of `scores` over `dims`, counting only `valid` entries (qada's
    `local` statistics, over the local set)."""
    count = valid.sum(dims)
    mean = torch.where(valid, scores, 0.0).sum(dims) / count
    dev = (scores - mean.view(_keepdim_shape(scores.shape, dims))).square()
    return mean, torch.where(valid, dev, 0.0).sum(dims) / count


def _keepdim_shape(shape: torch.Size, dims: tuple[int, ...]) -> list[int]:
    return [1 if i in dims or i - len(shape) in dims else n for i, n in enumerate(shape)]


def random_long_mask(fraction: float, batch: int, num_heads: int, generator: torch.Generator) -> Tensor:
    """Bool [B, Hq]: the random policy's draw for one layer of one step, on the host."""
    return torch.rand(batch, num_heads, generator=generator) < fraction


def _grouped(query: Tensor, num_kv_heads: int) -> Tensor:
    """[B, Hq, D] -> fp32 [B, Hkv, G, D]: query head h belongs to KV head h // G."""
    batch, num_heads, head_dim = query.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    return query.float().view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)


def score_moments_from_key_moments(query: Tensor, scale: float, moments: Moments) -> tuple[Tensor, Tensor]:
    """Mean and variance [B, Hq] of the scores `scale * q.k` over the keys whose moments are given
    (population variance)."""
    n, s1, s2, _ = moments.per_row()
    q = _grouped(query, s1.shape[1])
    count = n.float().clamp(min=1.0).view(-1, 1, 1)
    q_mu = torch.einsum("bkgd,bkd->bkg", q, s1) / count
    q_s2_q = (torch.einsum("bkgd,bkde->bkge", q, s2) * q).sum(-1) / count
    var = (q_s2_q - q_mu.square()).clamp(min=0.0)  # fp32 cancellation can dip below 0
    return scale * q_mu.flatten(1), scale**2 * var.flatten(1)


def score_moments_from_gaussian(
    query: Tensor, scale: float, mu: Tensor, sigma: Tensor
) -> tuple[Tensor, Tensor]:
    """Mean and variance [B, Hq] of the scores when keys ~ N(mu [Hkv, D], sigma [Hkv, D, D])."""
    q = _grouped(query, mu.shape[0])
    q_mu = torch.einsum("bkgd,kd->bkg", q, mu.float())
    q_sigma_q = (torch.einsum("bkgd,kde->bkge", q, sigma.float()) * q).sum(-1)
    return scale * q_mu.flatten(1), scale**2 * q_sigma_q.flatten(1)


def gaussian_bulk_lse(n_bulk: Tensor, score_mean: Tensor, score_var: Tensor) -> Tensor:
    """log sum_{i in bulk} e^{s_i} ~= log n_B + log E[e^s] for s ~ N(mean, var); -inf if n_B = 0."""
    return n_bulk.float().log().unsqueeze(1) + score_mean + score_var / 2


def estimated_bulk_lse(
    settings: QadaSettings,
    query: Tensor,
    scale: float,
    n_bulk: Tensor,
    num_kv_heads: int,
    inputs: PolicyInputs,
    local_score_stats: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """QAdA's estimate [B, Hq] of the bulk log-mass, from the statistics source `settings.stats`."""
    if settings.needs_pages:
        return _require(inputs.bulk_lse, "bulk_lse", "qada/pages")
    if settings.needs_moments:
        moments = _require(inputs.moments, "moments", "qada/prompt")
        if moments.s1.shape[1] != num_kv_heads:
            raise ValueError(f"moments have {moments.s1.shape[1]} KV heads, expected {num_kv_heads}")
        mean, var = score_moments_from_key_moments(query, scale, moments)
    elif settings.needs_calib:
        mu, sigma = _require(inputs.calib, "calib", "qada/calib")
        if mu.shape[0] != num_kv_heads:
            raise ValueError(f"calib has {mu.shape[0]} KV heads, expected {num_kv_heads}")
        mean, var = score_moments_from_gaussian(query, scale, mu, sigma)
    else:
        mean, var = _require(local_score_stats, "local_score_stats", "qada/local")
    return gaussian_bulk_lse(n_bulk, mean, var)


def decide_long_heads(
    settings: QadaSettings,
    query: Tensor,
    scale: float,
    n_bulk: Tensor,
    num_kv_heads: int,
    inputs: PolicyInputs = NO_INPUTS,
    *,
    local_lse: Tensor | None = None,
    bulk_lse: Tensor | None = None,
    local_score_stats: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Bool [B, Hq]: which query heads need the bulk. Heads of rows with n_bulk == 0 are local.

    The kernel's own measurements: local_lse [B, Hq] (oracle, qada), the exact bulk_lse [B, Hq]
    (oracle), the local scores' statistics (qada/local); the rest comes in `inputs`.
    """
    batch, num_heads, _ = query.shape
    if settings.given_mask:
        long_mask = _require(inputs.long_mask, "long_mask", settings.policy)
        if long_mask.shape not in ((num_heads,), (batch, num_heads)):
            raise ValueError(
                f"long_mask must have shape ({num_heads},) or ({batch}, {num_heads}), "
                f"got {tuple(long_mask.shape)}"
            )
        long = long_mask.to(torch.bool).expand(batch, num_heads)
    elif settings.policy == "full":
        long = torch.ones(batch, num_heads, dtype=torch.bool)
    elif settings.policy == "local":
        long = torch.zeros(batch, num_heads, dtype=torch.bool)
    else:
        _require(local_lse, "local_lse", settings.policy)
        if settings.needs_exact_bulk:
            _require(bulk_lse, "bulk_lse", settings.policy)
        else:
            bulk_lse = estimated_bulk_lse(
                settings, query, scale, n_bulk, num_kv_heads, inputs, local_score_stats
            )
        log_ratio = bulk_lse - local_lse
        if settings.groups == "mean":  # a group's heads go long together
            share = torch.sigmoid(log_ratio).view(batch, num_kv_heads, -1).mean(-1, keepdim=True)
            long = (share > settings.tau).expand(-1, -1, num_heads // num_kv_heads).reshape(batch, num_heads)
        else:
            long = log_ratio > settings.logit_tau
    return long & (n_bulk > 0).unsqueeze(1).to(long.device)


def group_rule(long_heads: Tensor, num_kv_heads: int) -> Tensor:
    """Bool [B, Hkv]: a KV group is read in full if any of its query heads is long (with
    `groups: mean`, `decide_long_heads` has made a group's heads agree already)."""
    batch, num_heads = long_heads.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    return long_heads.view(batch, num_kv_heads, -1).any(-1)


def reads_everything(n_bulk: Tensor, num_heads: int, num_kv_heads: int) -> tuple[Tensor, Tensor]:
    """The (long heads [B, Hq], long groups [B, Hkv]) of rows that are not decided: long wherever
    there is a bulk."""
    has_bulk = (n_bulk > 0).unsqueeze(1)
    return has_bulk.expand(-1, num_heads), has_bulk.expand(-1, num_kv_heads)


def _require(value, name: str, policy: str):
    if value is None:
        raise ValueError(f"policy {policy!r} needs `{name}`, which was not given")
    return value
