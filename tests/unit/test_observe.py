"""The evaluation-only observation (oracle decisions, top-1 positions) and what the counters make
of it, against contiguous references."""

import torch

from attention_backend.observe import Observation, observe_decode
from attention_backend.policy import PolicyConfig, group_rule
from attention_backend.state import DecisionCounters

from paged_helpers import make_case


def test_observation_matches_contiguous_scores():
    cfg = PolicyConfig(policy="qada", tau=0.6, t_sink=4, t_local=24)
    case = make_case([20, 90, 200], num_kv_heads=2, group=3, block_size=32, dtype=torch.float32)
    obs = observe_decode(
        case.query, case.key_cache, case.block_table, case.seq_lens.tolist(), case.scale, cfg
    )
    for b, keys in enumerate(case.keys):
        t = keys.shape[0]
        k = keys.repeat_interleave(3, dim=1)  # [t, Hq, D]
        scores = torch.einsum("hd,thd->ht", case.query[b].float(), k.float()) * case.scale
        assert obs.top1[b].tolist() == scores.argmax(-1).tolist()
        pos = torch.arange(t)
        local = (pos < cfg.t_sink) | (pos >= t - cfg.t_local)
        if local.all():
            assert not obs.oracle_long[b].any()
            continue
        p_bulk = scores.softmax(-1)[:, ~local].sum(-1)
        assert not torch.isclose(p_bulk, torch.tensor(cfg.tau), atol=1e-4).any()  # no tie
        assert obs.oracle_long[b].tolist() == (p_bulk > cfg.tau).tolist()
    assert obs.oracle_long.any() and not obs.oracle_long.all()  # the case mixes both


def test_counters_report_agreement_with_the_oracle():
    counters = DecisionCounters()
    policy = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    oracle = torch.tensor([[1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    top1 = torch.arange(12).view(2, 6)
    for layer in range(2):
        counters.record(
            layer,
            ["a-1", "b-1"],
            policy,
            group_rule(policy, 2),
            torch.tensor([500, 500]),
            local_tokens=144,
            token_bytes=256,
            observation=Observation(oracle, top1),
        )
    counters.end_step()
    a, b = counters.request("a")["oracle"], counters.request("b")["oracle"]
    # row a: heads long (policy) {0,1}, oracle {0}: 1 extra per layer; groups (3 heads each) agree
    assert a["head_decisions"] == {"long": 2, "missed": 0, "extra": 2}
    assert a["kv_group_decisions"] == {"long": 2, "missed": 0, "extra": 0}
    # row b: policy {3}, oracle {4,5}: both in group 1 -> group level agrees, heads disagree
    assert b["head_decisions"] == {"long": 4, "missed": 4, "extra": 2}
    assert b["kv_group_decisions"] == {"long": 2, "missed": 0, "extra": 0}
    observed = counters.snapshot()["observed"][0]
    assert observed["rows"] == [2] * 6
    assert observed["oracle_long"] == [1, 0, 0, 0, 1, 1]
    assert observed["both_long"] == [1, 0, 0, 0, 0, 0]
    trace = counters.trace("a")
    assert trace["top1"] == [[list(range(6))] * 2] and trace["oracle"] == [[[1, 0, 0, 0, 0, 0]] * 2]
    assert counters.request("b")["head_decisions"] == {"long": 2, "local": 10}
