"""Where a served decode step's time goes: py-spy samples vLLM's worker process while a batch of
long prompts decodes, and the shares of the functions that matter are printed (inclusive: a
function with everything it calls).

    python -m benchmarks.worker_profile                          # the shipped default, 7k x 8
    python -m benchmarks.worker_profile --set attention.page_rank_bits=4 \
        --set attention.page_budget=0.1                          # top-p 10% by the key copy
    python -m benchmarks.worker_profile --config configs/smollm2-cpu.yaml   # stock

The prompts are prefilled first (prefix cache), so the profiled request prefills only its
uncached tail (vLLM's own kernel: `CPUAttentionBackendImpl.forward` under our backend), then
decodes. Writes results/worker_profile-NAME.json (shares) and the raw py-spy samples beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from benchmarks import machine
from benchmarks.decode_speed import PASSKEY
from evaluation.haystack import haystack_text, passkey_prompt
from serving.models import prepare_model
from serving.testing import REPO, Server, greedy_at_once

PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))  # a dev dependency
MAIN_LOOP = "WorkerProc.worker_busy_loop"
# (label, function name as py-spy reports it)
PARTS = [
    ("attention layers (all of it)", "unified_attention_with_output"),
    ("vLLM's kernel (the long reads and the prefill)", "cpu_attention_with_kv_cache"),
    ("  the prefill of the uncached tail", "CPUAttentionBackendImpl.forward"),
    ("  long groups' reads (virtual sequences)", "stock_decode"),
    ("local pass (C)", "local_attention"),
    ("local pass (PyTorch ops, where the C loop declines)", "_local_attention"),
    ("page estimates (head decisions)", "bulk_lse_and_pages"),
    ("key copy ranking", "key_copy_masses"),
    ("block selection and virtual tables", "select_tables"),
    ("page summaries' refresh", "PageSummaries.refresh"),
    ("linear layers (oneDNN)", "onednn_mm"),
    ("waiting for the scheduler", "MessageQueue.dequeue"),
    ("the whole model step", "GPUModelRunner.execute_model"),
]


def worker_pid(server: Server) -> str:
    ps = subprocess.run(["ps", "-eo", "pid,ppid,comm"], capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in ps.splitlines()[1:]]
    workers = [pid for pid, _, comm in rows if "Worker" in comm]
    if len(workers) != 1:
        raise RuntimeError(f"expected one vLLM worker process, found {workers}")
    return workers[0]


def shares(samples: Path) -> dict[str, float]:
    """Inclusive share of each function in the raw py-spy samples (`frame;frame;... count`) of
    the worker's main thread (its other threads wait on pipes)."""
    counts, total = Counter(), 0
    for line in samples.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if MAIN_LOOP not in stack:
            continue
        total += int(n)
        for name in {frame.split(" (")[0] for frame in stack.split(";")}:
            counts[name] += int(n)
    return {label: round(100 * counts[name] / max(total, 1), 1) for label, name in PARTS}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/smollm2-cpu-qada.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="qada serve --set")
    parser.add_argument("--context", type=int, default=7000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--name", default=None, help="results file suffix (default: from the config)")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepare_model())
    text = haystack_text()
    words = len(text) // args.batch
    prompts = [
        passkey_prompt(tokenizer, args.context, 0.5, PASSKEY, text[i * words :] + text[: i * words])
        for i in range(args.batch)
    ]
    name = args.name or Path(args.config).stem
    out = REPO / "results"
    out.mkdir(exist_ok=True)
    samples = out / f"worker_profile-{name}.txt"
    server_args = ["--config", args.config, "--set", "engine.kv_cache_space_gib=4"]
    server_args += [arg for setting in args.set for arg in ("--set", setting)]
    server = Server(server_args, out / f"worker_profile-{name}.log")
    try:
        server.wait_ready()
        asyncio.run(greedy_at_once(server.url, prompts, 1))  # into the prefix cache
        record = ["record", "--nonblocking", "-r", "200", "-f", "raw", "-o", str(samples)]
        spy = subprocess.Popen(
            [PY_SPY, *record, "-p", worker_pid(server)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(2)  # py-spy attached
        start = time.perf_counter()
        asyncio.run(greedy_at_once(server.url, prompts, args.new_tokens + 1))
        seconds = time.perf_counter() - start
        spy.send_signal(2)
        spy.wait(60)
    finally:
        server.stop()
    result = {
        "machine": machine.describe(),
        "config": args.config,
        "set": args.set,
        "context": args.context,
        "batch": args.batch,
        "tokens_per_s_while_sampled": round(args.batch * args.new_tokens / seconds, 2),
        "shares_percent": shares(samples),
    }
    (out / f"worker_profile-{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
