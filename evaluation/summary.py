"""Aggregate result rows per (protocol, setting): accuracy (over probes with answers), sparsity at
query-head and KV-group level, the share of full attention's decode KV bytes read, agreement with
the oracle (false-negative / false-positive rates) and with full attention's greedy tokens (the
common prefix of each output with policy `full`'s on the same probe and protocol)."""

from __future__ import annotations

from collections import defaultdict

ROW_KEYS = {
    "task",
    "probe",
    "context",
    "depth",
    "protocol",
    "setting",
    "family",
    "knob",
    "correct",
    "answers",
    "output",
}
SETTING_KEYS = {"protocol", "setting", "family", "knob", "probes", "accuracy", "by_task"}


def summarize(rows: list[dict]) -> dict:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        missing = ROW_KEYS - row.keys()
        if missing:
            raise ValueError(f"result row lacks {sorted(missing)}")
        groups[row["protocol"], row["setting"]].append(row)
    settings = []
    full_tokens = {_probe_key(r): r["token_ids"] for r in rows if r["family"] == "full" and "token_ids" in r}
    for (protocol, name), items in groups.items():
        scored = [r for r in items if r["answers"]]  # generations have no answers, only agreement
        entry = {
            "protocol": protocol,
            "setting": name,
            "family": items[0]["family"],
            "knob": items[0]["knob"],
            "probes": len(scored),
            "solved": sum(r["correct"] for r in scored),
            "accuracy": sum(r["correct"] for r in scored) / max(len(scored), 1),
            "by_task": {},
        }
        agree = [
            _common_prefix(r["token_ids"], full_tokens[_probe_key(r)])
            for r in items
            if "token_ids" in r and _probe_key(r) in full_tokens and not r["answers"]
        ]
        if agree:
            entry["full_agreement_tokens"] = sum(agree) / len(agree)
        for task in sorted({r["task"] for r in scored}):
            of_task = [r for r in items if r["task"] == task]
            entry["by_task"][task] = sum(r["correct"] for r in of_task) / len(of_task)
        if "heads_total" in items[0]:
            for level in ("heads", "groups"):
                total = sum(r[f"{level}_total"] for r in items)
                entry[f"{level}_local_fraction"] = 1 - sum(r[f"{level}_long"] for r in items) / max(total, 1)
        if "kv_bytes_read" in items[0]:  # decode steps' KV bytes, of full attention's
            read = sum(r["kv_bytes_read"] for r in items)
            full = max(read + sum(r["kv_bytes_skipped"] for r in items), 1)
            # the key copy page_rank_bits ranks by is read too: it counts, beside the cache
            copy = sum(r.get("key_copy_bytes_read", 0) for r in items)
            entry["kv_read_fraction"] = (read + copy) / full
            if copy:
                entry["key_copy_read_fraction"] = copy / full
        observed = [r["oracle"] for r in items if "oracle" in r]
        if observed:
            entry["agreement"] = {}
            for level, key in (("heads", "head_decisions"), ("groups", "kv_group_decisions")):
                total = sum(r[f"{level}_total"] for r in items if "oracle" in r)
                long = sum(o[key]["long"] for o in observed)
                entry["agreement"][level] = {
                    "oracle_long_fraction": long / max(total, 1),
                    "false_negative_rate": sum(o[key]["missed"] for o in observed) / max(long, 1),
                    "false_positive_rate": sum(o[key]["extra"] for o in observed) / max(total - long, 1),
                }
        settings.append(entry)
    return {"settings": settings, "full_vs_stock": _full_vs_stock(rows)}


def _probe_key(row: dict) -> tuple:
    return row["task"], row["context"], row["probe"], row["protocol"]


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy outputs share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _full_vs_stock(rows: list[dict]) -> dict | None:
    """Accuracy of policy `full` and of the stock backend on the same probes (prompt protocol)."""
    stock = {(r["task"], r["context"], r["probe"]): r["correct"] for r in rows if r["family"] == "stock"}
    full = {
        (r["task"], r["context"], r["probe"]): r["correct"]
        for r in rows
        if r["family"] == "full" and r["protocol"] == "prompt"
    }
    if not stock:
        return None
    common = stock.keys() & full.keys()
    return {
        "probes": len(common),
        "full_accuracy": sum(full[k] for k in common) / max(len(common), 1),
        "stock_accuracy": sum(stock[k] for k in common) / max(len(common), 1),
    }
