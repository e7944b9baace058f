"""`qada eval report`: plots and docs/results.md from the directories `qada eval run` wrote."""

from __future__ import annotations

import json
import re
from pathlib import Path

FAMILIES = (
    "oracle",
    "qada-prompt",
    "qada-local",
    "qada-calib",
    "qada-pages16",
    "qada-pages32",
    "qada-pages128",
    "qada-bound32",
    "qada-pages32-mean",
    "static-oracle",
    "static-retrieval",
    "random",
)
STYLE = {
    "oracle": "k-o",
    "qada-prompt": "C0-s",
    "qada-local": "C1-^",
    "qada-calib": "C2-v",
    "qada-pages16": "C5-P",
    "qada-pages32": "C6-*",
    "qada-pages128": "C8-p",
    "qada-bound32": "C9-<",
    "qada-pages32-mean": "m--*",
    "static-oracle": "C3--D",
    "static-retrieval": "C4--x",
    "random": "C7:.",
}


def _load(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    summary["profile"] = json.loads((run / "head_profile.json").read_text())
    summary["slug"] = run.name
    return summary


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(summary: dict, protocol: str, path: Path) -> None:
    plt = _pyplot()

    entries = [e for e in summary["settings"] if e["protocol"] == protocol]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, level, label in zip(axes, ("groups", "heads"), ("KV-group", "query-head")):
        for family in FAMILIES:
            points = sorted(
                (e[f"{level}_local_fraction"], e["accuracy"], e["knob"])
                for e in entries
                if e["family"] == family
            )
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], STYLE[family], label=family)
        for family, style in (("full", "g--"), ("local", "r:")):
            for e in entries:
                if e["family"] == family:
                    ax.axhline(
                        e["accuracy"], color=style[0], linestyle=style[1:], label=f"{family} attention"
                    )
        ax.set_xlabel(f"{label} decisions local (sparsity)")
        ax.set_xlim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact-match accuracy")
    axes[1].legend(fontsize=8, loc="lower left")
    fig.suptitle(
        f"{summary['model']}: accuracy vs sparsity ({protocol} protocol, {summary['probes']} probes)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SELECTION = re.compile(r"-(k|p)\d+$")  # page-selection families: ...-k4 (top-k), ...-p05 (top-p)


def plot_bytes(summary: dict, protocol: str, path: Path) -> bool:
    """Accuracy vs the share of full attention's decode KV bytes read, one line per page
    selector (its budgets), points for the rest; False (nothing drawn) without page selection."""
    entries = [e for e in summary["settings"] if e["protocol"] == protocol and "kv_read_fraction" in e]
    if not any(SELECTION.search(e["family"]) for e in entries):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    lines: dict[str, list] = {}
    for e in entries:
        lines.setdefault(SELECTION.sub(r"-\1", e["family"]), []).append(e)  # a selector's budgets
    for name, items in sorted(lines.items()):
        items.sort(key=lambda e: e["kv_read_fraction"])
        xs, ys = [e["kv_read_fraction"] for e in items], [e["accuracy"] for e in items]
        ax.plot(xs, ys, "o-" if len(items) > 1 else "s", label=name.rstrip("-"))
        for e in items:
            label = e["family"].rsplit("-", 1)[-1] if SELECTION.search(e["family"]) else e["setting"]
            ax.annotate(label, (e["kv_read_fraction"], e["accuracy"]), fontsize=7)
    ax.set_xlabel("decode KV bytes read (share of full attention's)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_xlim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"{summary['model']}: accuracy vs KV bytes read ({protocol} protocol)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_heads(summary: dict, path: Path) -> None:
    plt = _pyplot()
    import torch

    share = torch.tensor(summary["profile"]["oracle_long_share"])
    retrieval = torch.tensor(summary["profile"]["retrieval_score"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    axes[0].hist(share.flatten().numpy(), bins=20, range=(0, 1), color="C0")
    axes[0].set_xlabel("share of queries the oracle sends long (tau 0.8)")
    axes[0].set_ylabel("(layer, head) count")
    for ax, data, title in ((axes[1], share, "oracle long share"), (axes[2], retrieval, "retrieval score")):
        image = ax.imshow(data.T.numpy(), aspect="auto", cmap="viridis", vmin=0)
        ax.set_xlabel("layer")
        ax.set_ylabel("query head")
        ax.set_title(title)
        fig.colorbar(image, ax=ax)
    fig.suptitle(
        f"{summary['model']}: per-head behaviour under full attention "
        f"({summary['profile']['queries']} queries, {summary['profile']['probes']} probes)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def _table(summary: dict, protocol: str) -> list[str]:
    lines = [
        "| setting | solved | heads local | KV groups local | KV bytes read | FN rate (heads / groups) "
        "| FP rate (heads / groups) | tokens agreeing with full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in summary["settings"]:
        if e["protocol"] != protocol:
            continue
        agree = e.get("agreement")
        fn = fp = ""
        if agree:
            fn, fp = (
                f"{_pct(agree['heads'][rate])} / {_pct(agree['groups'][rate])}"
                for rate in ("false_negative_rate", "false_positive_rate")
            )
        solved = f"{e['solved']}/{e['probes']}" if "solved" in e else _pct(e["accuracy"])
        agreement = e.get("full_agreement_tokens")
        lines.append(
            f"| {e['setting']} | {solved} | {_pct(e.get('heads_local_fraction'))} "
            f"| {_pct(e.get('groups_local_fraction'))} | {_pct(e.get('kv_read_fraction'))} | {fn} | {fp} "
            f"| {'' if agreement is None else f'{agreement:.1f}'} |"
        )
    return lines


def _equal_sparsity(summary: dict, protocol: str) -> list[str]:
    """Each static point next to the qada point (pages32 where swept, else prompt) of nearest
    query-head sparsity; nothing without static points."""
    entries = [e for e in summary["settings"] if e["protocol"] == protocol]
    static = [e for e in entries if e["family"].startswith("static")]
    family = "qada-pages32" if any(e["family"] == "qada-pages32" for e in entries) else "qada-prompt"
    qada = [e for e in entries if e["family"] == family]
    if not static or not qada:
        return []
    lines = [
        "Static head sets against QAdA at equal sparsity:",
        "",
        f"| static setting | heads local | accuracy | nearest {family} | heads local | accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for e in static:
        q = min(qada, key=lambda x: abs(x["heads_local_fraction"] - e["heads_local_fraction"]))
        lines.append(
            f"| {e['setting']} | {_pct(e['heads_local_fraction'])} | {_pct(e['accuracy'])} "
            f"| {q['setting']} | {_pct(q['heads_local_fraction'])} | {_pct(q['accuracy'])} |"
        )
    return [*lines, ""]


def write_report(runs: list[Path], docs: Path, notes: Path | None = None) -> Path:
    images = docs / "img" / "results"
    images.mkdir(parents=True, exist_ok=True)
    out = [
        "# Evaluation results",
        "",
        "Generated by `qada eval report` from the run directories below; every number comes from "
        "the real vLLM engine serving the model with the QAdA backend (policies switched live "
        "through `PUT /v1/qada/policy`). Scoring: exact match (every expected value appears in "
        "the greedy output). Protocols: **prompt** = the question is part of the exact prefill "
        "and only the answer is decoded under the policy; **decode** = the question's tokens are "
        "also run through the policy's decode path (`decode_tail`). FN rate = oracle-long "
        "decisions the policy made local; FP rate = oracle-local decisions it made long "
        "(oracle at the same tau).",
        "",
    ]
    if notes:  # hand-written reading of the numbers below
        out += [notes.read_text().strip(), ""]
    for run in runs:
        summary = _load(run)
        slug = summary["slug"]
        plan = summary["plan"]
        out += [
            f"## {summary['model']}",
            "",
            f"Command: `{summary.get('command') or 'qada eval run'}` (against `qada serve --config "
            f"configs/<model>-cpu-qada.yaml`); raw results in `{run}`.",
            "",
            f"{summary['probes']} probes (tasks {', '.join(plan['tasks'])}; contexts "
            f"{plan['contexts']} tokens; depths {plan['depths']}), taus {plan['taus']}, static/random "
            f"local shares {plan['fractions']}; wall time {summary['wall_s'] / 60:.0f} min.",
            "",
        ]
        if summary.get("full_vs_stock"):
            fs = summary["full_vs_stock"]
            out += [
                f"Policy `full` vs stock vLLM on the same {fs['probes']} probes: "
                f"{_pct(fs['full_accuracy'])} vs {_pct(fs['stock_accuracy'])}.",
                "",
            ]
        plot_heads(summary, images / f"{slug}-heads.png")
        out += [f"![per-head behaviour](img/results/{slug}-heads.png)", ""]
        for protocol in summary["protocols"]:
            plot_curves(summary, protocol, images / f"{slug}-{protocol}.png")
            out += [
                f"### {protocol} protocol",
                "",
                f"![accuracy vs sparsity](img/results/{slug}-{protocol}.png)",
                "",
                *_table(summary, protocol),
                "",
                *_equal_sparsity(summary, protocol),
            ]
            if plot_bytes(summary, protocol, images / f"{slug}-{protocol}-bytes.png"):
                out += [f"![accuracy vs KV bytes read](img/results/{slug}-{protocol}-bytes.png)", ""]
    out += ["Earlier runs (the old default, `prompt` statistics): [results-earlier.md](results-earlier.md)."]
    path = docs / "results.md"
    path.write_text("\n".join(out) + "\n")
    return path
