"""Per-(row, query head) long/local decisions for QAdA decoding.

A head is "long" when the bulk of its context (positions outside the sinks and the local
window) may carry more than a share `tau` of its softmax mass. All functions here work on small
per-head tensors; reading the KV cache is the kernel's job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

POLICIES = ("oracle", "qada", "static", "full", "local", "random")
STATS_SOURCES = ("prompt", "calib", "local")


@dataclass(frozen=True)
class PolicyConfig:
    policy: str = "qada"
    tau: float = 0.8
    t_sink: int = 16
    t_local: int = 128
    stats: str = "prompt"
    random_fraction: float = 0.5
    seed: int = 0
    # A decode step whose rows' bulks add up to fewer tokens reads them all (heads count as long):
    # on CPU the decision's fixed cost per layer exceeds the read it could save there. 0: decide.
    min_bulk: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.stats not in STATS_SOURCES:
            raise ValueError(f"stats must be one of {STATS_SOURCES}, got {self.stats!r}")
        if not 0.0 < self.tau < 1.0:
            raise ValueError(f"tau must be in (0, 1), got {self.tau}")
        if self.t_sink < 0:
            raise ValueError(f"t_sink must be >= 0, got {self.t_sink}")
        if self.t_local < 1:
            raise ValueError(f"t_local must be >= 1, got {self.t_local}")
        if not 0.0 <= self.random_fraction <= 1.0:
            raise ValueError(f"random_fraction must be in [0, 1], got {self.random_fraction}")
        if self.min_bulk < 0:
            raise ValueError(f"min_bulk must be >= 0, got {self.min_bulk}")

    @property
    def logit_tau(self) -> float:
        return math.log(self.tau / (1.0 - self.tau))


def _grouped(query: Tensor, num_kv_heads: int) -> Tensor:
    """[B, Hq, D] -> fp32 [B, Hkv, G, D]: query head h belongs to KV head h // G."""
    batch, num_heads, head_dim = query.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    return query.float().view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)


def score_moments_from_key_moments(
    query: Tensor, scale: float, n: Tensor, s1: Tensor, s2: Tensor
) -> tuple[Tensor, Tensor]:
    """Mean and variance [B, Hq] of the scores `scale * q.k` over keys with moments
    n [B], S1 = sum k [B, Hkv, D], S2 = sum k k^T [B, Hkv, D, D] (population variance)."""
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
    cfg: PolicyConfig,
    *,
    n_bulk: Tensor,
    query: Tensor,
    scale: float,
    num_kv_heads: int,
    moments: tuple[Tensor, Tensor, Tensor] | None = None,
    calib: tuple[Tensor, Tensor] | None = None,
    local_score_stats: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """QAdA's estimate [B, Hq] of the bulk log-mass, from the statistics source `cfg.stats`."""
    if cfg.stats == "prompt":
        _require(moments, "moments", "qada/prompt")
        n, s1, s2 = moments
        if s1.shape[1] != num_kv_heads:
            raise ValueError(f"moments have {s1.shape[1]} KV heads, expected {num_kv_heads}")
        mean, var = score_moments_from_key_moments(query, scale, n, s1, s2)
    elif cfg.stats == "calib":
        _require(calib, "calib", "qada/calib")
        mu, sigma = calib
        if mu.shape[0] != num_kv_heads:
            raise ValueError(f"calib has {mu.shape[0]} KV heads, expected {num_kv_heads}")
        mean, var = score_moments_from_gaussian(query, scale, mu, sigma)
    else:
        _require(local_score_stats, "local_score_stats", "qada/local")
        mean, var = local_score_stats
    return gaussian_bulk_lse(n_bulk, mean, var)


def decide_long_heads(
    cfg: PolicyConfig,
    *,
    local_lse: Tensor | None = None,
    n_bulk: Tensor,
    query: Tensor,
    scale: float,
    num_kv_heads: int,
    bulk_lse: Tensor | None = None,
    moments: tuple[Tensor, Tensor, Tensor] | None = None,
    calib: tuple[Tensor, Tensor] | None = None,
    local_score_stats: tuple[Tensor, Tensor] | None = None,
    static_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Bool [B, Hq]: which query heads need the bulk. Heads of rows with n_bulk == 0 are local;
    when the rows' bulks add up to fewer than cfg.min_bulk tokens, all the others are long.

    local_lse [B, Hq] is needed by oracle and qada, bulk_lse [B, Hq] by oracle; moments /
    calib / local_score_stats by qada depending on cfg.stats; static_mask [Hq] by static;
    generator by random.
    """
    batch, num_heads, _ = query.shape
    policy = cfg.policy
    if policy == "full":
        long = torch.ones(batch, num_heads, dtype=torch.bool)
    elif policy == "local":
        long = torch.zeros(batch, num_heads, dtype=torch.bool)
    elif policy == "static":
        _require(static_mask, "static_mask", policy)
        if static_mask.shape != (num_heads,):
            raise ValueError(f"static_mask must have shape ({num_heads},), got {tuple(static_mask.shape)}")
        long = static_mask.to(torch.bool).unsqueeze(0).expand(batch, num_heads)
    elif policy == "random":
        _require(generator, "generator", policy)
        long = torch.rand(batch, num_heads, generator=generator) < cfg.random_fraction
    else:
        _require(local_lse, "local_lse", policy)
        if policy == "oracle":
            _require(bulk_lse, "bulk_lse", policy)
        else:
            bulk_lse = estimated_bulk_lse(
                cfg,
                n_bulk=n_bulk,
                query=query,
                scale=scale,
                num_kv_heads=num_kv_heads,
                moments=moments,
                calib=calib,
                local_score_stats=local_score_stats,
            )
        long = bulk_lse - local_lse > cfg.logit_tau
    if cfg.min_bulk and int(n_bulk.sum()) < cfg.min_bulk:
        long = torch.ones_like(long)
    return long & (n_bulk > 0).unsqueeze(1)


def group_rule(long_heads: Tensor, num_kv_heads: int) -> Tensor:
    """Bool [B, Hkv]: a KV group is read in full if any of its query heads is long."""
    batch, num_heads = long_heads.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    return long_heads.view(batch, num_kv_heads, -1).any(-1)


def _require(value: object, name: str, policy: str) -> None:
    if value is None:
        raise ValueError(f"policy {policy!r} needs `{name}`, which was not given")
