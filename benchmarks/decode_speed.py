"""Decode throughput of the real server: stock vLLM attention vs QAdA, same machine, same run.

For each context length and batch size, `batch` distinct haystack prompts (the first holds a
passkey) are prefilled once (prefix cache), then decoded twice, for 1 and for N+1 tokens; decode
throughput = batch * N / (t(N+1) - t(1)), so prefill and HTTP overhead cancel out.

    python -m benchmarks.decode_speed                       # 2k/4k/7k x batch 1/8, fp32
    python -m benchmarks.decode_speed --dtype bfloat16 --contexts 7000 --batches 8
    python -m benchmarks.decode_speed --taus 0.8 0.9 0.95   # one QAdA server, policy set per run
    python -m benchmarks.decode_speed --contexts 2000 --min-bulk 0   # decide even for short bulks
    python -m benchmarks.decode_speed --vllm-args "--tensor-parallel-size 3"   # both servers TP 3
    python -m benchmarks.decode_speed --changes page_top_k=4 policy=oracle,page_top_k=4  # page selection
    python -m benchmarks.decode_speed --launch attention.page_rank_bits=4 \
        --changes page_top_k=8,page_rank_bits=4                       # ranked by the 4-bit key copy

Writes results/decode_speed-<dtype>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from pathlib import Path

import httpx

from benchmarks import machine
from evaluation.haystack import haystack_text, passkey_prompt
from serving.models import prepare_model
from serving.testing import API_KEY, REPO, Server, greedy_at_once

PASSKEY = "68217"


async def timed_batch(url: str, prompts: list[str], max_tokens: int) -> tuple[float, list[str]]:
    start = time.perf_counter()
    replies = await greedy_at_once(url, prompts, max_tokens)
    return time.perf_counter() - start, [r.choices[0].text for r in replies]


def decode_counts(server) -> dict:
    """KV-group decisions and KV bytes so far (empty on a stock server)."""
    reply = httpx.get(server.url + "/v1/qada/stats", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    if not reply.get("enabled"):
        return {}
    return {**reply["kv_group_decisions"], **{f"bytes_{k}": v for k, v in reply["kv_bytes"].items()}}


def measure(server, prompts_by_context, batches, new_tokens, repeats) -> list[dict]:
    url = server.url
    rows = []
    for context, prompts in prompts_by_context.items():
        asyncio.run(timed_batch(url, prompts[: max(batches)], 1))  # prefill into the prefix cache
        for batch in batches:
            best, answer, local, read = None, "", None, None
            for _ in range(repeats):
                t1, _ = asyncio.run(timed_batch(url, prompts[:batch], 1))
                before = decode_counts(server)
                tn, texts = asyncio.run(timed_batch(url, prompts[:batch], new_tokens + 1))
                after = decode_counts(server)
                tps = batch * new_tokens / (tn - t1)
                if best is None or tps > best:
                    best, answer = tps, texts[0]
                if after:
                    d = {k: after[k] - before[k] for k in after}
                    local = d["local"] / max(1, d["local"] + d["long"])
                    # of full attention's bytes; the key copy (page_rank_bits) is read too
                    copy = d.get("bytes_key_copy_read", 0)
                    read = (d["bytes_read"] + copy) / max(1, d["bytes_read"] + d["bytes_skipped"])
            rows.append(
                {
                    "context": context,
                    "batch": batch,
                    "decode_tok_s": round(best, 2),
                    "passkey_answered": PASSKEY in answer[:16],
                    "kv_group_local_fraction": None if local is None else round(local, 3),
                    "kv_read_fraction": None if read is None else round(read, 3),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=[2000, 4000, 7000])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--policy", default="qada")
    parser.add_argument(
        "--taus",
        type=float,
        nargs="+",
        default=[None],
        help="QAdA thresholds, measured one after another on the same server",
    )
    parser.add_argument(
        "--changes",
        nargs="+",
        default=[],
        help="policy changes measured after the taus, each KEY=VALUE[,KEY=VALUE] (PATCH)",
    )
    parser.add_argument("--min-bulk", type=int, default=None, help="default: the config's")
    parser.add_argument(
        "--launch",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="launch settings of the QAdA server (qada serve --set), e.g. attention.page_rank_bits=4",
    )
    parser.add_argument("--vllm-args", default="", help="arguments for vLLM, given to both servers")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    model_path = prepare_model()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    text = haystack_text()
    words = len(text) // max(args.batches)
    prompts_by_context = {
        context: [passkey_prompt(tokenizer, context, 0.3, PASSKEY, text)]
        + [
            passkey_prompt(tokenizer, context, 0.5, "1" + PASSKEY[1:], text[i * words :] + text[: i * words])
            for i in range(1, max(args.batches))
        ]
        for context in args.contexts
    }
    kv_gib = max(
        4,
        round(
            sum(args.contexts) * max(args.batches) * 46_080 * (1 if args.dtype == "float32" else 0.5) / 2**30
        )
        + 1,
    )
    common = ["--set", f"engine.dtype={args.dtype}", "--set", f"engine.kv_cache_space_gib={kv_gib}"]
    vllm_args = ["--", *shlex.split(args.vllm_args)] if args.vllm_args else []
    qada = ["--config", "configs/smollm2-cpu-qada.yaml", "--policy", args.policy]
    if args.min_bulk is not None:
        qada += ["--set", f"attention.min_bulk={args.min_bulk}"]
    for setting in args.launch:
        qada += ["--set", setting]
    results = {
        "machine": machine.describe(),
        "dtype": args.dtype,
        "new_tokens": args.new_tokens,
        "policy": args.policy,
        "command": sys.argv[1:],
        "runs": {},
    }
    log_dir = REPO / "results"
    log_dir.mkdir(exist_ok=True)
    for name, server_args in (("stock", ["--config", "configs/smollm2-cpu.yaml"]), ("qada", qada)):
        server = Server(server_args + common + vllm_args, log_dir / f"decode_speed-{name}.log")
        try:
            server.wait_ready()
            if name == "stock":
                results["runs"][name] = measure(
                    server, prompts_by_context, args.batches, args.new_tokens, args.repeats
                )
                continue
            for tau in args.taus:
                settings = set_tau(server, tau)
                label = f"qada tau={settings['tau']:g} min_bulk={settings['min_bulk']}"
                print(f"# {label}", flush=True)
                results["runs"][label] = measure(
                    server, prompts_by_context, args.batches, args.new_tokens, args.repeats
                )
            base = set_tau(server, None)
            for change in args.changes:
                settings = put_changed(server, base, change)
                label = f"qada {change} tau={settings['tau']:g} min_bulk={settings['min_bulk']}"
                print(f"# {label}", flush=True)
                results["runs"][label] = measure(
                    server, prompts_by_context, args.batches, args.new_tokens, args.repeats
                )
        finally:
            server.stop()
    out = args.out or log_dir / f"decode_speed-{args.dtype}.json"
    out.write_text(json.dumps(results, indent=1))
    print_table(results["runs"])
    print(f"\nwrote {out}")


def set_tau(server, tau: float | None) -> dict:
    """The server's policy, with `tau` replaced if given (PUT replaces every setting)."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    settings = httpx.get(server.url + "/v1/qada/policy", headers=headers).json()
    if tau is not None:
        settings = (
            httpx.put(server.url + "/v1/qada/policy", headers=headers, json={**settings, "tau": tau})
            .raise_for_status()
            .json()
        )
    return settings


