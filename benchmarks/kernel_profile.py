"""One layer of decode attention: stock vLLM CPU kernel vs QAdA's `paged_decode`.

Policies: local, static with 1/3 and 2/3 of KV groups long, full, qada (prompt stats; its share
of long groups is data-dependent and reported). Shapes: Hq=9, Hkv=3, D=64, block 128 (SmolLM2-135M),
(B=1, L=2000) and (B=8, L=7000); fp32 and bf16; block tables shuffled ("frag", as
tests/unit/paged_helpers.make_case builds them) and laid out in physical order ("contig", as a
fresh vLLM server mostly allocates them). All variants of one configuration are timed interleaved
in the same process; each number is a median over --reps calls. `paged_decode` gets a DecodePlan
built once per step (as the backend shares it across layers); "plan" is the cost of building it.

    python benchmarks/kernel_profile.py                     # threads 1 and 2
    python benchmarks/kernel_profile.py --threads 1 --reps 50
    python benchmarks/kernel_profile.py --baseline /path/to/old_cpu_kernel.py   # add old kernel

Note: the machine's L3 may hold the whole test cache, so these are warm-cache numbers.
Writes results/kernel_profile.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "unit"))

from attention_backend.cpu_kernel import paged_decode, plan_decode  # noqa: E402
from attention_backend.moments import fresh_moments  # noqa: E402
from attention_backend.policy import PolicyConfig  # noqa: E402
from paged_helpers import make_case  # noqa: E402

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
    num_blocks = kv.shape[0]
    key_cache, value_cache = kv.view(num_blocks, HKV, 2 * bs, D).chunk(2, dim=2)
    out = type(case)(**{**case.__dict__})
    out.kv, out.key_cache, out.value_cache = kv, key_cache, value_cache
    new_table[new_table >= num_blocks] = 10**6  # keep the out-of-range sentinel
    out.block_table = new_table
    return out


def stock_fn(case, dtype):
    from vllm import _custom_ops as ops

    batch = case.query.shape[0]
    seq = case.seq_lens.int()
    qsl = torch.arange(batch + 1, dtype=torch.int32)
    sm = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=batch,
        num_heads=HQ,
        num_kv_heads=HKV,
        head_dim=D,
        seq_lens=seq,
        dtype=dtype,
        query_start_loc=qsl,
        causal=True,
        sliding_window_size=-1,
        isa="vec",
        enable_kv_split=False,
        dynamic_causal=None,
        kv_cache_dtype="auto",
    )
    table = case.block_table.clamp(max=case.kv.shape[0] - 1)
    out = torch.empty_like(case.query)

    def run():
        ops.cpu_attention_with_kv_cache(
            query=case.query,
            key_cache=case.key_cache,
            value_cache=case.value_cache,
            output=out,
            query_start_loc=qsl,
            seq_lens=seq,
            scale=case.scale,
            causal=True,
            alibi_slopes=None,
            sliding_window=-1,
            block_table=table,
            softcap=0,
            scheduler_metadata=sm,
            s_aux=None,
            dynamic_causal=None,
            k_scale=1.0,
            v_scale=1.0,
            kv_cache_dtype="auto",
        )
        return out

    return run


def variants(case, kernels):
    """name -> (callable, long-group share) for the QAdA policies."""
    moments = fresh_moments(case.key_cache, case.block_table, case.seq_lens.tolist(), T_SINK, T_LOCAL)
    group = HQ // HKV
    heads = torch.arange(HQ)
    policies = {
        "local": (PolicyConfig(policy="local", t_sink=T_SINK, t_local=T_LOCAL), {}),
        "static 1/3": (
            PolicyConfig(policy="static", t_sink=T_SINK, t_local=T_LOCAL),
            {"static_mask": heads < group},
        ),
        "static 2/3": (
            PolicyConfig(policy="static", t_sink=T_SINK, t_local=T_LOCAL),
            {"static_mask": heads < 2 * group},
        ),
        "full": (PolicyConfig(policy="full", t_sink=T_SINK, t_local=T_LOCAL), {}),
        "qada": (
            PolicyConfig(policy="qada", stats="prompt", t_sink=T_SINK, t_local=T_LOCAL),
            {"moments": moments},
        ),
    }
    out = {}
    for tag, kernel in kernels.items():
        for name, (cfg, kwargs) in policies.items():
            call_kwargs = dict(kwargs)
            if tag == "new":
                call_kwargs["plan"] = plan_decode(
                    case.block_table, case.seq_lens, cfg, block_size=BLOCK, num_kv_heads=HKV
                )

            def run(cfg=cfg, call_kwargs=call_kwargs, kernel=kernel):
                return kernel(
                    case.query,
                    case.key_cache,
                    case.value_cache,
                    case.block_table,
                    case.seq_lens,
                    case.scale,
                    cfg,
                    **call_kwargs,
                )

            share = run().long_groups.float().mean().item()
            out[name if tag == "new" else f"{name} [{tag}]"] = (run, share)
    cfg = policies["local"][0]
    out["plan"] = (
        lambda: plan_decode(case.block_table, case.seq_lens, cfg, block_size=BLOCK, num_kv_heads=HKV),
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


def load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("attention_backend._baseline_kernel", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.paged_decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--layouts", nargs="+", default=["frag", "contig"])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--baseline", help="path of another cpu_kernel.py to time alongside")
    parser.add_argument("--out", default=str(REPO / "results" / "kernel_profile.json"))
    args = parser.parse_args()

    kernels = {"new": paged_decode}
    if args.baseline:
        kernels["old"] = load_baseline(args.baseline)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for batch, length in SHAPES:
                base = make_case([length] * batch, HKV, HQ // HKV, BLOCK, dtype, seed=batch)
                for layout in args.layouts:
                    case = base if layout == "frag" else contiguous(base)
                    fns = {"stock": (stock_fn(case, dtype), None), **variants(case, kernels)}
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
                machine=platform.processor() or platform.machine(),
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
