"""What page selection costs per layer on CPU, next to what it saves: `paged_decode` with every
KV group long (head decisions only, then with page selection by the page estimates, by partial
key scores or by the 4-bit key copy), vLLM's kernel reading everything, and the selection's own
steps alone, at SmolLM2's shapes (Hkv 3, G 3, D 64, fp32, 128-token blocks, pages of 32).

    python -m benchmarks.page_select_cost                  # 7k x batch 1/8
    python -m benchmarks.page_select_cost --contexts 4000 7000 --batches 8

Writes results/page_select_cost.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from attention_backend.cpu_kernel import paged_decode, stock_decode
from attention_backend.page_select import key_copy_masses, key_dim_masses, select_blocks
from attention_backend.settings import QadaSettings
from attention_backend.testing.paged_cases import make_case, page_summaries, policy_inputs
from benchmarks.page_cost import best_of

# tau 0.01: every group long, so that the long read (what selection shrinks) is all there is
VARIANTS = {
    "head decisions only": {},
    "top-16 blocks by page estimates": {"page_top_k": 16},
    "top-4 blocks by 16 key dims": {"page_top_k": 4, "page_rank_dims": 16},
    "top-p 10% by the 4-bit key copy": {"page_budget": 0.1, "page_rank_bits": 4},
}


def measure(context: int, batch: int, repeats: int) -> dict:
    case = make_case([context] * batch, num_kv_heads=3, group=3, block_size=128, dtype=torch.float32)
    row = {"context": context, "batch": batch}
    full = case.batch()._replace(seq_lens=case.seq_lens.int())
    row["vLLM kernel, everything"] = best_of(lambda: stock_decode(full), repeats)
    for name, selection in VARIANTS.items():
        settings = QadaSettings(policy="qada", stats="pages", tau=0.01, **selection)
        inputs = policy_inputs(case, settings)
        row[name] = best_of(lambda s=settings, i=inputs: paged_decode(case.batch(), s, i), repeats)
    # the selection's own steps, for every (row, KV head)
    settings = QadaSettings(policy="qada", stats="pages", page_top_k=4, page_rank_dims=16)
    q = (case.query * case.scale).view(batch, 3, 3, 64)
    pairs = torch.arange(batch * 3)
    rows = pairs // 3
    tables, lengths = case.block_table[rows], case.seq_lens[rows]
    masses, total = key_dim_masses(q.flatten(0, 1), pairs % 3, case.key_cache, tables, lengths, 16)
    row["partial key scores (16 dims)"] = best_of(
        lambda: key_dim_masses(q.flatten(0, 1), pairs % 3, case.key_cache, tables, lengths, 16), repeats
    )
    row["select_blocks"] = best_of(lambda: select_blocks(masses, total, lengths, settings, 128), repeats)
    copy = page_summaries(case, 32, key_bits=4).key_copy(0, case.layout, case.key_cache)
    for name, native in (("key copy scores (4 bits), C kernel", True), ("the same by PyTorch ops", False)):
        row[name] = best_of(
            lambda n=native: key_copy_masses(
                q.flatten(0, 1), pairs % 3, copy, tables, lengths, 128, native=n
            ),
            repeats,
        )
    return {k: v if k in ("context", "batch") else round(1e3 * v, 3) for k, v in row.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=[7000])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (the serving worker has one core)"
    )
    parser.add_argument("--out", type=Path, default=Path("results/page_select_cost.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(c, b, args.repeats) for c in args.contexts for b in args.batches]
    keys = [k for k in rows[0] if k not in ("context", "batch")]
    print("| context | batch | " + " | ".join(f"{k} (ms)" for k in keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['context']} | {r['batch']} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
