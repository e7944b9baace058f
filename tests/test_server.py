"""OpenAI-compatible HTTP API of `qada serve`: real engine, real model, real client, loopback."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from serving.testing import API_KEY, SERVED_NAME

GREEDY = dict(temperature=0.0, seed=0)


def test_chat_answers_a_factual_question(client):
    reply = client.chat.completions.create(
        model=SERVED_NAME,
        max_tokens=24,
        **GREEDY,
        messages=[
            {"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
    )
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.completion_tokens <= 24


def test_completion_continues_greedily(client):
    reply = client.completions.create(
        model=SERVED_NAME, prompt="The capital of France is", max_tokens=8, **GREEDY
    )
    assert reply.choices[0].text.strip().startswith("Paris")
    again = client.completions.create(
        model=SERVED_NAME, prompt="The capital of France is", max_tokens=8, **GREEDY
    )
    assert again.choices[0].text == reply.choices[0].text  # greedy is deterministic


def test_streaming_yields_chunks_and_final_usage(client):
    stream = client.chat.completions.create(
        model=SERVED_NAME,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Count from one to ten."}],
        **GREEDY,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) > 1 and text
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    assert usage.completion_tokens == 16 and usage.total_tokens == usage.prompt_tokens + 16


def test_models_lists_served_name_and_max_length(client):
    models = client.models.list().data
    assert [m.id for m in models] == [SERVED_NAME]
    assert models[0].max_model_len == 8192


def test_health_and_metrics_need_no_key(server):
    assert httpx.get(server.url + "/health").status_code == 200
    metrics = httpx.get(server.url + "/metrics").text
    assert "vllm:generation_tokens_total" in metrics


def test_qada_routes_report_stock_attention(server):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    for route in ("/v1/qada/policy", "/v1/qada/stats"):
        reply = httpx.get(server.url + route, headers=auth)
        assert reply.status_code == 200 and reply.json() == {"enabled": False}
    reply = httpx.put(server.url + "/v1/qada/policy", headers=auth, json={"policy": "local"})
    assert "not enabled" in _assert_openai_error(reply, 409)


def _assert_openai_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and error["type"]
    return error["message"]


def _still_serves(client) -> None:
    reply = client.completions.create(model=SERVED_NAME, prompt="1, 2, 3,", max_tokens=4, **GREEDY)
    assert reply.choices[0].text


def test_prompt_longer_than_context_is_rejected(client, server):
    prompt = "hello " * 9000  # > 8192 tokens
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=4)
    assert "context" in info.value.message.lower() or "length" in info.value.message.lower()
    _still_serves(client)


def test_unknown_model_is_404(client, server):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(
            model="no-such-model", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )
    assert "no-such-model" in info.value.message
    raw = httpx.post(
        server.url + "/v1/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": "no-such-model", "prompt": "hi"},
    )
    _assert_openai_error(raw, 404)
    _still_serves(client)


def test_malformed_json_is_400(client, server):
    raw = httpx.post(
        server.url + "/v1/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    assert "json" in _assert_openai_error(raw, 400).lower()
    _still_serves(client)


def test_wrong_api_key_is_401(client, server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    raw = httpx.post(
        server.url + "/v1/completions",
        headers={"Authorization": "Bearer sk-wrong"},
        json={"model": SERVED_NAME, "prompt": "hi"},
    )
    _assert_openai_error(raw, 401)
    _still_serves(client)


def test_eight_concurrent_requests_complete(server):
    async def run() -> list:
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
        prompts = [f"Write a sentence about the number {i}." for i in range(8)]
        return await asyncio.gather(
            *(
                aclient.chat.completions.create(
                    model=SERVED_NAME, max_tokens=16, **GREEDY, messages=[{"role": "user", "content": p}]
                )
                for p in prompts
            )
        )

    replies = asyncio.run(run())
    assert len(replies) == 8
    for reply in replies:
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.choices[0].message.content


def test_vllm_serving_benchmark_runs_against_the_server(server, model_path):
    """`qada bench serve`: vLLM's own benchmark, unchanged, against our server and key."""
    from serving.bench import bench_serve

    args = ["--dataset-name", "random", "--random-input-len", "32", "--random-output-len", "4"]
    result = bench_serve(server.url, API_KEY, model_path, [*args, "--num-prompts", "2", "--ignore-eos"])
    assert result["completed"] == 2 and result["total_output_tokens"] == 8
    assert result["mean_tpot_ms"] > 0 and result["mean_itl_ms"] > 0
