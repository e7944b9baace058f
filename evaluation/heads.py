"""Per-(layer, query head) calibration from the real engine: how often the oracle says long, and
Wu et al.'s retrieval score; both rank heads for the `static` policy.

Probes run under policy `full` with `observe` and the question through the decode path, so the
trace covers every query from the question's first token to the last generated one (token i of
the answer is produced by trace step len(question) - 1 + i).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .client import ServerClient
from .tasks import Probe


def profile_heads(client: ServerClient, probes: list[Probe], tau: float, log=print) -> dict:
    """Oracle-long share over all observed queries, and mean retrieval score over probes, each
    [layers][heads]."""
    oracle_long = retrieval = 0.0
    steps = 0
    for n, probe in enumerate(probes):
        tail = len(probe.question_ids)
        client.set_policy({"policy": "full", "tau": tau, "observe": True, "decode_tail": tail})
        result = client.complete(probe.prompt_ids, probe.max_tokens)
        trace = client.trace(result["id"])
        oracle = torch.tensor(trace["oracle"])  # [steps, layers, heads]
        oracle_long = oracle_long + oracle.sum(0)
        steps += oracle.shape[0]
        retrieval = retrieval + retrieval_score(
            torch.tensor(trace["top1"]), probe, result["token_ids"], first_answer_step=tail - 1
        )
        log(f"profiled {n + 1}/{len(probes)}: {probe.task} {probe.context} tok, output {result['text']!r}")
    return {
        "tau": tau,
        "probes": len(probes),
        "queries": steps,
        "oracle_long_share": (oracle_long / steps).tolist(),
        "retrieval_score": (retrieval / len(probes)).tolist(),
    }


def retrieval_score(
    top1: torch.Tensor, probe: Probe, generated: list[int], first_answer_step: int
) -> torch.Tensor:
    """Wu et al.: a head copies when its top-1 attended position lies in a needle and holds the
    token being generated; each copy adds 1 / |needle|. top1 [steps, layers, heads]."""
    prompt = torch.tensor(probe.prompt_ids)
    score = torch.zeros(top1.shape[1:])
    for i, token in enumerate(generated):
        step = first_answer_step + i
        if step >= top1.shape[0]:
            break
        pos = top1[step]
        holds_token = prompt[pos.clamp(max=len(prompt) - 1)] == token
        for start, end in probe.needle_spans:
            copied = (pos >= start) & (pos < end) & holds_token
            score += copied.float() / (end - start)
    return score


def static_head_files(profile: dict, fractions: list[float], out_dir: Path) -> dict[str, dict[float, list]]:
    """For each ranking (oracle share, retrieval score) and local share f of query heads, the
    static heads keeping the top (1 - f) of heads long: [[layer, head], ...] as the policy takes
    them inline, also written to a file in `out_dir` for the record."""
    files: dict[str, dict[float, list]] = {}
    for ranking, key in (("oracle", "oracle_long_share"), ("retrieval", "retrieval_score")):
        scores = torch.tensor(profile[key])
        layers, heads = scores.shape
        order = scores.flatten().argsort(descending=True, stable=True).tolist()
        files[ranking] = {}
        for fraction in fractions:
            keep = round((1 - fraction) * layers * heads)
            long_heads = [list(divmod(i, heads)) for i in order[:keep]]
            spec = {"num_layers": layers, "num_heads": heads, "ranking": key, "long_heads": long_heads}
            (out_dir / f"static-{ranking}-{fraction:g}.json").write_text(json.dumps(spec))
            files[ranking][fraction] = long_heads
    return files
