"""One layer of decode attention: stock vLLM CPU kernel vs QAdA's `paged_decode`.

Policies: local, static with 1/3 and 2/3 of KV groups long, full, qada (prompt stats; its share
of long groups is data-dependent and reported). Shapes: Hq=9, Hkv=3, D=64, block 128 (SmolLM2-135M),
(B=1, L=2000) and (B=8, L=7000); fp32 and bf16; block tables shuffled ("frag", as
attention_backend.testing.paged_cases.make_case builds them) and laid out in physical order ("contig", as a
fresh vLLM server mostly allocates them). All variants of one configuration are timed interleaved
in the same process; each number is a median over --reps calls. `paged_decode` gets a DecodePlan
built once per step (as the backend shares it across layers); "plan" is the cost of building it.

    python -m benchmarks.kernel_profile                     # threads 1 and 2
    python -m benchmarks.kernel_profile --threads 1 --reps 50

Note: the machine's L3 may hold the whole test cache, so these are warm-cache numbers.
Writes results/kernel_profile.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from attention_backend.cpu_kernel import paged_decode, plan_decode, stock_decode
from attention_backend.kv_layout import CPU_VEC
from attention_backend.moments import fresh_moments
from attention_backend.policy import PolicyInputs
from attention_backend.settings import QadaSettings
from attention_backend.testing.paged_cases import cache_views, make_case
from benchmarks import machine

REPO = Path(__file__).resolve().parent.parent

HQ, HKV, D, BLOCK = 9, 3, 64, 128
SHAPES = [(1, 2000), (8, 7000)]
T_SINK, T_LOCAL = 16, 128


def contiguous(case):
    """The same case with each row's blocks stored in physical order, rows one after another."""
    bs = case.block_size
    table = case.block_table.clone()
    old, new_table, used = [], torch.full_like(table, table.max()), 0
    for b, length in enumerate(case.seq_lens.tolist()):
        nb = -(-length // bs)
        old.append(table[b, :nb].long())
        new_table[b, :nb] = torch.arange(used, used + nb, dtype=table.dtype)
        used += nb
    kv = case.kv[torch.cat(old)].contiguous()
    new_table[new_table >= kv.shape[0]] = 10**6  # keep the out-of-range sentinel
    key_cache, value_cache = cache_views(CPU_VEC, kv)
    return replace(case, kv=kv, key_cache=key_cache, value_cache=value_cache, block_table=new_table)


def variants(case) -> dict:
    """name -> (callable, long-group share): vLLM's kernel (stock), our kernel under each policy,
    and the per-step plan alone."""
    lengths = case.seq_lens.tolist()
    moments = fresh_moments(CPU_VEC, case.key_cache, case.block_table, lengths, T_SINK, T_LOCAL)
    heads = torch.arange(HQ)
    policies = {
        "local": ("local", PolicyInputs()),
        "static 1/3": ("static", PolicyInputs(long_mask=heads < HQ // HKV)),
        "static 2/3": ("static", PolicyInputs(long_mask=heads < 2 * HQ // HKV)),
        "full": ("full", PolicyInputs()),
        "qada": ("qada", PolicyInputs(moments=moments)),
    }
    table = case.block_table.clamp(max=case.kv.shape[0] - 1)  # the stock kernel reads whole rows
    out = {"stock": (partial(stock_decode, case.batch()._replace(block_table=table)), None)}
    for name, (policy, inputs) in policies.items():
        settings = QadaSettings(policy=policy, t_sink=T_SINK, t_local=T_LOCAL)
        plan = plan_decode(case.block_table, case.seq_lens, settings, block_size=BLOCK, num_kv_heads=HKV)
        run = partial(paged_decode, case.batch(), settings, inputs, plan=plan)
        out[name] = (run, run().long_groups.float().mean().item())
    settings = QadaSettings(policy="local", t_sink=T_SINK, t_local=T_LOCAL)
    out["plan"] = (
        partial(plan_decode, case.block_table, case.seq_lens, settings, block_size=BLOCK, num_kv_heads=HKV),
        None,
    )
    return out


def time_interleaved(fns: dict, reps: int) -> dict[str, float]:
    times = {name: [] for name in fns}
    for fn in fns.values():  # warm up
        fn()
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--layouts", nargs="+", default=["frag", "contig"])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", default=str(REPO / "results" / "kernel_profile.json"))
    args = parser.parse_args()

    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for batch, length in SHAPES:
                base = make_case([length] * batch, HKV, HQ // HKV, BLOCK, dtype, seed=batch)
                for layout in args.layouts:
                    case = base if layout == "frag" else contiguous(base)
                    fns = variants(case)
                    ms = time_interleaved({k: v[0] for k, v in fns.items()}, args.reps)
                    for name, (_, share) in fns.items():
                        rows.append(
                            dict(
                                threads=threads,
                                dtype=dtype_name,
                                batch=batch,
                                seq_len=length,
                                layout=layout,
                                variant=name,
                                long_group_share=share,
                                ms=ms[name],
                                speedup_vs_stock=ms["stock"] / ms[name],
                            )
                        )
                    print(
                        f"# done threads={threads} {dtype_name} B={batch} L={length} {layout}",
                        file=sys.stderr,
                        flush=True,
                    )

    print("| threads | dtype | B | L | layout | variant | long groups | ms | x stock |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = "" if r["long_group_share"] is None else f"{r['long_group_share']:.2f}"
        print(
            f"| {r['threads']} | {r['dtype']} | {r['batch']} | {r['seq_len']} | {r['layout']} | "
            f"{r['variant']} | {share} | {r['ms']:.3f} | {r['speedup_vs_stock']:.2f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            dict(
                machine=machine.describe(),
                torch=torch.__version__,
                reps=args.reps,
                rows=rows,
            ),
            indent=1,
        )
    )
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
