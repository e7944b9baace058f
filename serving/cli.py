"""`qada` command line: prepare a model, serve it."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "smollm2-cpu.yaml"


def _prepare(args: argparse.Namespace) -> None:
    from serving.models import prepare_model

    start = time.monotonic()
    path = prepare_model(args.name, args.cache_dir, Path(args.gguf) if args.gguf else None)
    print(f"{path}  ({time.monotonic() - start:.1f} s)")


def _serve(args: argparse.Namespace) -> None:
    import yaml

    from serving.config import ConfigError, load_config
    from serving.launcher import serve

    overrides = {
        "model": args.model,
        "served_model_name": args.served_model_name,
        "host": args.host,
        "port": args.port,
        "api_key": args.api_key,
        "engine.max_model_len": args.max_model_len,
        "attention.enabled": True if args.policy else None,
        "attention.policy": args.policy,
        "attention.tau": args.tau,
        "attention.t_sink": args.t_sink,
        "attention.t_local": args.t_local,
        "attention.stats": args.stats,
    }
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set needs KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    cfg = load_config(args.config, overrides)
    if args.vllm_args:
        cfg.engine.extra_args = cfg.engine.extra_args + args.vllm_args
    serve(cfg, args.cache_dir)


def _heatmap(args: argparse.Namespace) -> None:
    from serving.heatmap import fetch_decisions, plot, run_prompt

    tokens = None
    request_id = args.request_id
    if request_id is None:
        if args.prompt is None:
            raise ValueError("give --request-id or --prompt")
        request_id, tokens = run_prompt(args.url, args.api_key, args.model, args.prompt, args.max_tokens)
    print(plot(fetch_decisions(args.url, request_id, args.api_key), Path(args.output), tokens))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qada", description=__doc__)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="model cache (default $QADA_CACHE_DIR or ~/.cache/qada)")
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare-model", help="download and convert a model into the cache")
    prep.add_argument("name", nargs="?", default="smollm2-135m-instruct",
                      help="smollm2-135m-instruct (default), qwen2.5-coder-0.5b-instruct, "
                           "qwen2.5-coder-1.5b-instruct, or any name with --gguf")
    prep.add_argument("--gguf", help="convert this local GGUF file instead of downloading")
    prep.set_defaults(func=_prepare)

    srv = sub.add_parser("serve", help="serve a model with vLLM's OpenAI-compatible server",
                         epilog="Arguments after `--` go to vLLM unchanged.")
    srv.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (see configs/)")
    srv.add_argument("--model", help="known model name or local Hugging Face directory")
    srv.add_argument("--served-model-name")
    srv.add_argument("--host")
    srv.add_argument("--port", type=int)
    srv.add_argument("--api-key")
    srv.add_argument("--max-model-len", type=int)
    srv.add_argument("--policy", help="enable QAdA attention with this policy "
                                      "(oracle, qada, static, full, local, random)")
    srv.add_argument("--tau", type=float)
    srv.add_argument("--t-sink", type=int)
    srv.add_argument("--t-local", type=int)
    srv.add_argument("--stats", help="qada statistics source: prompt, calib, local")
    srv.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override any config key, e.g. --set engine.dtype=bfloat16")
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
    return parser


def main(argv: list[str] | None = None) -> None:
    from serving.config import ConfigError
    from serving.models import PrepareError

    args = build_parser().parse_args(argv)
    if getattr(args, "prompt_file", None):
        args.prompt = args.prompt_file.read_text()
    try:
        args.func(args)
    except (ConfigError, PrepareError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"qada: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
