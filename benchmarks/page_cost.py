"""What qada/pages' decision costs per layer and step, next to the bulk read it can skip: bytes
(page summaries read + partial-page keys, against the bulk's K+V) and CPU time (`pages_bulk_lse`,
against vLLM's CPU kernel reading everything), at SmolLM2's shapes (Hkv 3, G 3, D 64, fp32,
128-token blocks).

    python -m benchmarks.page_cost                     # 2k/4k/7k x batch 1/8, pages 16/32/128
    python -m benchmarks.page_cost --contexts 7000 --batches 8

Writes results/page_cost.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from attention_backend.cpu_kernel import stock_decode
from attention_backend.kv_layout import CPU_VEC
from attention_backend.page_estimate import pages_bulk_lse, plan_pages
from attention_backend.settings import QadaSettings
from attention_backend.testing.paged_cases import make_case, page_summaries


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(context: int, batch: int, page_chunk: int, repeats: int) -> dict:
    case = make_case([context] * batch, num_kv_heads=3, group=3, block_size=128, dtype=torch.float32)
    settings = QadaSettings(stats="pages", page_chunk=page_chunk)
    stats = page_summaries(case, page_chunk).layer(0, CPU_VEC, case.key_cache)
    plan = plan_pages(case.block_table, case.seq_lens, settings, block_size=128, store_chunk=page_chunk)
    n_bulk = context - settings.t_sink - settings.t_local
    pages, partial = int(plan.page_valid[0].sum()), int(plan.exact_valid[0].sum())
    head_bytes = 64 * 4  # one vector of one KV head
    decision_bytes = (2 * pages + partial) * head_bytes  # mean + var per page, keys of partial pages
    bulk_bytes = 2 * n_bulk * head_bytes  # K + V
    estimate_s = best_of(lambda: pages_bulk_lse(CPU_VEC, case.batch(), stats, plan), repeats)
    full = case.batch()._replace(seq_lens=case.seq_lens.int())
    full_s = best_of(lambda: stock_decode(full), repeats)
    return {
        "context": context,
        "batch": batch,
        "page_chunk": page_chunk,
        "decision_bytes_per_bulk_byte": round(decision_bytes / bulk_bytes, 4),
        "estimate_ms": round(1e3 * estimate_s, 3),
        "full_read_ms": round(1e3 * full_s, 3),
        "estimate_per_full_read": round(estimate_s / full_s, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=[2000, 4000, 7000])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--page-chunks", type=int, nargs="+", default=[16, 32, 128])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("results/page_cost.json"))
    args = parser.parse_args()
    rows = []
    print("| context | batch | page | decision bytes / bulk bytes | estimate ms | full read ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    for context in args.contexts:
        for batch in args.batches:
            for chunk in args.page_chunks:
                r = measure(context, batch, chunk, args.repeats)
                rows.append(r)
                print(
                    f"| {context} | {batch} | {chunk} | {r['decision_bytes_per_bulk_byte']:.3f} "
                    f"| {r['estimate_ms']:.2f} | {r['full_read_ms']:.2f} "
                    f"| {r['estimate_per_full_read']:.2f} |",
                    flush=True,
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