def put_changed(server, base: dict, change: str) -> dict:
    """`base` with the changes `KEY=VALUE[,KEY=VALUE]` (values as YAML) in force."""
    import yaml

    changes = dict(item.split("=", 1) for item in change.split(","))
    settings = {**base, **{k: yaml.safe_load(v) for k, v in changes.items()}}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    return httpx.put(server.url + "/v1/qada/policy", headers=headers, json=settings).raise_for_status().json()


def print_table(runs: dict) -> None:
    stock = runs["stock"]
    print(
        "\n| context | batch | stock tok/s | policy | qada tok/s | speedup | qada KV-group local "
        "| KV bytes read | passkey (stock/qada) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, rows in runs.items():
        if label == "stock":
            continue
        for s, q in zip(stock, rows):
            print(
                f"| {s['context']} | {s['batch']} | {s['decode_tok_s']:.1f} | {label[5:]} "
                f"| {q['decode_tok_s']:.1f} | "
                f"{q['decode_tok_s'] / s['decode_tok_s']:.2f}x | {q['kv_group_local_fraction']} | "
                f"{q.get('kv_read_fraction')} | "
                f"{'yes' if s['passkey_answered'] else 'no'}/{'yes' if q['passkey_answered'] else 'no'} |"
            )


if __name__ == "__main__":
    main()
