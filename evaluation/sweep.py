"""Policy sweeps over probes on one running QAdA server: one result row per (probe, protocol,
setting). Probe-major order, so each haystack is prefilled once and then served from the prefix
cache while the policy changes (prefill is exact, so the cached prefix is policy-independent).

Protocols: "prompt" (the question is part of the exact prefill; only the answer is decoded under
the policy) and "decode" (the question's tokens also go through the policy's decode path,
`decode_tail`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .client import EvalError, ServerClient
from .tasks import Probe, score


@dataclass(frozen=True)
class Setting:
    family: str  # full, local, a `TAU_FAMILIES` name, static-*, random, stock
    knob: float | None  # tau, or the local share of heads for static / random
    policy: dict = field(default_factory=dict, hash=False)
    observe: bool = False  # also record the oracle's decisions (agreement rates)

    @property
    def name(self) -> str:
        return self.family if self.knob is None else f"{self.family}@{self.knob:g}"


PAGE_SELECTORS = {
    "oracle": {"policy": "oracle"},
    "qada-pages32": {"policy": "qada", "stats": "pages", "page_chunk": 32},
}
# Families swept over tau: their policy settings (qada's are observed: FN / FP against the oracle).
TAU_FAMILIES = {
    "oracle": {"policy": "oracle"},
    "qada-prompt": {"policy": "qada", "stats": "prompt"},
    "qada-local": {"policy": "qada", "stats": "local"},
    "qada-calib": {"policy": "qada", "stats": "calib"},
    "qada-pages16": {"policy": "qada", "stats": "pages", "page_chunk": 16},
    "qada-pages32": {"policy": "qada", "stats": "pages", "page_chunk": 32},
    "qada-pages128": {"policy": "qada", "stats": "pages", "page_chunk": 128},
    "qada-bound32": {"policy": "qada", "stats": "pages_bound", "page_chunk": 32},
    "qada-pages32-mean": {"policy": "qada", "stats": "pages", "page_chunk": 32, "groups": "mean"},
    # page selection inside long groups: top-p (unread estimated share) and top-k (KV blocks),
    # by the page estimates (qada) or by the exact block masses (oracle)
    **{
        f"{name}-p{budget * 100:02.0f}": {**policy, "page_budget": budget}
        for name, policy in PAGE_SELECTORS.items()
        for budget in (0.01, 0.02, 0.05, 0.1, 0.2)
    },
    **{
        f"{name}-k{k}": {**policy, "page_top_k": k}
        for name, policy in PAGE_SELECTORS.items()
        for k in (2, 4, 8, 16)
    },
    # ranked by partial scores on r key dimensions (SparQ) instead of the page estimates
    **{
        f"qada-pages32-r{r}-k{k}": {**PAGE_SELECTORS["qada-pages32"], "page_rank_dims": r, "page_top_k": k}
        for r in (8, 16)
        for k in (2, 4, 8)
    },
    **{
        f"qada-pages32-r{r}-p{budget * 100:02.0f}": {
            **PAGE_SELECTORS["qada-pages32"],
            "page_rank_dims": r,
            "page_budget": budget,
        }
        for r in (8, 16)
        for budget in (0.05, 0.1, 0.2)
    },
    # ranked once per row in rank layers (TidalDecode), read in the layers after them
    **{
        f"qada-pages32-L{'_'.join(map(str, layers))}-{name}": {
            **PAGE_SELECTORS["qada-pages32"],
            "page_rank_layers": list(layers),
            **selection,
        }
        for layers in ((2, 15), (1, 10, 20), (0, 1, 15))
        for name, selection in {
            **{f"k{k}": {"page_top_k": k} for k in (4, 8, 16)},
            **{f"p{budget * 100:02.0f}": {"page_budget": budget} for budget in (0.05, 0.1)},
        }.items()
    },
    # ranked by every key's score from a low-bit key copy (the server launches with its bits)
    **{
        f"qada-pages32-q{bits}-{name}": {
            **PAGE_SELECTORS["qada-pages32"],
            "page_rank_bits": bits,
            **selection,
        }
        for bits in (2, 4, 8)
        for name, selection in {
            **{f"k{k}": {"page_top_k": k} for k in (2, 4, 8, 12, 16)},
            **{f"p{budget * 100:02.0f}": {"page_budget": budget} for budget in (0.02, 0.05, 0.1, 0.15)},
        }.items()
    },
    # diagnostics: every 2nd / 3rd layer ranks (SmolLM2's 30 layers), the others reuse its choice
    **{
        f"qada-pages32-Levery{step}-k8": {
            **PAGE_SELECTORS["qada-pages32"],
            "page_rank_layers": list(range(0, 30, step)),
            "page_top_k": 8,
        }
        for step in (2, 3)
    },
}
MASK_FAMILIES = ("static-oracle", "static-retrieval", "random")  # swept over the local share
DEFAULT_FAMILIES = ("oracle", "qada-pages32", "qada-prompt", "qada-local", "qada-calib", *MASK_FAMILIES)


def settings_grid(
    taus: list[float],
    fractions: list[float],
    static_heads: dict[str, dict[float, list]],
    calib_file: str | None,
    families: tuple[str, ...] | list[str] = DEFAULT_FAMILIES,
) -> list[Setting]:
    """full and local ends; each tau family at each tau; static (each ranking) and random at each
    local share of query heads. qada-calib needs `calib_file` (a name in the server's files_dir)."""
    unknown = set(families) - TAU_FAMILIES.keys() - set(MASK_FAMILIES)
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}; known: {[*TAU_FAMILIES, *MASK_FAMILIES]}")
    grid = [Setting("full", None, {"policy": "full"}), Setting("local", None, {"policy": "local"})]
    for tau in taus:
        for family in families:
            policy = TAU_FAMILIES.get(family)
            if policy is None or (family == "qada-calib" and not calib_file):
                continue
            policy = {**policy, "tau": tau, **({"calib": calib_file} if family == "qada-calib" else {})}
            grid.append(Setting(family, tau, policy, observe=policy["policy"] == "qada"))
    for fraction in fractions:
        for ranking, heads in static_heads.items():
            if f"static-{ranking}" in families:
                policy = {"policy": "static", "static_heads": heads[fraction]}
                grid.append(Setting(f"static-{ranking}", fraction, policy))
        if "random" in families:
            grid.append(Setting("random", fraction, {"policy": "random", "random_fraction": 1 - fraction}))
    return grid


