"""Decision rules and the settings they read, on small hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from attention_backend.policy import (
    Moments,
    PolicyInputs,
    decide_long_heads,
    group_rule,
    random_long_mask,
    score_moments_from_gaussian,
    score_moments_from_key_moments,
)
from attention_backend.settings import POLICIES, QadaSettings

B, HKV, G, D = 4, 2, 3, 8
HQ = HKV * G
SCALE = D**-0.5


def inputs(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(
        local_lse=torch.randn(B, HQ, generator=gen),
        n_bulk=torch.tensor([0, 1, 50, 1000]),
        query=torch.randn(B, HQ, D, generator=gen),
        scale=SCALE,
        num_kv_heads=HKV,
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(policy="nope"), "policy"),
        (dict(stats="nope"), "stats"),
        (dict(tau=0.0), "tau"),
        (dict(tau=1.0), "tau"),
        (dict(t_sink=-1), "t_sink"),
        (dict(t_local=0), "t_local"),
        (dict(random_fraction=1.5), "random_fraction"),
        (dict(min_bulk=-1), "min_bulk"),
        (dict(surprise=1), "surprise"),
    ],
)
def test_settings_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QadaSettings(**kwargs)


def test_settings_are_immutable_and_replaced_whole() -> None:
    settings = QadaSettings(tau=0.7)
    with pytest.raises(ValueError):
        settings.tau = 0.9
    assert settings.replace(tau=0.9) == QadaSettings(tau=0.9) and settings.tau == 0.7
    with pytest.raises(ValueError, match="tau"):
        settings.replace(tau=2)


@pytest.mark.parametrize(
    "policy,stats,needs",
    [
        ("qada", "prompt", "needs_moments"),
        ("qada", "calib", "needs_calib"),
        ("qada", "local", "needs_local_score_stats"),
        ("oracle", "prompt", "needs_exact_bulk"),
        ("static", "prompt", "needs_head_mask"),
        ("random", "calib", "needs_generator"),
        ("full", "prompt", None),
        ("local", "prompt", None),
    ],
)
def test_each_policy_needs_exactly_its_inputs(policy: str, stats: str, needs: str | None) -> None:
    settings = QadaSettings(policy=policy, stats=stats)
    flags = (
        "needs_moments",
        "needs_calib",
        "needs_local_score_stats",
        "needs_exact_bulk",
        "needs_head_mask",
        "needs_generator",
    )
    assert [getattr(settings, f) for f in flags] == [f == needs for f in flags]
    assert settings.decides == (policy != "full")


@pytest.mark.parametrize(
    "policy,stats,missing",
    [
        ("oracle", "prompt", "bulk_lse"),
        ("qada", "prompt", "moments"),
        ("qada", "calib", "calib"),
        ("qada", "local", "local_score_stats"),
        ("static", "prompt", "long_mask"),
        ("random", "prompt", "long_mask"),
    ],
)
def test_missing_inputs_raise(policy: str, stats: str, missing: str) -> None:
    with pytest.raises(ValueError, match=missing):
        decide_long_heads(QadaSettings(policy=policy, stats=stats), **inputs())


def test_mask_shape_is_checked() -> None:
    with pytest.raises(ValueError, match="long_mask"):
        decide_long_heads(
            QadaSettings(policy="static"),
            **inputs(),
            inputs=PolicyInputs(long_mask=torch.ones(HQ + 1, dtype=torch.bool)),
        )


def test_full_local_static() -> None:
    has_bulk = torch.tensor([False, True, True, True]).unsqueeze(1).expand(B, HQ)
    assert torch.equal(decide_long_heads(QadaSettings(policy="full"), **inputs()), has_bulk)
    assert not decide_long_heads(QadaSettings(policy="local"), **inputs()).any()
    mask = torch.tensor([True, False, False, False, False, True])
    assert torch.equal(
        decide_long_heads(QadaSettings(policy="static"), **inputs(), inputs=PolicyInputs(long_mask=mask)),
        mask & has_bulk,
    )


@pytest.mark.parametrize("tau", [0.1, 0.5, 0.9])
def test_oracle_thresholds_bulk_share(tau: float) -> None:
    args = inputs()
    bulk_lse = torch.randn(B, HQ) * 3
    long = decide_long_heads(QadaSettings(policy="oracle", tau=tau), **args, bulk_lse=bulk_lse)
    share = torch.sigmoid(bulk_lse - args["local_lse"])  # p_B = A_B / (A_L + A_B)
    assert torch.equal(long, (share > tau) & (args["n_bulk"] > 0).unsqueeze(1))


def test_random_fraction_and_seed() -> None:
    args = inputs()

    def draw(fraction: float, seed: int) -> torch.Tensor:
        mask = random_long_mask(fraction, B, HQ, torch.Generator().manual_seed(seed))
        return decide_long_heads(
            QadaSettings(policy="random", random_fraction=fraction),
            **args,
            inputs=PolicyInputs(long_mask=mask),
        )

    assert torch.equal(draw(0.5, 1), draw(0.5, 1))
    assert not draw(0.0, 1).any()
    assert torch.equal(draw(1.0, 1), args["n_bulk"].gt(0).unsqueeze(1).expand(B, HQ))
    big = random_long_mask(0.3, 2000, HQ, torch.Generator().manual_seed(0))
    assert abs(big.float().mean().item() - 0.3) < 0.02


def key_moments(keys: torch.Tensor) -> Moments:
    """keys [B, n, Hkv, D] -> (n [B], S1, S2)."""
    n = torch.full((keys.shape[0],), keys.shape[1])
    return Moments(n, keys.sum(1), torch.einsum("bnkd,bnke->bkde", keys, keys))


def test_score_moments_match_empirical_scores() -> None:
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(B, 30, HKV, D, generator=gen) + 2.0
    query = torch.randn(B, HQ, D, generator=gen)
    mean, var = score_moments_from_key_moments(query, SCALE, key_moments(keys))
    scores = SCALE * torch.einsum("bhd,bnhd->bhn", query, keys.repeat_interleave(G, dim=2))
    torch.testing.assert_close(mean, scores.mean(-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(var, scores.var(-1, unbiased=False), rtol=1e-3, atol=1e-4)


def test_prompt_and_calib_agree_on_same_gaussian() -> None:
    gen = torch.Generator().manual_seed(2)
    keys = torch.randn(1, 40, HKV, D, generator=gen).expand(B, -1, -1, -1)  # same keys every row
    mu = keys[0].mean(0)
    sigma = torch.stack([torch.cov(keys[0, :, h].T, correction=0) for h in range(HKV)])
    args = inputs(3)
    mean_p, var_p = score_moments_from_key_moments(args["query"], SCALE, key_moments(keys))
    mean_c, var_c = score_moments_from_gaussian(args["query"], SCALE, mu, sigma)
    torch.testing.assert_close(mean_p, mean_c, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var_p, var_c, rtol=1e-3, atol=1e-5)


def test_qada_formula_and_gqa_mapping() -> None:
    """Changing KV head 1's statistics changes decisions of query heads G..2G-1 only."""
    gen = torch.Generator().manual_seed(4)
    args = inputs(4)
    direction = torch.nn.functional.normalize(torch.randn(D, generator=gen), dim=0)
    args["query"][:, G : 2 * G] = 3 * direction + 0.1 * torch.randn(B, G, D, generator=gen)
    mu, sigma = torch.zeros(HKV, D), torch.zeros(HKV, D, D)
    cfg = QadaSettings(policy="qada", stats="calib", tau=0.5)
    # zero mean and variance: the estimate is log n_B
    base = decide_long_heads(cfg, **args, inputs=PolicyInputs(calib=(mu, sigma)))
    has_bulk = (args["n_bulk"] > 0).unsqueeze(1)
    assert torch.equal(base, (args["n_bulk"].float().log().unsqueeze(1) > args["local_lse"]) & has_bulk)
    mu[1] = 20 * direction  # group 1's queries now score the bulk far above their local sets
    changed = decide_long_heads(cfg, **args, inputs=PolicyInputs(calib=(mu, sigma)))
    assert torch.equal(changed[:, :G], base[:, :G]) and torch.equal(changed[:, 2 * G :], base[:, 2 * G :])
    assert torch.equal(changed[:, G : 2 * G], has_bulk.expand(B, G))


