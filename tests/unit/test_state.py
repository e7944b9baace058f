"""Worker state: policy (re)configuration; moments dropped when the window changes or a request
ends (the MomentStore itself is tested in test_moments.py)."""

from __future__ import annotations

import json

import pytest
import torch

from attention_backend.policy import PolicyConfig
from attention_backend.state import WorkerState
from paged_helpers import make_case


def test_configure_validates_and_resets_moments_when_the_window_changes(tmp_path):
    state = WorkerState()
    state.configure({"policy": "qada", "tau": 0.7})
    assert state.policy == PolicyConfig(policy="qada", tau=0.7)
    case = make_case([300], num_kv_heads=3, group=3, block_size=128, dtype=torch.float32)
    state.moments.read(0, case.key_cache, state.moments.plan(["r"], case.block_table, [300], 16, 128, 128))
    state.configure({"policy": "qada", "tau": 0.8})
    assert "r" in state.moments  # same bulk range: moments still valid
    state.configure({"policy": "qada", "t_local": 256})
    assert "r" not in state.moments and not state.moments.layers
    with pytest.raises(ValueError, match="static_heads"):
        state.configure({"policy": "static"})
    with pytest.raises(ValueError, match="tau"):
        state.configure({"tau": 1.5})
    assert state.policy.t_local == 256  # a rejected configuration changes nothing
    path = tmp_path / "heads.json"
    path.write_text(json.dumps({"num_layers": 2, "num_heads": 3, "long_heads": [[1, 2]]}))
    state.configure({"policy": "static", "static_heads": str(path)})
    assert state.static_heads.tolist() == [[False] * 3, [False, False, True]]


def test_forget_frees_slots():
    state = WorkerState()
    case = make_case([300, 400], num_kv_heads=3, group=3, block_size=128, dtype=torch.float32)
    state.moments.plan(["a", "b"], case.block_table, [300, 400], 16, 128, 128)
    state.forget(["a"])
    assert "a" not in state.moments and "b" in state.moments


def test_request_ids_come_from_the_v1_runner_batch_or_fail_clearly():
    from types import SimpleNamespace

    state = WorkerState()
    with pytest.raises(RuntimeError, match="--worker-cls"):
        state.request_ids(1)
    state.runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=["a", "b", "c"]))
    assert state.request_ids(2) == ["a", "b"]
    state.runner = SimpleNamespace()  # vLLM's V2 runner keeps no persistent batch
    with pytest.raises(RuntimeError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        state.request_ids(1)
