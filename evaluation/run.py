"""`qada eval run`: calibrate heads, sweep policies over generated probes on a running QAdA
server, and write results.jsonl, head_profile.json and summary.json into an output directory."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .client import EvalError, ServerClient
from .heads import profile_heads, static_head_files
from .key_stats import key_statistics
from .summary import summarize
from .sweep import DEFAULT_FAMILIES, settings_grid, sweep
from .tasks import TASKS, make_probes

QUICK = dict(
    tasks=["niah_single"],
    contexts=[1024],
    depths=[0.5],
    taus=[0.8],
    fractions=[0.8],
    calib_probes=1,
    families=list(DEFAULT_FAMILIES),
)
FULL = dict(
    tasks=list(TASKS),
    contexts=[2048, 4096],
    depths=[0.5],
    taus=[0.1, 0.3, 0.5, 0.8],
    fractions=[0.5, 0.75, 0.9],
    calib_probes=4,
    families=list(DEFAULT_FAMILIES),
)


def run(
    url: str,
    out: Path,
    model_dir: Path,
    *,
    cache_dir: Path | None = None,
    api_key: str | None = None,
    stock_url: str | None = None,
    files_dir: Path | None = None,
    quick: bool = False,
    protocols=("prompt", "decode"),
    overrides: dict | None = None,
    command: str | None = None,
    log=print,
) -> dict:
    from transformers import AutoTokenizer

    from evaluation.haystack import haystack_text

    plan = {**(QUICK if quick else FULL), **{k: v for k, v in (overrides or {}).items() if v}}
    out.mkdir(parents=True, exist_ok=True)
    client = ServerClient(url, api_key)
    stock = ServerClient(stock_url, api_key) if stock_url else None
    original_policy = client.policy()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    haystack = haystack_text(cache_dir)
    started = time.monotonic()
    try:
        # calibration: other probes (seed 1) than the evaluation's
        calib_probes = make_probes(
            tokenizer, haystack, ["niah_single", "niah_multikey"], plan["contexts"][:1], [0.3, 0.7], seed=1
        )[: plan["calib_probes"]]
        profile = profile_heads(client, calib_probes, tau=0.8, log=log)
        (out / "head_profile.json").write_text(json.dumps(profile))
        static_heads = static_head_files(profile, plan["fractions"], out)
        calib_file = None
        if "qada-calib" in plan["families"]:  # the server reads it from its files directory
            if files_dir is None:
                raise EvalError("qada-calib needs files_dir (--files-dir): the server's attention.files_dir")
            calib_ids = tokenizer.encode(haystack[-40_000:], add_special_tokens=False)[:2048]
            calib_file = "qada-eval-calib.safetensors"
            key_statistics(Path(model_dir), calib_ids, t_sink=16, out=Path(files_dir) / calib_file)

        probes = make_probes(tokenizer, haystack, plan["tasks"], plan["contexts"], plan["depths"])
        grid = settings_grid(plan["taus"], plan["fractions"], static_heads, calib_file, plan["families"])
        results = out / "results.jsonl"
        results.unlink(missing_ok=True)
        log(f"{len(probes)} probes x {len(grid)} settings x {len(protocols)} protocols")
        rows = sweep(client, probes, grid, list(protocols), results, stock=stock, log=log)
    finally:
        client.set_policy(original_policy)
    summary = summarize(rows)
    summary.update(
        command=command,
        model=client.model,
        model_dir=str(model_dir),
        plan=plan,
        protocols=list(protocols),
        probes=len(probes),
        wall_s=round(time.monotonic() - started, 1),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