def test_qada_local_stats_formula() -> None:
    args = inputs(5)
    mean, var = torch.randn(B, HQ), torch.rand(B, HQ)
    long = decide_long_heads(
        QadaSettings(policy="qada", stats="local", tau=0.7), **args, local_score_stats=(mean, var)
    )
    estimate = args["n_bulk"].float().log().unsqueeze(1) + mean + var / 2
    expected = (estimate - args["local_lse"] > math.log(0.7 / 0.3)) & (args["n_bulk"] > 0).unsqueeze(1)
    assert torch.equal(long, expected)


@pytest.mark.parametrize("policy", POLICIES)
def test_rows_without_bulk_are_local(policy: str) -> None:
    args = {**inputs(), "n_bulk": torch.zeros(B, dtype=torch.long), "local_lse": torch.full((B, HQ), -50.0)}
    long = decide_long_heads(
        QadaSettings(policy=policy, stats="local", random_fraction=1.0),
        **args,
        bulk_lse=torch.zeros(B, HQ),
        local_score_stats=(torch.zeros(B, HQ), torch.zeros(B, HQ)),
        inputs=PolicyInputs(long_mask=torch.ones(HQ, dtype=torch.bool)),
    )
    assert not long.any()


def test_group_rule_is_any_over_group() -> None:
    long = torch.tensor(
        [
            [False, False, True, False, False, False],
            [False, False, False, False, False, False],
            [True, True, True, True, False, True],
        ]
    )
    assert group_rule(long, 2).tolist() == [[True, False], [False, False], [True, True]]
    assert torch.equal(group_rule(long, 6), long)
    with pytest.raises(ValueError, match="multiple"):
        group_rule(long, 4)
