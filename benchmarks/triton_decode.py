"""GPU benchmark of the QAdA Triton decode kernel (one layer, one decode step) at Llama-3.1-8B
shapes: 32 query heads, 8 KV heads, head dim 128, block 16, bf16, in vLLM's paged NHD layout
(K and V interleaved per token and head) with shuffled block tables.

Compared in the same run, per (context, batch):
  - sdpa: PyTorch SDPA (flash backend where it takes GQA decode) on contiguous K/V [B, Hkv, L, D],
    the full-attention reference;
  - full: our kernel, every group long (policy `full`);
  - frac=f: our kernel with exactly round(f * B * Hkv) KV groups long (random groups, decisions
    forced through the `random` policy's mask), f in --fractions.
Times are medians of CUDA-graph replays (triton.testing.do_bench_cudagraph; --no-graph for
do_bench). "Required" bandwidth counts the K/V bytes the decisions need (local groups:
t_sink + t_local tokens, long groups: the whole context) over the time, next to the copy
bandwidth of a large clone (bytes read + written). A small correctness check against the PyTorch
reference runs first. Needs only torch + Triton (no vLLM):

    python benchmarks/triton_decode.py --out results/triton_decode          # full sweep
    python benchmarks/triton_decode.py --out /tmp/td --quick                # a few points

Writes results.json, results.csv and speedup.png into --out.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attention_backend.policy import PolicyConfig  # noqa: E402
from attention_backend.triton_kernel import alloc_workspace, default_splits, qada_decode  # noqa: E402
from attention_backend.triton_reference import reference_decode  # noqa: E402

HQ, HKV, D, BLOCK = 32, 8, 128, 16
DTYPE = torch.bfloat16


def paged_cache(batch: int, ctx: int, gen: torch.Generator, dev: str):
    """K/V views [num_blocks, BLOCK, HKV, D] of one randn cache, and a shuffled block table."""
    per_row = -(-ctx // BLOCK)
    num_blocks = batch * per_row
    kv = torch.empty(num_blocks, BLOCK, HKV, 2 * D, dtype=DTYPE, device=dev).normal_(generator=gen)
    table = torch.randperm(num_blocks, generator=gen, device=dev).view(batch, per_row).to(torch.int32)
    return kv[..., :D], kv[..., D:], table


def group_mask(batch: int, fraction: float, gen: torch.Generator, dev: str) -> torch.Tensor:
    """Bool [B, HQ]: exactly round(fraction * B * HKV) random KV groups long, all their heads."""
    groups = torch.zeros(batch * HKV, dtype=torch.bool, device=dev)
    groups[torch.randperm(batch * HKV, generator=gen, device=dev)[: round(fraction * batch * HKV)]] = True
    return groups.view(batch, HKV).repeat_interleave(HQ // HKV, dim=1)


def timed(fn, graph: bool) -> float:
    """Median milliseconds."""
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth(dev: str, gib: float = 4.0) -> float:
    """GB/s of a large clone, counting bytes read + written."""
    x = torch.empty(int(gib * 2**30) // 2, dtype=DTYPE, device=dev)
    ms = triton.testing.do_bench(lambda: x.clone(), warmup=5, rep=50, return_mode="median")
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9


def check(dev: str, args) -> None:
    """Kernel == PyTorch reference (CPU) on a small case, for `full` and a 25 % mask."""
    gen = torch.Generator(device=dev).manual_seed(1)
    k, v, table = paged_cache(2, 1000, gen, dev)
    seq_lens = torch.tensor([1000, 700], dtype=torch.int32, device=dev)
    q = torch.randn(2, HQ, D, dtype=DTYPE, device=dev, generator=gen)
    for policy, mask in (("full", None), ("random", group_mask(2, 0.25, gen, dev))):
        cfg = PolicyConfig(policy=policy, t_sink=args.t_sink, t_local=args.t_local)
        got = qada_decode(q, k, v, table, seq_lens, D**-0.5, cfg, long_mask=mask, tile=args.tile)
        # the reference's random draw differs; give it the same decisions as a per-row static mask
        want = [reference_decode(q[b : b + 1], k, v, table[b : b + 1], seq_lens[b : b + 1], D**-0.5,
                                 PolicyConfig(policy="static", t_sink=args.t_sink, t_local=args.t_local),
                                 static_mask=got.long_heads[b].cpu()).output for b in range(2)]
        err = (got.output.float().cpu() - torch.cat(want)).abs().max().item()
        print(f"check {policy}: max |kernel - reference| = {err:.2e}")
        if not err < 2e-2:
            raise SystemExit(f"kernel disagrees with the reference ({policy}): {err}")


def run(args) -> list[dict]:
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    free = torch.cuda.mem_get_info()[0]
    local_tokens = args.t_sink + args.t_local
    token_bytes = 2 * D * torch.finfo(DTYPE).bits // 8  # K + V of one token, one KV head
    rows = []
    for ctx in args.contexts:
        for batch in args.batches:
            kv_bytes = batch * ctx * HKV * token_bytes
            if 2.3 * kv_bytes > 0.9 * free:  # paged + contiguous copies, plus headroom
                print(f"skip ctx={ctx} batch={batch}: {2 * kv_bytes / 2**30:.1f} GiB of K/V")
                continue
            k, v, table = paged_cache(batch, ctx, gen, dev)
            seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
            q = torch.randn(batch, HQ, D, dtype=DTYPE, device=dev, generator=gen)
            kc = torch.randn(batch, HKV, ctx, D, dtype=DTYPE, device=dev, generator=gen)
            vc = torch.randn_like(kc)
            q4 = q.unsqueeze(2)

            backends = [SDPBackend.FLASH_ATTENTION]

            def sdpa():
                with sdpa_kernel(backends):
                    return F.scaled_dot_product_attention(q4, kc, vc, scale=D**-0.5, enable_gqa=True)

            try:
                sdpa()
                sdpa_backend = "flash"
            except RuntimeError:  # this torch's flash path does not take GQA decode
                backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
                sdpa_backend = "flash/efficient/math"
            t_sdpa = timed(sdpa, args.graph)
            del kc, vc
            splits = args.splits or default_splits(batch, HKV, torch.device(dev), ctx, args.tile)
            ws = alloc_workspace(batch, HKV, HQ // HKV, D, splits, torch.device(dev))
            out = torch.empty_like(q)
            variants = [("full", 1.0, PolicyConfig(policy="full", t_sink=args.t_sink, t_local=args.t_local), None)]
            for f in args.fractions:
                cfg = PolicyConfig(policy="random", t_sink=args.t_sink, t_local=args.t_local)
                variants.append((f"frac={f:g}", f, cfg, group_mask(batch, f, gen, dev).to(torch.int8)))
            for name, fraction, cfg, mask in variants:
                fn = lambda: qada_decode(q, k, v, table, seq_lens, D**-0.5, cfg, long_mask=mask,  # noqa: E731
                                         out=out, workspace=ws, splits=splits, tile=args.tile,
                                         num_warps=args.num_warps)
                ms = timed(fn, args.graph)
                n_long = round(fraction * batch * HKV)
                required = (n_long * ctx + (batch * HKV - n_long) * min(ctx, local_tokens)) * token_bytes
                rows.append(dict(context=ctx, batch=batch, variant=name, long_fraction=fraction,
                                 splits=splits, sdpa_backend=sdpa_backend, ms=ms, sdpa_ms=t_sdpa, speedup_vs_sdpa=t_sdpa / ms,
                                 required_gbps=required / (ms * 1e-3) / 1e9,
                                 sdpa_gbps=batch * ctx * HKV * token_bytes / (t_sdpa * 1e-3) / 1e9))
                print(f"ctx={ctx:>6} B={batch:>2} {name:>9}: {ms * 1e3:8.1f} us  sdpa {t_sdpa * 1e3:8.1f} us"
                      f"  x{t_sdpa / ms:5.2f}  {rows[-1]['required_gbps']:7.0f} GB/s", flush=True)
            del k, v, table
            torch.cuda.empty_cache()
    return rows


def plot(rows: list[dict], copy_gbps: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(2, len(batches), figsize=(4.5 * len(batches), 7.5), squeeze=False)
    for col, batch in enumerate(batches):
        for name in dict.fromkeys(r["variant"] for r in rows):
            pts = sorted((r["context"], r["speedup_vs_sdpa"], r["required_gbps"]) for r in rows
                         if r["batch"] == batch and r["variant"] == name)
            if pts:
                ctx, speed, bw = zip(*pts)
                axes[0][col].plot(ctx, speed, marker="o", label=name)
                axes[1][col].plot(ctx, bw, marker="o", label=name)
        axes[0][col].axhline(1.0, color="gray", lw=0.8)
        axes[1][col].axhline(copy_gbps, color="gray", ls="--", lw=0.8, label="copy")
        axes[0][col].set_title(f"batch {batch}")
        axes[0][col].set_ylabel("speedup vs SDPA")
        axes[1][col].set_ylabel("required KV bytes / time (GB/s)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context (tokens)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    axes[1][0].legend(fontsize=8)
    fig.suptitle("QAdA Triton decode, Llama-3.1-8B layer shapes (bf16, block 16)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/triton_decode"))
    p.add_argument("--quick", action="store_true", help="contexts 4k, 32k; batches 1, 16; fractions 0, 0.25, 1")
    p.add_argument("--contexts", type=int, nargs="+", default=[2**k for k in range(11, 18)])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.5, 1.0])
    p.add_argument("--t-sink", type=int, default=16)
    p.add_argument("--t-local", type=int, default=128)
    p.add_argument("--tile", type=int, default=64)
    p.add_argument("--num-warps", type=int, default=4)
    p.add_argument("--splits", type=int, default=None, help="bulk splits (default: heuristic)")
    p.add_argument("--no-graph", dest="graph", action="store_false", help="time eager launches")
    args = p.parse_args()
    if args.quick:
        args.contexts, args.batches, args.fractions = [4096, 32768], [1, 16], [0.0, 0.25, 1.0]
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    check("cuda", args)
    copy_gbps = copy_bandwidth("cuda")
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s (read + write)")
    rows = run(args)
    for r in rows:
        r["required_vs_copy"] = r["required_gbps"] / copy_gbps
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                shapes=dict(hq=HQ, hkv=HKV, head_dim=D, block_size=BLOCK, dtype=str(DTYPE)),
                t_sink=args.t_sink, t_local=args.t_local, tile=args.tile, num_warps=args.num_warps,
                cuda_graphs=args.graph, copy_gbps=copy_gbps)
    (args.out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, copy_gbps, args.out / "speedup.png")
    print(f"wrote {args.out}/results.json, results.csv, speedup.png")


if __name__ == "__main__":
    main()
