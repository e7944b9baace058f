"""The worker's side of QAdA: the launch settings applied at init_device, policy changes
validated and swapped in whole between steps, the step context set for exactly one step (even
one that fails), each step's decisions counted once, and finished requests' moments freed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from attention_backend.context import LayerDecisions, get_step_context
from attention_backend.settings import QadaSettings
from attention_backend.testing.batches import BatchSpec, stand_in_runner
from attention_backend.worker import QadaWorkerMixin


class StandInWorker:
    """What the mixin uses of vLLM's worker: its config, device, model runner and execute_model,
    which here runs one "layer" that records decisions for the batch's rows."""

    def __init__(self, additional_config: dict) -> None:
        text = SimpleNamespace(num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1)
        model = SimpleNamespace(hf_text_config=text, max_model_len=4096, get_head_size=lambda: 64)
        self.vllm_config = SimpleNamespace(
            additional_config=additional_config,
            cache_config=SimpleNamespace(block_size=128),
            parallel_config=SimpleNamespace(pipeline_parallel_size=1),
            model_config=model,
        )
        self.model_runner = stand_in_runner(BatchSpec(seq_lens=[500, 300], query_lens=[1, 1]))
        self.seen_context = None

    def init_device(self) -> None:
        self.device = torch.device("cpu")

    def execute_model(self, scheduler_output, fail: bool = False):
        ctx = self.seen_context = get_step_context()
        assert ctx is not None
        req_ids = ctx.batch_req_ids(2)
        long_heads = torch.tensor([[True, False, False], [False, False, False]])
        ctx.decisions.append(
            LayerDecisions(
                0,
                req_ids,
                torch.tensor([500, 300]),
                long_heads,
                long_heads.any(1, keepdim=True),
                token_bytes=512,
            )
        )
        if fail:
            raise RuntimeError("the step failed")
        return "output"


class Worker(QadaWorkerMixin, StandInWorker):
    pass


def scheduled(finished=()):
    return SimpleNamespace(finished_req_ids=set(finished), preempted_req_ids=None)


def test_launch_settings_are_applied_at_init_device():
    worker = Worker({"qada": {"policy": "local", "t_local": 64}})
    worker.init_device()
    assert worker.qada_settings()["policy"] == "local" and worker.qada_settings()["t_local"] == 64


def test_policy_changes_are_validated_and_swapped_whole():
    worker = Worker({"qada": {"tau": 0.7}})
    worker.init_device()
    before = worker.qada_settings()
    for bad, files, needle in (
        ({"tau": 1.5}, {}, "tau"),
        ({"policy": "static"}, {}, "static_heads"),
        ({"policy": "static"}, {"static_heads": [[2, 0]]}, "2 layers"),  # not a layer of the model
        ({"policy": "qada", "stats": "calib"}, {"calib": b"junk"}, "safetensors"),
        ({"surprise": 1}, {}, "surprise"),
        ({"t_sink": 4000, "t_local": 96}, {}, "max_model_len"),
        ({"page_chunk": 16}, {}, "page_chunk"),  # finer than the launch page size (32): never summarised
        ({"page_chunk": 96}, {}, "page_chunk"),  # does not divide the 128-token block
    ):
        reply = worker.qada_prepare(bad, files, "token")
        assert needle in reply["error"] and "\n" not in reply["error"]
        assert "error" in worker.qada_commit("token")  # nothing was prepared
        assert worker.qada_settings() == before  # a rejected change changes nothing
    prepared = worker.qada_prepare(
        {"policy": "static", "static_heads": "heads.json"}, {"static_heads": [[1, 2]]}, "t1"
    )
    assert "error" not in prepared and worker.qada_settings() == before  # not in force before the commit
    assert "error" in worker.qada_commit("t0")  # another change's token commits nothing
    worker.qada_prepare({"policy": "static", "static_heads": "heads.json"}, {"static_heads": [[1, 2]]}, "t1")
    applied = worker.qada_commit("t1")
    assert applied["policy"] == "static" and applied["tau"] == QadaSettings().tau  # the rest: defaults (PUT)
    worker.execute_model(scheduled())
    policy = worker.seen_context.policy
    assert policy.static_heads.tolist() == [[False] * 3, [False, False, True]]
    assert policy.layer_inputs(1, 4, 3, torch.device("cpu")).long_mask.tolist() == [False, False, True]


def test_each_step_gets_its_own_context_and_is_counted_once():
    worker = Worker({"qada": {}})
    worker.init_device()
    assert worker.execute_model(scheduled()) == "output"
    assert get_step_context() is None  # reset when the step ends
    with pytest.raises(RuntimeError, match="the step failed"):
        worker.execute_model(scheduled(), fail=True)
    assert get_step_context() is None  # also when it fails
    counts = worker.qada_counters()
    assert counts["layers"][0]["rows"] == 4 and counts["layers"][0]["long_heads"] == 2
    assert worker._qada_requests.decisions["req-0"].decode_steps == 2  # both steps, once each


def test_finished_requests_free_their_moments():
    worker = Worker({"qada": {}})
    worker.init_device()
    store = worker._qada_moments
    store.plan(["req-0", "req-1"], torch.zeros(2, 8, dtype=torch.int32), [500, 300], (16, 128), 128)
    worker.execute_model(scheduled(finished=["req-0"]))
    assert "req-0" not in store and "req-1" in store


class Engine:
    """vLLM's `collective_rpc` over these workers (the ranks of one engine), in rank order."""

    def __init__(self, workers) -> None:
        self.workers = workers

    async def collective_rpc(self, method, args=()):
        return [getattr(worker, method)(*args) for worker in self.workers]


def test_a_policy_change_is_in_force_on_every_rank_or_on_none():
    import asyncio

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from attention_backend.ranks import RankShare
    from serving.endpoints import router

    workers = [Worker({"qada": {"tau": 0.7}}) for _ in range(3)]
    for rank, worker in enumerate(workers):
        worker.init_device()
        worker._qada_share = RankShare.of(worker._qada_shape, rank, 3)  # tensor parallel 3
    app = FastAPI()
    app.include_router(router)
    app.state.qada_enabled, app.state.qada_engine = True, Engine(workers)
    app.state.qada_shape, app.state.qada_files_dir = workers[0]._qada_shape, None
    app.state.qada_policy_lock = asyncio.Lock()
    http = TestClient(app)

    def taus():
        return [worker.qada_settings()["tau"] for worker in workers]

    assert http.patch("/v1/qada/policy", json={"tau": 0.5}).json()["tau"] == 0.5
    assert taus() == [0.5] * 3

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("not enough device memory on this rank")

    workers[1]._load = out_of_memory  # one rank cannot build the new policy
    reply = http.patch("/v1/qada/policy", json={"tau": 0.6})
    assert (
        reply.status_code == 400
        and "not enough device memory on this rank" in reply.json()["error"]["message"]
    )
    assert taus() == [0.5] * 3  # the ranks that could build it did not put it in force
    assert http.get("/v1/qada/policy").json()["tau"] == 0.5
