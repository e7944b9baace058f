"""Tensor and pipeline parallel without an engine: each rank's share of the model as vLLM splits
it, the policy built for a share, and the merge of the ranks' answers. The merge is checked on
the real counting code: a whole-model step is split into what each rank's layers decide (its
heads, its layers), every rank counts its part with its own `DecisionCounters` and `RequestLog`,
and the merged answers must equal those of one rank that counted the whole step."""

from __future__ import annotations

import pytest
import torch

from attention_backend.context import StepDecisions
from attention_backend.counters import DecisionCounters
from attention_backend.ranks import (
    RANK,
    RankShare,
    merge_counters,
    merge_request_stats,
    merge_same,
    merge_traces,
)
from attention_backend.request_log import RequestLog
from attention_backend.settings import ActivePolicy, QadaSettings
from attention_backend.testing.batches import TEST_SHAPE

LAYOUTS = {"tp3": (3, 1), "pp2": (1, 2), "tp3-pp2": (3, 2)}


def shares(tp: int, pp: int, shape=TEST_SHAPE) -> list[RankShare]:
    return [RankShare.of(shape, t, tp, p, pp) for p in range(pp) for t in range(tp)]


def test_shares_follow_vllms_split_of_heads_and_layers():
    tp3 = shares(3, 1)
    assert [s.heads for s in tp3] == [(0, 3), (3, 6), (6, 9)]
    assert [s.kv_heads for s in tp3] == [(0, 1), (1, 2), (2, 3)]
    assert {s.layers for s in tp3} == {(0, 30)}
    assert [s.layers for s in shares(1, 2)] == [(0, 15), (15, 30)]
    wide = TEST_SHAPE.__class__(**{**TEST_SHAPE.__dict__, "num_heads": 12})  # 6 ranks, 3 KV heads
    assert [s.kv_heads for s in shares(6, 1, wide)] == [(0, 1), (0, 1), (1, 2), (1, 2), (2, 3), (2, 3)]


def whole_step(seed: int, rows: int = 3, observed: bool = True) -> StepDecisions:
    gen = torch.Generator().manual_seed(seed)
    layers, hq, hkv = TEST_SHAPE.num_layers, TEST_SHAPE.num_heads, TEST_SHAPE.num_kv_heads
    heads = torch.rand(rows, layers, hq, generator=gen) < 0.3
    groups = heads.view(rows, layers, hkv, -1).any(-1)
    step = StepDecisions(
        req_ids=[f"req-{i}" for i in range(rows)],
        layers=list(range(layers)),
        seq_lens=torch.tensor([300 + 100 * i for i in range(rows)]),
        heads=heads,
        groups=groups,
        token_bytes=512,
        local_tokens=144,
    )
    if observed:
        step.oracle_heads = torch.rand(rows, layers, hq, generator=gen) < 0.3
        step.oracle_groups = step.oracle_heads.view(rows, layers, hkv, -1).any(-1)
        step.top1 = torch.randint(0, 300, (rows, layers, hq), generator=gen)
    return step


def rank_part(step: StepDecisions, share: RankShare) -> StepDecisions:
    """What the layers of `share` decide of `step`: its layers, its query and KV heads."""
    layers, heads, kv = slice(*share.layers), share.head_slice(), share.kv_head_slice()
    part = StepDecisions(
        req_ids=step.req_ids,
        layers=step.layers[layers],
        seq_lens=step.seq_lens,
        heads=step.heads[:, layers, heads],
        groups=step.groups[:, layers, kv],
        token_bytes=step.token_bytes,
        local_tokens=step.local_tokens,
    )
    if step.oracle_heads is not None:
        part.oracle_heads = step.oracle_heads[:, layers, heads]
        part.oracle_groups = step.oracle_groups[:, layers, kv]
        part.top1 = step.top1[:, layers, heads]
    return part


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("observed", [False, True])
def test_merged_answers_equal_one_rank_counting_the_whole_model(layout, observed):
    ranks = shares(*LAYOUTS[layout])
    whole_counts, whole_log = DecisionCounters(), RequestLog()
    parts = [(share, DecisionCounters(), RequestLog()) for share in ranks]
    keys = ["tag-a", "tag-b", "tag-a"]  # one API request of two prompts, and another
    for seed in range(4):
        step = whole_step(seed, observed=observed)
        whole_counts.add(step)
        whole_log.add(step, keys)
        for share, counts, log in parts:
            counts.add(rank_part(step, share))
            log.add(rank_part(step, share), keys)

    def answers(method, *args):
        return [
            None if (a := getattr(obj, method)(*args)) is None else {**a, RANK: share.as_dict()}
            for share, counts, log in parts
            for obj in [counts if method == "snapshot" else log]
        ]

    assert merge_counters(answers("snapshot")) == whole_counts.snapshot()
    for key in ("tag-a", "tag-b", "tag-none"):
        assert merge_request_stats(answers("request", key)) == whole_log.request(key)
    assert merge_traces(answers("trace", "tag-a")) == whole_log.trace("tag-a")
    assert merge_traces(answers("trace", "tag-none")) is None


def test_ranks_must_agree_on_the_policy():
    settings = QadaSettings().model_dump()
    answers = [{**settings, RANK: share.as_dict()} for share in shares(3, 1)]
    assert merge_same(answers) == settings
    answers[2]["tau"] = 0.9
    with pytest.raises(RuntimeError, match="disagree"):
        merge_same(answers)


def test_a_share_gets_its_heads_of_the_static_mask_and_calib():
    pairs = [[0, 0], [0, 4], [29, 8]]
    files = {"static_heads": pairs, "calib": None}
    whole = ActivePolicy.load(QadaSettings(policy="static", static_heads=pairs), TEST_SHAPE, files)
    for share in shares(3, 2):
        policy = ActivePolicy.load(whole.settings, TEST_SHAPE, files, share=share)
        assert torch.equal(policy.static_heads, whole.static_heads[:, share.head_slice()])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_random_draws_of_a_share_are_the_whole_models(layout):
    settings = QadaSettings(policy="random", random_fraction=0.5, seed=7)
    whole = ActivePolicy.load(settings, TEST_SHAPE, {})
    policies = [
        (share, ActivePolicy.load(settings, TEST_SHAPE, {}, share=share))
        for share in shares(*LAYOUTS[layout])
    ]
    for _step in range(3):
        drawn = [whole.layer_inputs(layer, 4, 9, torch.device("cpu")).long_mask for layer in range(30)]
        for share, policy in policies:
            for layer in range(*share.layers):  # each rank runs its own layers, in order
                mask = policy.layer_inputs(
                    layer, 4, 3 if share.tp_size == 3 else 9, torch.device("cpu")
                ).long_mask
                assert torch.equal(mask, drawn[layer][:, share.head_slice()])