def run_probe(client: ServerClient, probe: Probe, setting: Setting, protocol: str) -> dict:
    """One greedy completion of `probe` under `setting`; a result row."""
    if setting.family == "stock":
        result = client.complete(probe.prompt_ids, probe.max_tokens)
    else:
        tail = len(probe.question_ids) if protocol == "decode" else 0
        observe = setting.observe and bool(probe.answers)  # generations: agreement with full only
        client.set_policy({**setting.policy, "observe": observe, "decode_tail": tail})
        result = client.complete(probe.prompt_ids, probe.max_tokens)
        expected = tail + len(result["token_ids"]) - 1  # question tokens + all but the first answer token
        if result["qada"]["decode_steps"] != expected:
            raise EvalError(
                f"{probe.task} probe {probe.index}: {result['qada']['decode_steps']} decode "
                f"steps, expected {expected}: the question was not recomputed (is it "
                "longer than a KV block, or the prefix not block-aligned?)"
            )
    row = {
        "task": probe.task,
        "probe": probe.index,
        "context": probe.context,
        "depth": probe.depth,
        "protocol": protocol,
        "setting": setting.name,
        "family": setting.family,
        "knob": setting.knob,
        "correct": score(result["text"], probe.answers),
        "answers": probe.answers,
        "output": result["text"],
        "token_ids": result["token_ids"],
    }
    usage = result["qada"]
    if usage:
        heads, groups = usage["head_decisions"], usage["kv_group_decisions"]
        row.update(
            decode_steps=usage["decode_steps"],
            heads_long=heads["long"],
            heads_total=heads["long"] + heads["local"],
            groups_long=groups["long"],
            groups_total=groups["long"] + groups["local"],
            kv_bytes_read=usage["kv_bytes"]["read"],
            kv_bytes_skipped=usage["kv_bytes"]["skipped"],
            key_copy_bytes_read=usage["kv_bytes"].get("key_copy_read", 0),
        )
        if "oracle" in usage:
            row["oracle"] = usage["oracle"]
    return row


def sweep(
    client: ServerClient,
    probes: list[Probe],
    settings: list[Setting],
    protocols: list[str],
    out: Path,
    stock: ServerClient | None = None,
    log=print,
) -> list[dict]:
    """Run every (probe, protocol, setting); rows are appended to `out` (JSON lines) as they come.
    `stock`, a server with vLLM's own attention, answers the same probes as the reference."""
    rows = []
    with out.open("a") as f:
        for n, probe in enumerate(probes):
            jobs = [(stock, Setting("stock", None), "prompt")] if stock else []
            jobs += [(client, s, p) for p in protocols for s in settings]
            for server, setting, protocol in jobs:
                row = run_probe(server, probe, setting, protocol)
                rows.append(row)
                f.write(json.dumps(row) + "\n")
                f.flush()
            solved = sum(r["correct"] for r in rows[-len(jobs) :])
            log(
                f"probe {n + 1}/{len(probes)} {probe.task} {probe.context} tok depth {probe.depth}: "
                f"{solved}/{len(jobs)} settings correct"
            )
    return rows
