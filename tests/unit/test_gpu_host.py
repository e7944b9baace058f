"""The GPU backend's host logic run on CPU: vLLM's Triton builder and impl classes as the engine
drives them, step after step, with the kernel calls (ours and vLLM's Triton kernel) replaced by
recorders; the key moments our kernel is given are checked against moments recomputed from the
cache."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

vllm = pytest.importorskip("vllm")
from vllm.config import set_current_vllm_config
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl
from vllm.v1.kv_cache_interface import FullAttentionSpec

from attention_backend import gpu_backend
from attention_backend.context import reset_step_context, set_step_context
from attention_backend.moments import MomentStore
from attention_backend.policy import DecodeResult
from attention_backend.testing.batches import BatchSpec, common_metadata, step_context

HQ, HKV, D, BS, LAYER = 9, 3, 64, 16, 0
NUM_BLOCKS = 200


@pytest.fixture(scope="module")
def vllm_config(model_path):
    return EngineArgs(model=str(model_path), dtype="float32").create_engine_config()


class GpuHost:
    """One layer of the GPU backend on CPU tensors, over a paged NHD cache holding random keys for
    every position a request will reach."""

    def __init__(self, vllm_config, monkeypatch) -> None:
        spec = FullAttentionSpec(block_size=BS, num_kv_heads=HKV, head_size=D, dtype=torch.float32)
        with set_current_vllm_config(vllm_config):
            self.builder = gpu_backend.QadaTritonMetadataBuilder(
                spec, [f"model.layers.{LAYER}.self_attn.attn"], vllm_config, torch.device("cpu")
            )
            self.impl = gpu_backend.QadaTritonImpl(HQ, D, D**-0.5, HKV, None, None, "auto")
        gen = torch.Generator().manual_seed(0)
        physical = torch.randn(NUM_BLOCKS, BS, HKV, 2 * D, generator=gen) + 0.5
        self.kv_cache = physical.transpose(1, 2)  # vLLM's logical shape, NHD strides
        self.key_cache = physical[..., :D]
        self.tables: dict[str, torch.Tensor] = {}
        self.free = list(torch.randperm(NUM_BLOCKS, generator=gen).tolist())
        self.layer = SimpleNamespace(layer_name=f"model.layers.{LAYER}.self_attn.attn")
        self.seen: list[tuple] = []  # (req ids, seq lens, moments, settings) our kernel was given
        self.stock_steps = 0
        monkeypatch.setattr(gpu_backend, "qada_decode", self._kernel)
        monkeypatch.setattr(TritonAttentionImpl, "forward", self._stock_kernel)
        self.moments = MomentStore()  # the worker's, across steps
        self.settings: dict = {}
        self._step_req_ids: list[str] = []

    def _kernel(self, decode, settings, inputs):
        if inputs.moments is not None:
            n, s1, s2, _ = inputs.moments.per_row()
            record = (
                list(self._step_req_ids),
                decode.seq_lens.tolist(),
                (n, s1.clone(), s2.clone()),
                settings,
            )
            self.seen.append(record)
        batch = decode.query.shape[0]
        long_heads = torch.zeros(batch, HQ, dtype=torch.bool)
        return DecodeResult(
            torch.zeros_like(decode.query), long_heads, torch.zeros(batch, HKV, dtype=torch.bool)
        )

    def _stock_kernel(self, *args, **kwargs):
        self.stock_steps += 1

    def configure(self, **settings) -> None:
        self.settings = {"policy": "qada", "stats": "prompt", "t_sink": 4, "t_local": 32, **settings}

    def forget(self, req_ids: list[str]) -> None:
        self.moments.forget(req_ids)  # what the worker does for finished and preempted requests

    def step(self, rows: dict[str, int]) -> None:
        """One decode step: each request decodes its token at position length - 1."""
        req_ids = list(rows)
        for r in req_ids:
            if r not in self.tables:
                self.tables[r] = torch.tensor([self.free.pop() for _ in range(40)], dtype=torch.int32)
        batch = len(req_ids)
        spec = BatchSpec(seq_lens=[rows[r] for r in req_ids], query_lens=[1] * batch, req_ids=req_ids)
        cm = common_metadata(spec, torch.stack([self.tables[r] for r in req_ids]), BS)
        self._step_req_ids = req_ids
        set_step_context(step_context(spec, self.settings, self.moments))
        try:
            meta = self.builder.build(0, cm)
            query = torch.randn(batch, HQ, D)
            output = torch.empty(batch, HQ, D)
            self.impl.forward(self.layer, query, query[:, :HKV], query[:, :HKV], self.kv_cache, meta, output)
        finally:
            reset_step_context()

    def expected_moments(self, req_id: str, seq_len: int, t_sink: int, t_local: int):
        pos = torch.arange(t_sink, max(t_sink, seq_len - t_local))
        table = self.tables[req_id]
        keys = self.key_cache[table[pos // BS].long(), pos % BS]  # [n, Hkv, D]
        return len(pos), keys.sum(0), torch.einsum("nhd,nhe->hde", keys, keys)

    def assert_last_moments_exact(self) -> None:
        req_ids, seq_lens, (n, s1, s2), settings = self.seen[-1]
        for i, (r, length) in enumerate(zip(req_ids, seq_lens)):
            want_n, want_s1, want_s2 = self.expected_moments(r, length, settings.t_sink, settings.t_local)
            assert int(n[i]) == want_n, f"{r}: n {int(n[i])} != {want_n}"
            torch.testing.assert_close(s1[i], want_s1, rtol=1e-4, atol=1e-3, msg=f"{r}: S1 is stale")
            torch.testing.assert_close(s2[i], want_s2, rtol=1e-4, atol=1e-2, msg=f"{r}: S2 is stale")


@pytest.fixture
def host(vllm_config, monkeypatch):
    return GpuHost(vllm_config, monkeypatch)


def test_moments_stay_exact_across_a_policy_switch(host):
    """qada -> full -> qada: the rows were not advanced during the full steps."""
    host.configure()
    lengths = {"a": 300, "b": 120}
    for _ in range(3):
        host.step(lengths)
        host.assert_last_moments_exact()
        lengths = {r: n + 1 for r, n in lengths.items()}
    host.configure(policy="full")
    for _ in range(4):
        host.step(lengths)
        lengths = {r: n + 1 for r, n in lengths.items()}
    assert host.stock_steps == 4  # full reads everything on vLLM's kernel
    host.configure()
    host.step(lengths)
    host.assert_last_moments_exact()


def test_moments_stay_exact_when_the_window_changes(host):
    host.configure()
    lengths = {"a": 300, "b": 200}
    for t_local in (32, 32, 64, 64, 16):
        host.configure(t_local=t_local)
        host.step(lengths)
        host.assert_last_moments_exact()
        lengths = {r: n + 1 for r, n in lengths.items()}


def test_moments_stay_exact_as_rows_finish_and_return(host):
    """b skips a step (a prefill chunk elsewhere, or not scheduled) and comes back; a finishes and
    c takes the freed row."""
    host.configure()
    host.step({"a": 300, "b": 200})
    host.step({"a": 301})
    host.assert_last_moments_exact()
    host.step({"a": 302, "b": 202})
    host.assert_last_moments_exact()
    host.forget(["a"])
    host.step({"c": 150, "b": 203})
    host.assert_last_moments_exact()
    host.step({"c": 151, "b": 204})
    host.assert_last_moments_exact()
