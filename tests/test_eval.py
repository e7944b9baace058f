"""The evaluation harness: probe generation and scoring, and its quick mode end to end against
the session's real servers (QAdA and stock)."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from evaluation.heads import retrieval_score
from evaluation.summary import ROW_KEYS, SETTING_KEYS
from evaluation.sweep import DEFAULT_FAMILIES
from evaluation.tasks import ALIGN, TASKS, make_probe, score
from serving.testing import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def haystack():
    from evaluation.haystack import haystack_text

    return haystack_text()


@pytest.mark.parametrize("task", [t for t in TASKS if t != "generation"])
def test_probes_hold_their_needles_in_an_aligned_prefix(tokenizer, haystack, task):
    probe = make_probe(tokenizer, haystack, task, 1500, 0.3, index=0)
    assert len(probe.prefix_ids) % ALIGN == 0 and len(probe.question_ids) < ALIGN
    assert probe.context == len(probe.prompt_ids) <= 1500
    values = [tokenizer.decode(probe.prompt_ids[a:b]).strip() for a, b in probe.needle_spans]
    assert all(answer in "".join(values) for answer in probe.answers)
    first_needle = probe.needle_spans[0][0] / len(probe.prefix_ids)
    assert abs(first_needle - 0.3) < 0.05
    assert score(" " + " ".join(probe.answers) + ".", probe.answers)
    assert not score(" ".join(probe.answers[:-1]) + " 0", probe.answers)
    assert make_probe(tokenizer, haystack, task, 1500, 0.3, index=0).prompt_ids == probe.prompt_ids


def test_generation_probes_are_prose_and_a_cue_scored_by_agreement(tokenizer, haystack):
    probe = make_probe(tokenizer, haystack, "generation", 1500, 0.5, index=0)
    assert len(probe.prefix_ids) % ALIGN == 0 and len(probe.question_ids) < ALIGN
    assert probe.answers == [] and probe.needle_spans == [] and probe.max_tokens == 64
    assert "Continue the text" in tokenizer.decode(probe.question_ids)


def test_summary_counts_solved_probes_and_agreement_with_full():
    from evaluation.summary import summarize

    def row(task, family, correct, tokens, answers):
        return dict(
            task=task, probe=0, context=1000, depth=0.5, protocol="prompt", setting=family, family=family,
            knob=None, correct=correct, answers=answers, output="", token_ids=tokens,
        )  # fmt: skip

    rows = [
        row("niah_single", "full", True, [1, 2], ["7"]),
        row("generation", "full", True, [5, 6, 7, 8], []),
        row("niah_single", "local", False, [3], ["7"]),
        row("generation", "local", True, [5, 6, 9, 8], []),
    ]
    by_name = {e["setting"]: e for e in summarize(rows)["settings"]}
    assert (by_name["full"]["solved"], by_name["full"]["probes"]) == (1, 1)  # generations not scored
    assert (by_name["local"]["solved"], by_name["local"]["accuracy"]) == (0, 0.0)
    assert by_name["full"]["full_agreement_tokens"] == 4
    assert by_name["local"]["full_agreement_tokens"] == 2  # diverges at the third token


def test_retrieval_score_counts_copies_from_the_needle(tokenizer, haystack):
    probe = make_probe(tokenizer, haystack, "niah_single", 600, 0.5, index=0)
    start, end = probe.needle_spans[0]
    answer = probe.prompt_ids[start:end]
    steps = len(answer) + 2
    top1 = torch.zeros(steps, 2, 3, dtype=torch.long)  # [steps, layers, heads]
    top1[1 : 1 + len(answer), 1, 2] = torch.arange(start, end)  # layer 1 head 2 copies each token
    top1[1 : 1 + len(answer), 0, 0] = start  # layer 0 head 0 stares at the first one
    scores = retrieval_score(top1, probe, answer, first_answer_step=1)
    assert scores[1, 2] == pytest.approx(1.0)
    assert scores[0, 0] == pytest.approx(1 / len(answer))
    assert scores.sum() == pytest.approx(1.0 + 1 / len(answer))


def test_quick_eval_end_to_end(server, qada_server, qada_files_dir, model_path, tmp_path):
    from evaluation.run import run

    before = httpx.get(qada_server.url + "/v1/qada/policy", headers=AUTH).json()
    summary = run(
        qada_server.url,
        tmp_path,
        model_path,
        api_key=API_KEY,
        stock_url=server.url,
        files_dir=qada_files_dir,
        quick=True,
        log=lambda line: print(line),
    )
    assert httpx.get(qada_server.url + "/v1/qada/policy", headers=AUTH).json() == before

    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert rows and all(row.keys() >= ROW_KEYS for row in rows)
    families = {(e["family"], e["protocol"]) for e in summary["settings"]}
    for family in ("full", "local", *DEFAULT_FAMILIES):
        assert {(family, "prompt"), (family, "decode")} <= families
    for entry in summary["settings"]:
        assert entry.keys() >= SETTING_KEYS and 0 <= entry["accuracy"] <= 1
        if entry["family"] != "stock":
            assert 0 <= entry["groups_local_fraction"] <= entry["heads_local_fraction"] <= 1
        if entry["family"].startswith("qada"):
            for level in ("heads", "groups"):
                rates = entry["agreement"][level]
                assert 0 <= rates["false_negative_rate"] <= 1 and 0 <= rates["false_positive_rate"] <= 1
    by_name = {(e["setting"], e["protocol"]): e for e in summary["settings"]}
    assert by_name["full", "prompt"]["heads_local_fraction"] == 0
    assert by_name["local", "decode"]["groups_local_fraction"] == 1
    # the acceptance check: full attention through our backend scores like stock vLLM
    assert summary["full_vs_stock"]["probes"] == summary["probes"] > 0
    assert summary["full_vs_stock"]["full_accuracy"] == summary["full_vs_stock"]["stock_accuracy"]

    profile = json.loads((tmp_path / "head_profile.json").read_text())
    assert torch.tensor(profile["oracle_long_share"]).shape == (30, 9)
    assert torch.tensor(profile["retrieval_score"]).max() > 0  # some head copied the passkey
    static = json.loads((tmp_path / "static-retrieval-0.8.json").read_text())
    assert len(static["long_heads"]) == round(0.2 * 30 * 9)
