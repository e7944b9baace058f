"""`qada` command line: prepare a model, serve it."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Literal, get_args, get_origin

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "smollm2-cpu.yaml"


def _prepare(args: argparse.Namespace) -> None:
    from serving.models import prepare_model

    start = time.monotonic()
    path = prepare_model(args.name, args.cache_dir, Path(args.gguf) if args.gguf else None)
    print(f"{path}  ({time.monotonic() - start:.1f} s)")


def _serve(args: argparse.Namespace) -> None:
    from serving.launcher import serve

    serve(serve_config(args), args.cache_dir)


def serve_config(args: argparse.Namespace):
    """The ServeConfig `qada serve ARGS` runs: the file, then flags and --set on top of it."""
    import yaml

    from serving.config import ConfigError, load_config

    overrides = {
        "model": args.model,
        "served_model_name": args.served_model_name,
        "host": args.host,
        "port": args.port,
        "api_key": args.api_key,
        "engine.max_model_len": args.max_model_len,
        "attention.enabled": True if getattr(args, "attention.policy") else None,
        **{key: value for key, value in vars(args).items() if key.startswith("attention.")},
    }
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set needs KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    cfg = load_config(args.config, overrides)
    if args.vllm_args:
        cfg.engine.extra_args = cfg.engine.extra_args + args.vllm_args
    return cfg


def _heatmap(args: argparse.Namespace) -> None:
    from serving.heatmap import fetch_decisions, plot, run_prompt

    tokens = None
    request_id = args.request_id
    if request_id is None:
        if args.prompt is None:
            raise ValueError("give --request-id or --prompt")
        request_id, tokens = run_prompt(args.url, args.api_key, args.model, args.prompt, args.max_tokens)
    print(plot(fetch_decisions(args.url, request_id, args.api_key), Path(args.output), tokens))


def _eval_run(args: argparse.Namespace) -> None:
    from evaluation.run import run
    from serving.models import prepare_model

    model_dir = Path(args.model_dir) if args.model_dir else prepare_model(args.model, args.cache_dir)
    overrides = {
        "tasks": args.tasks,
        "contexts": args.contexts,
        "depths": args.depths,
        "taus": args.taus,
        "fractions": args.fractions,
        "families": args.families,
    }
    keys = ("cache_dir", "api_key", "stock_url", "files_dir", "quick", "protocols")
    options = {key: getattr(args, key) for key in keys}
    command = "qada " + " ".join(sys.argv[1:])
    summary = run(args.url, Path(args.out), model_dir, overrides=overrides, command=command, **options)
    print(f"{args.out}: {summary['probes']} probes in {summary['wall_s']} s")


def _eval_report(args: argparse.Namespace) -> None:
    from evaluation.report import write_report

    print(
        write_report([Path(d) for d in args.runs], Path(args.docs), Path(args.notes) if args.notes else None)
    )


def _bench_serve(args: argparse.Namespace) -> None:
    from serving.bench import bench_serve
    from serving.models import prepare_model

    model_dir = Path(args.model_dir) if args.model_dir else prepare_model(args.model, args.cache_dir)
    bench_serve(args.url, args.api_key, model_dir, args.vllm_args)


def _add_attention_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per QAdA setting (`--t-local` sets attention.t_local); `--policy` also enables
    the QAdA backend."""
    from attention_backend.settings import QadaSettings

    group = parser.add_argument_group("QAdA attention (the config's `attention` section)")
    for name, field in QadaSettings.model_fields.items():
        kwargs = {
            "dest": f"attention.{name}",
            "default": None,
            "help": field.description,
            "metavar": name.upper(),
        }
        choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else None
        if choices:  # strings, or ints (`--page-rank-bits 4`)
            kwargs.update(choices=choices, metavar=None, type=type(choices[0]))
        elif field.annotation is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, metavar=None)
        elif get_origin(field.annotation) is tuple:  # layer lists: `--page-rank-layers 2 15`
            kwargs.update(nargs="*", type=int)
        else:
            kwargs["type"] = next(
                t for t in (int, float, str) if t in (field.annotation, *get_args(field.annotation))
            )
        if name == "policy":
            kwargs["help"] = f"enable QAdA attention with this policy ({field.description})"
        group.add_argument("--" + name.replace("_", "-"), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qada", description=__doc__)
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="model cache (default $QADA_CACHE_DIR or ~/.cache/qada)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare-model", help="download and convert a model into the cache")
    prep.add_argument(
        "name",
        nargs="?",
        default="smollm2-135m-instruct",
        help="smollm2-135m-instruct (default), qwen2.5-coder-0.5b-instruct, "
        "qwen2.5-coder-1.5b-instruct, or any name with --gguf",
    )
    prep.add_argument("--gguf", help="convert this local GGUF file instead of downloading")
    prep.set_defaults(func=_prepare)

    srv = sub.add_parser(
        "serve",
        help="serve a model with vLLM's OpenAI-compatible server",
        epilog="Arguments after `--` go to vLLM unchanged.",
    )
    srv.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (see configs/)")
    srv.add_argument("--model", help="known model name or local Hugging Face directory")
    srv.add_argument("--served-model-name")
    srv.add_argument("--host")
    srv.add_argument("--port", type=int)
    srv.add_argument("--api-key")
    srv.add_argument("--max-model-len", type=int)
    _add_attention_flags(srv)
    srv.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set engine.dtype=bfloat16",
    )
    srv.add_argument("vllm_args", nargs="*", help=argparse.SUPPRESS)
    srv.set_defaults(func=_serve)

    heat = sub.add_parser("heatmap", help="PNG of one request's per-token (layer, head) decisions")
    heat.add_argument("--url", default="http://127.0.0.1:8000", help="a running QAdA server")
    heat.add_argument("--api-key")
    heat.add_argument("--request-id", help="a recent response id (cmpl-... / chatcmpl-...)")
    heat.add_argument("--prompt", help="run this prompt (greedy) and show its decisions")
    heat.add_argument("--prompt-file", type=Path, help="read the prompt from a file")
    heat.add_argument("--model")
    heat.add_argument("--max-tokens", type=int, default=32)
    heat.add_argument("-o", "--output", default="qada-heatmap.png")
    heat.set_defaults(func=_heatmap)

    bench = sub.add_parser("bench", help="vLLM's own benchmarks against a running server")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    bench_srv = bench_sub.add_parser(
        "serve",
        help="vLLM's serving benchmark (vllm.benchmarks.serve): TTFT, TPOT, ITL",
        epilog="Arguments after `--` go to vLLM's benchmark, e.g. -- --dataset-name random "
        "--random-input-len 4096 --random-output-len 64 --num-prompts 8 --max-concurrency 8",
    )
    bench_srv.add_argument("--url", default="http://127.0.0.1:8000", help="a running server")
    bench_srv.add_argument("--api-key")
    bench_srv.add_argument("--model", default="smollm2-135m-instruct", help="prepared model (its tokenizer)")
    bench_srv.add_argument("--model-dir", help="the model directory, instead of --model")
    bench_srv.add_argument("vllm_args", nargs="*", help=argparse.SUPPRESS)
    bench_srv.set_defaults(func=_bench_serve)

    ev = sub.add_parser("eval", help="accuracy / sparsity evaluation against a running server")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    ev_run = ev_sub.add_parser("run", help="calibrate heads, then sweep policies over long-context probes")
    ev_run.add_argument("--url", default="http://127.0.0.1:8000", help="a running QAdA server")
    ev_run.add_argument("--stock-url", help="a stock-attention server serving the same model (reference)")
    ev_run.add_argument("--api-key")
    ev_run.add_argument(
        "--model", default="smollm2-135m-instruct", help="prepared model (tokenizer, key statistics)"
    )
    ev_run.add_argument("--model-dir", help="the model directory, instead of --model")
    ev_run.add_argument("--out", required=True, help="output directory")
    ev_run.add_argument(
        "--files-dir",
        type=Path,
        help="the server's attention.files_dir (qada-calib writes its statistics there)",
    )
    ev_run.add_argument("--quick", action="store_true", help="a smoke-test subset (CI)")
    ev_run.add_argument("--protocols", nargs="+", default=["prompt", "decode"], choices=["prompt", "decode"])
    ev_run.add_argument("--tasks", nargs="+")
    ev_run.add_argument("--contexts", nargs="+", type=int)
    ev_run.add_argument("--depths", nargs="+", type=float)
    ev_run.add_argument("--taus", nargs="+", type=float)
    ev_run.add_argument("--fractions", nargs="+", type=float, help="local shares of heads (static, random)")
    ev_run.add_argument("--families", nargs="+", help="setting families to sweep (evaluation.sweep)")
    ev_run.set_defaults(func=_eval_run)
    ev_rep = ev_sub.add_parser("report", help="plots and docs/results.md from run directories")
    ev_rep.add_argument("runs", nargs="+", help="directories written by `qada eval run`")
    ev_rep.add_argument("--docs", default="docs", help="where results.md and its images go")
    ev_rep.add_argument("--notes", help="a Markdown file of findings to put before the runs")
    ev_rep.set_defaults(func=_eval_report)
    return parser


def main(argv: list[str] | None = None) -> None:
    from serving.config import ConfigError
    from serving.models import PrepareError

    args = build_parser().parse_args(argv)
    if getattr(args, "prompt_file", None):
        args.prompt = args.prompt_file.read_text()
    try:
        args.func(args)
    except (ConfigError, PrepareError, FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
        print(f"qada: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
