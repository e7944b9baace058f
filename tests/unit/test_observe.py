"""The evaluation-only observation (oracle decisions, top-1 positions) in both cache layouts, and
what the counters and the request log make of it, against contiguous references."""

import pytest
import torch

from attention_backend.context import LayerDecisions, StepContext
from attention_backend.counters import DecisionCounters
from attention_backend.kv_layout import CPU_VEC, TRITON_NHD
from attention_backend.moments import MomentStore
from attention_backend.page_summaries import PageSummaries
from attention_backend.policy import group_rule
from attention_backend.reference import Observation, exact_lse
from attention_backend.request_log import RequestLog
from attention_backend.settings import ActivePolicy, QadaSettings
from attention_backend.testing.batches import TEST_SHAPE
from attention_backend.testing.paged_cases import make_case


@pytest.mark.parametrize("layout", [CPU_VEC, TRITON_NHD], ids=lambda layout: layout.name)
def test_observation_matches_contiguous_scores(layout):
    settings = QadaSettings(policy="qada", tau=0.6, t_sink=4, t_local=24)
    case = make_case(
        [20, 90, 200], num_kv_heads=2, group=3, block_size=32, dtype=torch.float32, layout=layout
    )
    lengths = case.seq_lens.tolist()
    exact = exact_lse(layout, case.batch(), lengths, settings)
    obs = exact.observe(settings.logit_tau)
    for b, keys in enumerate(case.keys):
        t = keys.shape[0]
        k = keys.repeat_interleave(3, dim=1)  # [t, Hq, D]
        scores = torch.einsum("hd,thd->ht", case.query[b].float(), k.float()) * case.scale
        assert obs.top1[b].tolist() == scores.argmax(-1).tolist()
        pos = torch.arange(t)
        local = (pos < settings.t_sink) | (pos >= t - settings.t_local)
        if local.all():
            assert not obs.oracle_long[b].any()
            continue
        p_bulk = scores.softmax(-1)[:, ~local].sum(-1)
        assert not torch.isclose(p_bulk, torch.tensor(settings.tau), atol=1e-4).any()  # no tie
        assert obs.oracle_long[b].tolist() == (p_bulk > settings.tau).tolist()
    assert obs.oracle_long.any() and not obs.oracle_long.all()  # the case mixes both


def test_counters_report_agreement_with_the_oracle():
    policy = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    oracle = torch.tensor([[1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    top1 = torch.arange(12).view(2, 6)
    active = ActivePolicy.load(QadaSettings(t_sink=16, t_local=128), TEST_SHAPE, files={})
    ctx = StepContext(active, MomentStore(), runner=None, pages=PageSummaries(32))
    for layer in range(2):
        ctx.decisions.append(
            LayerDecisions(
                layer,
                ["a-1", "b-1"],
                torch.tensor([500, 500]),
                policy,
                group_rule(policy, 2),
                token_bytes=256,
                observation=Observation(oracle, top1),
            )
        )
    step = ctx.step_decisions()
    counters, log = DecisionCounters(), RequestLog()
    counters.add(step)
    log.add(step, ["a", "b"])
    a, b = log.request("a")["oracle"], log.request("b")["oracle"]
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
    trace = log.trace("a")
    assert trace["top1"] == [[list(range(6))] * 2] and trace["oracle"] == [[[1, 0, 0, 0, 0, 0]] * 2]
    assert log.request("b")["head_decisions"] == {"long": 2, "local": 10}
    # bytes: 2 rows x 2 KV heads x 500 tokens per layer; long groups read all, local 144 tokens
    layer0 = counters.snapshot()["layers"][0]
    assert layer0["kv_bytes_read"] == (500 + 144 + 500 + 144) * 256  # a: group 0 long; b: group 1 long
    assert layer0["kv_bytes_read"] + layer0["kv_bytes_skipped"] == 2 * 2 * 500 * 256
