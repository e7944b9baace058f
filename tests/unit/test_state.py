"""Worker state: per-request key moments kept exact across decode steps, preemption and finish;
policy (re)configuration."""
from __future__ import annotations

import json

import pytest
import torch

from attention_backend.moments import KeyMoments, bulk_range
from attention_backend.policy import PolicyConfig
from attention_backend.state import WorkerState
from paged_helpers import make_case, write_tokens


def contiguous_moments(keys: torch.Tensor, seq_len: int, cfg: PolicyConfig):
    start, end = bulk_range(seq_len, cfg.t_sink, cfg.t_local)
    bulk = keys[start:end].float()
    return end - start, bulk.sum(0), torch.einsum("nhd,nhe->hde", bulk, bulk)


def test_moments_stay_exact_over_steps_preemption_and_finish():
    cfg = PolicyConfig(t_sink=4, t_local=40)
    start_lens, steps, block_size = [30, 50, 95], 70, 32
    case = make_case(start_lens, num_kv_heads=3, group=3, block_size=block_size,
                     dtype=torch.float32, capacity=[n + steps for n in start_lens])
    gen = torch.Generator().manual_seed(1)
    full_keys = [torch.cat([k, torch.randn(steps, 3, 64, generator=gen)]) for k in case.keys]
    state = WorkerState()
    ids = ["a", "b", "c"]
    for step in range(steps + 1):
        lens = [n + step for n in start_lens]
        if step:  # append this step's token of every row, as vLLM does before attention
            for row, n in enumerate(lens):
                new = full_keys[row][n - 1 : n]
                write_tokens(case.key_cache, case.value_cache, case.block_table[row], n - 1, new, new)
        if step == 40:
            state.forget(["b"])  # preempted: rebuilt from the cache next time
        n, s1, s2 = state.prompt_moments(layer=7, req_ids=ids, key_cache=case.key_cache,
                                         block_table=case.block_table, seq_lens=lens, cfg=cfg)
        for row in range(3):
            ref_n, ref_s1, ref_s2 = contiguous_moments(full_keys[row], lens[row], cfg)
            assert n[row] == ref_n
            torch.testing.assert_close(s1[row], ref_s1, rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(s2[row], ref_s2, rtol=1e-4, atol=1e-2)
    incremental = state.moments["a"][7]
    fresh = KeyMoments.build(case.key_cache, case.block_table[0], lens[0], cfg.t_sink, cfg.t_local)
    assert incremental.n == fresh.n and incremental.end == fresh.end
    torch.testing.assert_close(incremental.s2, fresh.s2, rtol=1e-4, atol=1e-2)
    state.forget(["a", "c"])  # finished
    assert set(state.moments) == {"b"}


def test_rows_without_bulk_have_no_state_yet():
    cfg = PolicyConfig(t_sink=16, t_local=128)
    case = make_case([100, 300], num_kv_heads=3, group=3, block_size=128, dtype=torch.float32)
    state = WorkerState()
    n, s1, _ = state.prompt_moments(0, ["short", "long"], case.key_cache, case.block_table,
                                    [100, 300], cfg)
    assert n.tolist() == [0, 300 - 144] and not s1[0].any()
    assert "long" in state.moments and not state.moments.get("short")


def test_configure_validates_and_resets_moments_when_the_window_changes(tmp_path):
    state = WorkerState()
    state.configure({"policy": "qada", "tau": 0.7})
    assert state.policy == PolicyConfig(policy="qada", tau=0.7)
    state.moments["r"] = {0: None}
    state.configure({"policy": "qada", "tau": 0.8})
    assert "r" in state.moments  # same bulk range: moments still valid
    state.configure({"policy": "qada", "t_local": 256})
    assert not state.moments
    with pytest.raises(ValueError, match="static_heads"):
        state.configure({"policy": "static"})
    with pytest.raises(ValueError, match="tau"):
        state.configure({"tau": 1.5})
    assert state.policy.t_local == 256  # a rejected configuration changes nothing
    path = tmp_path / "heads.json"
    path.write_text(json.dumps({"num_layers": 2, "num_heads": 3, "long_heads": [[1, 2]]}))
    state.configure({"policy": "static", "static_heads": str(path)})
    assert state.static_heads.tolist() == [[False] * 3, [False, False, True]]
