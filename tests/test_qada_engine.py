"""QAdA backend inside the real vLLM engine (CPU), real SmolLM2, over HTTP.

The stock server (`server`) is the reference; the QAdA server switches policies at run time.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from evaluation.haystack import haystack_text, passkey_prompt
from serving.config import load_config
from serving.testing import API_KEY, REPO, SERVED_NAME, greedy_at_once

AUTH = {"Authorization": f"Bearer {API_KEY}"}
SHIPPED = load_config(REPO / "configs" / "smollm2-cpu-qada.yaml").attention.settings().model_dump()
# what the tests vary: the shipped settings with the head decision alone (no page selection)
DEFAULTS = {**SHIPPED, "page_budget": 0.0, "page_rank_bits": 0}


def set_policy(server, **settings) -> dict:
    reply = httpx.put(server.url + "/v1/qada/policy", headers=AUTH, json={**DEFAULTS, **settings})
    assert reply.status_code == 200, reply.text
    return reply.json()


def stats(server) -> dict:
    return httpx.get(server.url + "/v1/qada/stats", headers=AUTH).json()


def greedy(
    client, prompt: str, max_tokens: int, ignore_eos: bool = True, stats: bool = False, cache_salt=None
):
    """A temperature-0 completion (all `max_tokens` generated unless `ignore_eos` is off); with
    `stats`, its usage carries `qada`; `cache_salt` separates prefix-cache entries."""
    return client.completions.create(
        model=SERVED_NAME,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": ignore_eos, **({"cache_salt": cache_salt} if cache_salt else {})},
        extra_headers={"X-QAdA-Stats": "1"} if stats else None,
    )


def greedy_texts(server, prompts: list[str], max_tokens: int) -> list[str]:
    """All prompts at once, so the engine runs mixed prefill/decode batches."""
    replies = asyncio.run(greedy_at_once(server.url, prompts, max_tokens, ignore_eos=False))
    return [r.choices[0].text for r in replies]


@pytest.fixture(scope="module")
def haystack(model_path):
    return AutoTokenizer.from_pretrained(model_path), haystack_text()


def test_full_policy_is_token_identical_to_stock(server, qada_server, haystack):
    tokenizer, text = haystack
    prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "1, 2, 3, 4,",
        "Once upon a time, in a small village,",
        text[:1500],
        text[5000:9000],  # ~350 and ~900 tokens: chunked with the decodes
        passkey_prompt(tokenizer, 1200, 0.3, "40713", text),
    ]
    set_policy(qada_server, policy="full")
    before = stats(qada_server)
    ours = greedy_texts(qada_server, prompts, 24)
    assert ours == greedy_texts(server, prompts, 24)
    after = stats(qada_server)
    # Decode rows went through our path, and policy full skipped nothing (rows shorter than
    # sinks + window count as local: they have no bulk to read).
    assert after["kv_group_decisions"]["long"] > before["kv_group_decisions"]["long"]
    assert after["kv_bytes"]["skipped"] == before["kv_bytes"]["skipped"]
    assert after["kv_bytes"]["read"] > before["kv_bytes"]["read"]


@pytest.mark.parametrize("context, depth, passkey", [(4000, 0.5, "71432"), (7000, 0.2, "30917")])
def test_qada_retrieves_passkey_at_the_shipped_default_skipping_groups(
    qada_server, qada_client, haystack, context, depth, passkey
):
    tokenizer, text = haystack
    set_policy(qada_server)  # the shipped defaults
    before = stats(qada_server)
    reply = greedy(qada_client, passkey_prompt(tokenizer, context, depth, passkey, text), 8, ignore_eos=False)
    after = stats(qada_server)
    delta = {
        level: {k: after[level][k] - before[level][k] for k in ("long", "local")}
        for level in ("kv_group_decisions", "head_decisions")
    }
    group_local = delta["kv_group_decisions"]["local"] / sum(delta["kv_group_decisions"].values())
    head_local = delta["head_decisions"]["local"] / sum(delta["head_decisions"].values())
    print(
        f"\npasskey @ {context} tokens, depth {depth}: answer {reply.choices[0].text!r}; "
        f"local fraction: KV groups {group_local:.3f}, query heads {head_local:.3f} "
        f"(tau {DEFAULTS['tau']}, T_local {DEFAULTS['t_local']})"
    )
    assert passkey in reply.choices[0].text
    assert group_local > 0.2  # measured: see the printout (tau 0.3 keeps accuracy, not sparsity)


def test_counters_are_exact(qada_server, qada_client):
    set_policy(qada_server, policy="random", random_fraction=0.5, seed=1, min_bulk=0)
    before = stats(qada_server)
    reply = greedy(qada_client, "Tell me a story. " * 60, 12)
    after = stats(qada_server)
    decode_steps = reply.usage.completion_tokens - 1  # the first token comes from the prefill
    layers, heads, groups = len(after["layers"]), after["num_heads"], after["num_kv_heads"]
    assert (layers, heads, groups) == (30, 9, 3)
    for level, per_row in (("head_decisions", heads), ("kv_group_decisions", groups)):
        counted = sum(after[level].values()) - sum(before[level].values())
        assert counted == decode_steps * layers * per_row
    for layer, counts in after["layers"].items():
        assert counts["rows"] - before["layers"].get(layer, {"rows": 0})["rows"] == decode_steps
    long = after["head_decisions"]["long"] - before["head_decisions"]["long"]
    assert 0.3 < long / (decode_steps * layers * heads) < 0.7  # random at 0.5


@pytest.mark.parametrize(
    "policy, settings, expect_long",
    [
        ("local", {}, 0.0),
        ("full", {}, 1.0),
        ("oracle", {"observe": True}, None),
        ("qada", {"stats": "local", "observe": True}, None),
        ("qada", {"stats": "pages", "observe": True}, None),
        ("static", {}, None),
        ("qada", {"min_bulk": 10_000}, 1.0),  # less bulk than that in the step: read in full
    ],
)
def test_every_policy_serves(
    qada_server, qada_client, qada_files_dir, haystack, policy, settings, expect_long
):
    if policy == "static":  # layer 1 (all heads) and head 0 of every layer are long
        heads = [[1, h] for h in range(9)] + [[layer, 0] for layer in range(30)]
        (qada_files_dir / "heads.json").write_text(json.dumps({"long_heads": heads}))
        settings = {"static_heads": "heads.json"}  # by name, in the server's files_dir
    set_policy(qada_server, policy=policy, **{"min_bulk": 0, **settings})  # decide on this short prompt
    before = stats(qada_server)
    _, text = haystack
    reply = greedy(qada_client, text[:2000] + "\n\nIn short,", 6, stats=True)
    after = stats(qada_server)
    long = after["head_decisions"]["long"] - before["head_decisions"]["long"]
    total = long + after["head_decisions"]["local"] - before["head_decisions"]["local"]
    assert total == 5 * 30 * 9  # 5 decode steps x layers x heads
    if expect_long is not None:
        assert long == expect_long * total
    if policy == "static":
        assert long == 5 * (9 + 29)  # 5 decode steps x the 38 heads in the file
    if settings.get("observe"):  # against the exact decisions, observed on the same queries
        oracle = reply.model_dump()["usage"]["qada"]["oracle"]["head_decisions"]
        print(f"\n{policy} {settings}: {long}/{total} heads long; oracle {oracle}")
        assert oracle["long"] - oracle["missed"] + oracle["extra"] == long  # every decision observed
        if policy == "oracle":  # the decode path's oracle is the exact one
            assert oracle["missed"] == oracle["extra"] == 0


@pytest.mark.parametrize("stats", ["prompt", "local", "pages"])
def test_qada_thresholds_nest_on_the_same_query(qada_server, qada_client, haystack, stats):
    """The first decode step of a prompt sees the same query and keys under any policy (prefill is
    exact): there, the heads qada sends long at a high tau are a subset of those at a low tau, and
    fewer: its estimate is one number per head, thresholded."""
    _, text = haystack
    first_step = {}
    for tau in (0.2, 0.95):
        set_policy(qada_server, policy="qada", stats=stats, tau=tau, min_bulk=0)
        reply = greedy(qada_client, text[3000:6000] + "\n\nIn short,", 2, stats=True)
        trace = httpx.get(f"{qada_server.url}/v1/qada/requests/{reply.id}/decisions", headers=AUTH).json()
        first_step[tau] = torch.tensor(trace["long"][0], dtype=torch.bool)  # [layers, heads]
    low, high = first_step[0.2], first_step[0.95]
    counts = f"{int(low.sum())} / {int(high.sum())}"
    print(f"\nqada/{stats}, first decode step, heads long at tau 0.2 / 0.95: {counts}")
    assert not (high & ~low).any() and high.sum() < low.sum()


def test_page_decisions_do_not_depend_on_who_wrote_the_blocks(qada_server, qada_client, haystack):
    """qada/pages reads summaries indexed by physical block: a prompt prefilled cold, then served
    from the prefix cache (blocks written by the first request), then cold again under another
    cache salt (new blocks), decides every head of every step the same way."""
    _, text = haystack
    set_policy(qada_server, policy="qada", stats="pages", tau=0.3, min_bulk=0)
    prompt = text[8000:17000] + "\n\nIn short,"
    traces = []
    for salt in ("a", "a", "b"):
        reply = greedy(qada_client, prompt, 4, stats=True, cache_salt=salt)
        trace = httpx.get(f"{qada_server.url}/v1/qada/requests/{reply.id}/decisions", headers=AUTH).json()
        traces.append((reply.choices[0].text, torch.tensor(trace["long"], dtype=torch.bool)))
    assert reply.usage.prompt_tokens > 2000
    (text_a, cold), (text_cached, cached), (text_b, cold_again) = traces
    assert text_a == text_cached == text_b
    assert cold.any() and not cold.all()  # the policy decides both ways here
    assert torch.equal(cold, cached) and torch.equal(cold, cold_again)


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"policy": "magic"}, "policy"),
        ({"tau": 2}, "tau"),
        ({"t_local": 0}, "t_local"),
        ({"surprise": 1}, "surprise"),
        ({"policy": "static"}, "static_heads"),
        ({"policy": "static", "static_heads": "/nonexistent.json"}, "nonexistent"),
        ({"page_chunk": 16}, "page_chunk"),  # finer than the pages summarised since launch
        ({"page_top_k": 4, "page_rank_bits": 2}, "page_rank_bits"),  # the server keeps a 4-bit copy
    ],
)
def test_bad_policy_is_a_clear_400_and_changes_nothing(qada_server, qada_client, body, needle):
    current = set_policy(qada_server, policy="qada")
    reply = httpx.put(qada_server.url + "/v1/qada/policy", headers=AUTH, json=body)
    assert reply.status_code == 400 and needle in reply.json()["error"]["message"]
    assert httpx.get(qada_server.url + "/v1/qada/policy", headers=AUTH).json() == current
    assert qada_client.completions.create(model=SERVED_NAME, prompt="Hi", max_tokens=2).choices


def scrape(server) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict, name: str, **labels) -> float:
    return sum(
        v
        for (n, ls), v in samples.items()
        if n == name and all(dict(ls).get(k) == want for k, want in labels.items())
    )


def test_prometheus_metrics_count_every_decision_exactly(qada_server, qada_client):
    set_policy(qada_server, policy="qada")
    before = scrape(qada_server)
    reply = greedy(qada_client, "Write about the sea. " * 40, 10)
    after = scrape(qada_server)
    steps, prompt = reply.usage.completion_tokens - 1, reply.usage.prompt_tokens
    delta = lambda name, **labels: total(after, name, **labels) - total(before, name, **labels)
    assert delta("qada_head_decisions_total", level="head") == steps * 30 * 9
    assert delta("qada_head_decisions_total", level="kv_group") == steps * 30 * 3
    assert len({dict(ls)["layer"] for (n, ls) in after if n == "qada_head_decisions_total"}) == 30
    # fp32 K+V of one token of one KV head: 2 * 64 * 4 bytes; the sequence grows by one per step
    context = sum(prompt + i for i in range(1, steps + 1))
    assert delta("qada_kv_bytes_read_total") + delta("qada_kv_bytes_skipped_total") == context * 30 * 3 * 512
    assert delta("qada_long_context_fraction_count") == steps  # one observation per engine step
    assert total(after, "qada_policy_info", policy="qada", tau=str(DEFAULTS["tau"])) == 1
    assert total(after, "vllm:generation_tokens_total") > 0  # vLLM's own metrics still served


def test_page_selection_reads_the_selected_blocks_and_counts_them(qada_server, qada_client, haystack):
    """The oracle's exact block masses, top 4 bulk blocks per long group: the passkey is found
    with a fraction of the head decision's reads, and bytes and blocks are counted alike in
    usage, /v1/qada/stats and /metrics."""
    tokenizer, text = haystack
    prompt = passkey_prompt(tokenizer, 4000, 0.5, "71432", text)  # prefix-cached by the test above
    runs = {}
    for name, selection in (("heads", {}), ("pages", {"page_top_k": 4})):
        set_policy(qada_server, policy="oracle", min_bulk=0, **selection)
        before, metrics_before = stats(qada_server), scrape(qada_server)
        reply = greedy(qada_client, prompt, 8, ignore_eos=False, stats=True)
        after, metrics_after = stats(qada_server), scrape(qada_server)
        usage = reply.model_dump()["usage"]
        steps, context = usage["completion_tokens"] - 1, usage["prompt_tokens"]
        kv = usage["qada"]["kv_bytes"]
        assert kv["read"] + kv["skipped"] == sum(context + i for i in range(1, steps + 1)) * 30 * 3 * 512
        assert kv == {k: after["kv_bytes"][k] - before["kv_bytes"][k] for k in kv}
        blocks = {
            k: after["kv_blocks_of_long_groups"][k] - before["kv_blocks_of_long_groups"][k]
            for k in ("read", "skipped")
        }
        for decision in ("read", "skipped"):
            counted = total(metrics_after, "qada_kv_blocks_total", decision=decision)
            assert (
                counted - total(metrics_before, "qada_kv_blocks_total", decision=decision) == blocks[decision]
            )
        runs[name] = reply.choices[0].text, kv, blocks, usage["qada"]["kv_group_decisions"]["long"]
    (head_text, head_kv, head_blocks, _), (text_, kv, blocks, long) = runs["heads"], runs["pages"]
    assert "71432" in head_text and "71432" in text_
    assert head_blocks == {"read": 0, "skipped": 0}  # no page selection, no block counts
    # each long group: the sink block, one or two window blocks, and the 4 selected
    assert 6 * long <= blocks["read"] <= 7 * long and blocks["skipped"] > 3 * blocks["read"]
    print(f"\npage selection: KV bytes read {kv['read'] / head_kv['read']:.3f} of the head decision's")
    assert kv["read"] < 0.4 * head_kv["read"]
    # rank layers (2, 15): each reads everything and chooses its row's blocks for the layers after
    # it; the layers before the first read every block of their long groups
    set_policy(qada_server, policy="qada", page_top_k=4, page_rank_layers=[2, 15], min_bulk=0)
    before = stats(qada_server)
    reply = greedy(qada_client, prompt, 8, ignore_eos=False, stats=True)
    after = stats(qada_server)
    layer = {
        n: {
            k: after["layers"][str(n)][k] - before["layers"].get(str(n), {}).get(k, 0)
            for k in after["layers"][str(n)]
        }
        for n in range(30)
    }
    steps = reply.usage.completion_tokens - 1
    print(f"rank layers 2, 15, top-4: {reply.choices[0].text!r}")
    for n in (2, 15):
        assert layer[n]["rows"] == steps and layer[n]["long_groups"] == 3 * steps
        assert layer[n]["kv_bytes_skipped"] == 0 and layer[n]["kv_blocks_skipped"] == 0
    assert all(layer[n]["kv_blocks_skipped"] == 0 for n in (0, 1))
    for n in (*range(3, 15), *range(16, 30)):  # a long group reads its sink, window and 4 blocks
        assert layer[n]["kv_blocks_read"] <= 7 * layer[n]["long_groups"]
        assert layer[n]["kv_blocks_skipped"] >= 25 * layer[n]["long_groups"]  # of 32 or 33
    # ranked by the 4-bit key copy (kept since launch): every layer's long groups read their sink,
    # window and 4 blocks of the cache, and the copy of their whole context (48 bytes a token: 32
    # of codes, 16 of the 32-token chunks' fp32 min / max), counted apart
    set_policy(qada_server, policy="qada", page_top_k=4, page_rank_bits=4, min_bulk=0)
    before = stats(qada_server)
    reply = greedy(qada_client, prompt, 8, ignore_eos=False, stats=True)
    after = stats(qada_server)
    print(f"key copy, top-4: {reply.choices[0].text!r}")
    assert "71432" in reply.choices[0].text
    usage = reply.model_dump()["usage"]
    steps, context = usage["completion_tokens"] - 1, usage["prompt_tokens"]
    lengths = [context + i for i in range(1, steps + 1)]
    for n in range(30):
        now, then = after["layers"][str(n)], before["layers"].get(str(n), {})
        got = {k: now[k] - then.get(k, 0) for k in now}
        long, local = got["long_groups"], 3 * steps - got["long_groups"]
        assert got["kv_blocks_read"] <= 7 * long and got["kv_blocks_skipped"] >= 25 * long
        # a long group's blocks are whole but its last (1 to 128 tokens); a local group reads 144
        blocks = got["kv_blocks_read"] * 128 * 512 + local * 144 * 512
        assert blocks - long * 127 * 512 <= got["kv_bytes_read"] <= blocks, n
        assert long * min(lengths) * 48 <= got["key_copy_bytes_read"] <= long * max(lengths) * 48, n
    kv = usage["qada"]["kv_bytes"]
    assert kv["read"] + kv["skipped"] == sum(lengths) * 30 * 3 * 512
    assert kv["key_copy_read"] == after["kv_bytes"]["key_copy_read"] - before["kv_bytes"]["key_copy_read"] > 0
    assert kv["read"] + kv["key_copy_read"] < 0.45 * head_kv["read"]
    # the shipped default (top-p 10% by the same copy): the passkey, at a fraction of the bytes
    set_policy(qada_server, **SHIPPED)
    reply = greedy(qada_client, prompt, 8, ignore_eos=False, stats=True)
    print(f"shipped default: {reply.choices[0].text!r}")
    kv = reply.model_dump()["usage"]["qada"]["kv_bytes"]
    assert "71432" in reply.choices[0].text and kv["key_copy_read"] > 0
    assert kv["read"] + kv["key_copy_read"] < 0.6 * (kv["read"] + kv["skipped"])
    # a step that is not decided (min_bulk) reads every block of every long group, and says so
    set_policy(qada_server, policy="qada", page_top_k=4, min_bulk=10**4)
    before = stats(qada_server)
    reply = greedy(qada_client, text[:3000], 4, stats=True)
    after = stats(qada_server)
    blocks = {
        k: after["kv_blocks_of_long_groups"][k] - before["kv_blocks_of_long_groups"][k]
        for k in ("read", "skipped")
    }
    long = after["kv_group_decisions"]["long"] - before["kv_group_decisions"]["long"]
    usage = reply.model_dump()["usage"]
    per_group = -(-(usage["prompt_tokens"] + 1) // 128)  # the steps stay in the same block or one more
    assert long == 3 * 30 * 3 and blocks["skipped"] == 0
    assert long * per_group <= blocks["read"] <= long * (per_group + 1)


def test_per_request_stats_add_up_to_the_global_counters(qada_server, qada_client):
    set_policy(qada_server, policy="qada")
    prompt = "The history of the lighthouse. " * 30
    plain = qada_client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=4)
    assert "qada" not in plain.model_dump()["usage"]  # off unless asked for
    before = stats(qada_server)
    reply = greedy(qada_client, prompt, 9, stats=True)
    after = stats(qada_server)
    mine = reply.model_dump()["usage"]["qada"]
    assert mine["decode_steps"] == reply.usage.completion_tokens - 1
    for level in ("head_decisions", "kv_group_decisions"):
        assert mine[level] == {k: after[level][k] - before[level][k] for k in ("long", "local")}
    assert sum(mine["head_decisions"].values()) == mine["decode_steps"] * 30 * 9

    stream = qada_client.chat.completions.create(
        model=SERVED_NAME,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"X-QAdA-Stats": "1"},
    )
    chunks = list(stream)
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    usage = chunks[-1].model_dump()["usage"]
    assert usage["qada"]["decode_steps"] == usage["completion_tokens"] - 1
    assert sum(usage["qada"]["kv_group_decisions"].values()) == usage["qada"]["decode_steps"] * 30 * 3


def test_decision_trace_and_heatmap(qada_server, qada_client, tmp_path):
    import subprocess
    import sys

    set_policy(qada_server, policy="qada")
    reply = greedy(qada_client, "A walk by the river. " * 40, 7, stats=True)
    trace = httpx.get(f"{qada_server.url}/v1/qada/requests/{reply.id}/decisions", headers=AUTH).json()
    steps = reply.usage.completion_tokens - 1
    assert len(trace["long"]) == steps and len(trace["long"][0]) == 30 and len(trace["long"][0][0]) == 9
    usage = reply.model_dump()["usage"]["qada"]
    assert sum(map(sum, (h for step in trace["long"] for h in step))) == usage["head_decisions"]["long"]

    missing = httpx.get(f"{qada_server.url}/v1/qada/requests/cmpl-nope/decisions", headers=AUTH)
    assert missing.status_code == 404 and "cmpl-nope" in missing.json()["error"]["message"]

    out = tmp_path / "heatmap.png"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.cli",
            "heatmap",
            "--url",
            qada_server.url,
            "--api-key",
            API_KEY,
            "--prompt",
            "The river flows. " * 30,
            "--max-tokens",
            "6",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
