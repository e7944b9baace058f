"""GPU benchmark of the QAdA Triton decode kernel (one layer, one decode step) at Llama-3.1-8B
shapes: 32 query heads, 8 KV heads, head dim 128, block 16, bf16 (--dtype), in vLLM's paged NHD layout
(K and V interleaved per token and head) with shuffled block tables.

Compared in the same run, per (context, batch):
  - sdpa: PyTorch SDPA (flash backend where it takes GQA decode) on contiguous K/V [B, Hkv, L, D];
  - vllm: vLLM's own Triton decode kernel (`unified_attention`, called as `TritonAttentionImpl`
    calls it) on the same paged cache, when its files are at --vllm-ops (`make vllm-kernel`
    copies them from a vLLM install; they travel to a GPU machine without vLLM as files);
  - the best full-attention reference per point is the faster of the two;
  - full: our kernel, every group long (policy `full`);
  - frac=f: our kernel with exactly round(f * B * Hkv) KV groups long (random groups, decisions
    forced through the `random` policy's mask), f in --fractions.
Times are medians of CUDA-graph replays (triton.testing.do_bench_cudagraph; --no-graph for
do_bench). "Required" bandwidth counts the K/V bytes the decisions need (local groups:
t_sink + t_local tokens, long groups: the whole context) over the time, next to the copy
bandwidth of a large clone (bytes read + written). A small correctness check against the PyTorch
reference runs first. Needs only torch + Triton (no vLLM):

    make vllm-kernel                                                         # optional reference
    python -m benchmarks.triton_decode --out results/triton_decode          # full sweep
    python -m benchmarks.triton_decode --out /tmp/td --quick                # a few points

Writes results.json, results.csv and speedup.png into --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.benchmark
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from attention_backend.kv_layout import TRITON_NHD
from attention_backend.policy import DecodeBatch, PolicyInputs
from attention_backend.reference import reference_decode
from attention_backend.settings import QadaSettings
from attention_backend.testing.vllm_unified import UnifiedDecode, load
from attention_backend.triton_kernel import alloc_workspace, default_splits, qada_decode

HQ, HKV, D, BLOCK = 32, 8, 128, 16
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def paged_cache(batch: int, ctx: int, gen: torch.Generator, dev: str, dtype: torch.dtype):
    """K/V views [num_blocks, BLOCK, HKV, D] of one randn cache, and a shuffled block table."""
    per_row = -(-ctx // BLOCK)
    num_blocks = batch * per_row
    kv = torch.empty(num_blocks, BLOCK, HKV, 2 * D, dtype=dtype, device=dev).normal_(generator=gen)
    table = torch.randperm(num_blocks, generator=gen, device=dev).view(batch, per_row).to(torch.int32)
    return kv[..., :D], kv[..., D:], table


def group_mask(batch: int, fraction: float, gen: torch.Generator, dev: str) -> torch.Tensor:
    """Bool [B, HQ]: exactly round(fraction * B * HKV) random KV groups long, all their heads."""
    groups = torch.zeros(batch * HKV, dtype=torch.bool, device=dev)
    groups[torch.randperm(batch * HKV, generator=gen, device=dev)[: round(fraction * batch * HKV)]] = True
    return groups.view(batch, HKV).repeat_interleave(HQ // HKV, dim=1)


def timed(fn, graph: bool, dev: str = "cuda") -> float:
    """Median milliseconds (on CPU, of a few wall-clock runs: the smoke run's timings mean nothing)."""
    if dev != "cuda":
        return torch.utils.benchmark.Timer("fn()", globals={"fn": fn}).timeit(3).median * 1e3
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth(dev: str, gib: float = 4.0) -> float:
    """GB/s of a large clone, counting bytes read + written."""
    x = torch.empty(int(gib * 2**30) // 2, dtype=torch.bfloat16, device=dev)
    ms = timed(x.clone, False, dev)
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9


def check(dev: str, args, vllm_kernel):
    """Kernel (and vLLM's kernel) == PyTorch reference on a small case, for `full` and a 25 % mask.
    Returns vLLM's kernel module if it runs here, else None."""
    gen = torch.Generator(device=dev).manual_seed(1)
    dtype = DTYPES[args.dtype]
    k, v, table = paged_cache(2, 1000, gen, dev, dtype)
    seq_lens = torch.tensor([1000, 700], dtype=torch.int32, device=dev)
    q = torch.randn(2, HQ, D, dtype=dtype, device=dev, generator=gen)
    decode = DecodeBatch(q, k, v, table, seq_lens, D**-0.5)
    for policy, mask in (("full", None), ("random", group_mask(2, 0.25, gen, dev))):
        settings = QadaSettings(policy=policy, t_sink=args.t_sink, t_local=args.t_local)
        inputs = PolicyInputs(long_mask=mask)
        got = qada_decode(decode, settings, inputs, tile=args.tile)
        want = reference_decode(TRITON_NHD, decode, settings, inputs).output
        err = (got.output.float().cpu() - want).abs().max().item()
        print(f"check {policy}: max |kernel - reference| = {err:.2e}")
        if not err < 2e-2:
            raise SystemExit(f"kernel disagrees with the reference ({policy}): {err}")
    if vllm_kernel is None:
        return None
    full = reference_decode(TRITON_NHD, decode, QadaSettings(policy="full")).output
    try:
        got = UnifiedDecode(vllm_kernel, 2, HQ, HKV, D, torch.device(dev))(
            q, k, v, table, seq_lens, 1000, D**-0.5, torch.empty_like(q)
        )
    except Exception as e:  # e.g. newer vLLM source on an older Triton: go on without it
        print(f"no vLLM reference: its kernel failed here ({type(e).__name__}: {str(e)[:300]})")
        return None
    err = (got.float().cpu() - full).abs().max().item()
    print(f"check vllm unified_attention: max |vllm - reference| = {err:.2e}")
    if not err < 2e-2:
        raise SystemExit(f"vLLM's kernel disagrees with the reference: {err}")
    return vllm_kernel


def time_sdpa(q: torch.Tensor, ctx: int, gen: torch.Generator, graph: bool) -> tuple[float, str]:
    """Milliseconds of SDPA over contiguous K/V [B, Hkv, L, D] (the flash backend where this torch
    takes GQA decode), and the backends it used."""
    batch, dev = q.shape[0], q.device.type
    kc = torch.randn(batch, HKV, ctx, D, dtype=q.dtype, device=dev, generator=gen)
    vc = torch.randn_like(kc)
    q4 = q.unsqueeze(2)
    choices = {
        "flash": [SDPBackend.FLASH_ATTENTION],
        "flash/efficient/math": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    }
    for name, backends in choices.items():

        def sdpa(backends=backends):
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(q4, kc, vc, scale=D**-0.5, enable_gqa=True)

        try:
            sdpa()
        except RuntimeError:  # this torch's flash path does not take GQA decode
            continue
        return timed(sdpa, graph, dev), name
    raise RuntimeError("no SDPA backend runs this decode")


def run(args, vllm_kernel) -> list[dict]:
    dev = args.device
    gen = torch.Generator(device=dev).manual_seed(0)
    free = torch.cuda.mem_get_info()[0] if dev == "cuda" else float("inf")
    dtype = DTYPES[args.dtype]
    local_tokens = args.t_sink + args.t_local
    token_bytes = 2 * D * torch.finfo(dtype).bits // 8  # K + V of one token, one KV head
    rows = []
    for ctx in args.contexts:
        for batch in args.batches:
            kv_bytes = batch * ctx * HKV * token_bytes
            if 2.3 * kv_bytes > 0.9 * free:  # paged + contiguous copies, plus headroom
                print(f"skip ctx={ctx} batch={batch}: {2 * kv_bytes / 2**30:.1f} GiB of K/V")
                continue
            k, v, table = paged_cache(batch, ctx, gen, dev, dtype)
            seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
            q = torch.randn(batch, HQ, D, dtype=dtype, device=dev, generator=gen)
            t_sdpa, sdpa_backend = time_sdpa(q, ctx, gen, args.graph)
            out = torch.empty_like(q)
            t_vllm = None
            if vllm_kernel is not None:
                unified = UnifiedDecode(vllm_kernel, batch, HQ, HKV, D, torch.device(dev))
                t_vllm = timed(partial(unified, q, k, v, table, seq_lens, ctx, D**-0.5, out), args.graph, dev)
            t_ref, best = min((t_sdpa, "sdpa"), (t_vllm or float("inf"), "vllm"))
            splits = args.splits or default_splits(batch, HKV, torch.device(dev), ctx, args.tile)
            ws = alloc_workspace(batch, HKV, HQ // HKV, D, splits, torch.device(dev))
            variants = [
                ("full", 1.0, QadaSettings(policy="full", t_sink=args.t_sink, t_local=args.t_local), None)
            ]
            for f in args.fractions:
                cfg = QadaSettings(policy="random", t_sink=args.t_sink, t_local=args.t_local)
                variants.append((f"frac={f:g}", f, cfg, group_mask(batch, f, gen, dev).to(torch.int8)))
            for name, fraction, cfg, mask in variants:
                decode = DecodeBatch(q, k, v, table, seq_lens, D**-0.5)
                fn = partial(
                    qada_decode,
                    decode,
                    cfg,
                    PolicyInputs(long_mask=mask),
                    out=out,
                    workspace=ws,
                    splits=splits,
                    tile=args.tile,
                    num_warps=args.num_warps,
                )
                ms = timed(fn, args.graph, dev)
                n_long = round(fraction * batch * HKV)
                required = (n_long * ctx + (batch * HKV - n_long) * min(ctx, local_tokens)) * token_bytes
                rows.append(
                    dict(
                        context=ctx,
                        batch=batch,
                        variant=name,
                        long_fraction=fraction,
                        splits=splits,
                        sdpa_backend=sdpa_backend,
                        ms=ms,
                        sdpa_ms=t_sdpa,
                        vllm_ms=t_vllm,
                        best_reference=best,
                        reference_ms=t_ref,
                        speedup_vs_sdpa=t_sdpa / ms,
                        speedup_vs_best=t_ref / ms,
                        required_gbps=required / (ms * 1e-3) / 1e9,
                        reference_gbps=kv_bytes / (t_ref * 1e-3) / 1e9,
                    )
                )
                vllm_us = f"{t_vllm * 1e3:8.1f}" if t_vllm is not None else "     n/a"
                print(
                    f"ctx={ctx:>6} B={batch:>2} {name:>9}: {ms * 1e3:8.1f} us  sdpa {t_sdpa * 1e3:8.1f} us"
                    f"  vllm {vllm_us} us  x{t_ref / ms:5.2f} vs {best}"
                    f"  {rows[-1]['required_gbps']:7.0f} GB/s",
                    flush=True,
                )
            del k, v, table
            if dev == "cuda":
                torch.cuda.empty_cache()
    return rows


def plot(rows: list[dict], copy_gbps: float, dtype: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(2, len(batches), figsize=(4.5 * len(batches), 7.5), squeeze=False)
    for col, batch in enumerate(batches):
        for name in dict.fromkeys(r["variant"] for r in rows):
            pts = sorted(
                (r["context"], r["speedup_vs_best"], r["required_gbps"])
                for r in rows
                if r["batch"] == batch and r["variant"] == name
            )
            if pts:
                ctx, speed, bw = zip(*pts)
                axes[0][col].plot(ctx, speed, marker="o", label=name)
                axes[1][col].plot(ctx, bw, marker="o", label=name)
        axes[0][col].axhline(1.0, color="gray", lw=0.8)
        axes[1][col].axhline(copy_gbps, color="gray", ls="--", lw=0.8, label="copy")
        axes[0][col].set_title(f"batch {batch}")
        axes[0][col].set_ylabel("speedup vs best full attention")
        axes[1][col].set_ylabel("required KV bytes / time (GB/s)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context (tokens)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    axes[1][0].legend(fontsize=8)
    fig.suptitle(f"QAdA Triton decode, Llama-3.1-8B layer shapes ({dtype}, block 16)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def goals(rows: list[dict]) -> list[dict]:
    """The issue's targets, each at its worst point (None where the sweep has no such point)."""
    full = [r for r in rows if r["variant"] == "full"]
    quarter = [r for r in rows if r["variant"] == "frac=0.25" and r["context"] >= 32768]
    specs = [
        (
            "all groups long: time within 10% of the best full-attention reference",
            full,
            "speedup_vs_best",
            1 / 1.1,
        ),
        (
            "25% groups long, context >= 32k: >= 3x faster than that reference",
            quarter,
            "speedup_vs_best",
            3.0,
        ),
        (
            "all groups long, context >= 32k: bandwidth >= 80% of copy bandwidth",
            [r for r in full if r["context"] >= 32768],
            "required_vs_copy",
            0.8,
        ),
    ]
    out = []
    for goal, points, key, threshold in specs:
        worst = min(points, key=lambda r: r[key], default=None)
        out.append(
            dict(
                goal=goal,
                metric=key,
                threshold=threshold,
                worst=worst and worst[key],
                at=worst and dict(context=worst["context"], batch=worst["batch"]),
                met=None if worst is None else worst[key] >= threshold,
            )
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/triton_decode"))
    p.add_argument(
        "--quick", action="store_true", help="contexts 4k, 32k; batches 1, 16; fractions 0, 0.25, 1"
    )
    p.add_argument("--contexts", type=int, nargs="+", default=[2**k for k in range(11, 18)])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.5, 1.0])
    p.add_argument("--t-sink", type=int, default=16)
    p.add_argument("--t-local", type=int, default=128)
    p.add_argument("--tile", type=int, default=64)
    p.add_argument("--num-warps", type=int, default=4)
    p.add_argument("--splits", type=int, default=None, help="bulk splits (default: heuristic)")
    p.add_argument("--no-graph", dest="graph", action="store_false", help="time eager launches")
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="bf16",
        help="cache dtype (the CPU smoke run takes fp16: the interpreter's bf16 dot is wrong)",
    )
    p.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="cpu: a smoke run of this script under TRITON_INTERPRET=1 at tiny shapes",
    )
    p.add_argument(
        "--vllm-ops",
        type=Path,
        default=Path(__file__).resolve().parent.parent / ".vendor" / "vllm_ops",
        help="directory with vLLM's unified_attention files (`make vllm-kernel`)",
    )
    args = p.parse_args()
    if args.quick:
        args.contexts, args.batches, args.fractions = [4096, 32768], [1, 16], [0.0, 0.25, 1.0]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--device cpu runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    dev = args.device
    args.out.mkdir(parents=True, exist_ok=True)
    vllm_kernel = None
    try:
        vllm_kernel = load(args.vllm_ops)
    except Exception as e:  # missing files, or source this Triton cannot import
        print(f"no vLLM reference: {type(e).__name__}: {e}")
    vllm_kernel = check(dev, args, vllm_kernel)
    copy_gbps = copy_bandwidth(dev, 4.0 if dev == "cuda" else 0.01)
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s (read + write)")
    rows = run(args, vllm_kernel)
    for r in rows:
        r["required_vs_copy"] = r["required_gbps"] / copy_gbps
    summary = goals(rows)
    for g in summary:
        worst = "no point" if g["worst"] is None else f"worst {g['worst']:.2f} at {g['at']}"
        verdict = {True: "met", False: "NOT met", None: "-"}[g["met"]]
        print(f"goal: {g['goal']}: {worst} -> {verdict}")
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu (Triton interpreter; timings meaningless)"
    meta = dict(
        device=name,
        torch=torch.__version__,
        triton=triton.__version__,
        shapes=dict(hq=HQ, hkv=HKV, head_dim=D, block_size=BLOCK, dtype=args.dtype),
        t_sink=args.t_sink,
        t_local=args.t_local,
        tile=args.tile,
        num_warps=args.num_warps,
        cuda_graphs=args.graph,
        copy_gbps=copy_gbps,
        vllm_reference=vllm_kernel is not None,
    )
    (args.out / "results.json").write_text(json.dumps(dict(meta=meta, goals=summary, rows=rows), indent=1))
    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, copy_gbps, args.dtype, args.out / "speedup.png")
    print(f"wrote {args.out}/results.json, results.csv, speedup.png")


if __name__ == "__main__":
    main()
