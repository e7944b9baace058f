"""Pictures for the README: the Grafana dashboard's queries rendered from a real Prometheus, and
one request's decision heatmap.

Starts a QAdA server (SmolLM2, CPU) and Debian's `prometheus` scraping it, sends traffic under a
few policies (switched live through PUT /v1/qada/policy), then renders every dashboard panel
with Prometheus' query_range API into docs/img/dashboard.png (the same PromQL Grafana runs;
Grafana itself cannot be installed here), and `qada heatmap` into docs/img/heatmap.png.

    python -m benchmarks.dashboard_snapshot [--seconds-per-policy 60]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

from evaluation.haystack import haystack_text, passkey_prompt
from serving.heatmap import fetch_decisions, plot, run_prompt
from serving.models import prepare_model
from serving.testing import API_KEY, REPO, SERVED_NAME, Prometheus, Server

POLICIES = [
    {"policy": "full"},
    {"policy": "qada", "tau": 0.8},
    {"policy": "qada", "tau": 0.95},
    {"policy": "oracle", "tau": 0.8},
]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def dashboard_module():
    spec = importlib.util.spec_from_file_location("dashboard", REPO / "docker/grafana/dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def traffic(url: str, prompts: list[str], seconds: float) -> None:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, timeout=600)
    deadline = time.monotonic() + seconds

    async def worker(prompt: str) -> None:
        while time.monotonic() < deadline:
            await client.completions.create(
                model=SERVED_NAME, prompt=prompt, max_tokens=24, extra_body={"ignore_eos": True}
            )

    await asyncio.gather(*(worker(p) for p in prompts))


def render(prometheus: str, start: float, end: float, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    board = dashboard_module().dashboard()
    panels = board["panels"]
    fig, axes = plt.subplots((len(panels) + 1) // 2, 2, figsize=(14, 3.2 * ((len(panels) + 1) // 2)))
    for ax, panel in zip(axes.flat, panels):
        for target in panel["targets"]:
            query = target["expr"].replace("$__rate_interval", "30s")
            reply = httpx.get(
                prometheus + "/api/v1/query_range",
                params={"query": query, "start": start, "end": end, "step": 5},
            ).json()
            for series in reply["data"]["result"]:
                legend = target["legendFormat"]
                for key, value in series["metric"].items():
                    legend = legend.replace("{{" + key + "}}", value)
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                ax.plot(xs, ys, label=legend, linewidth=1)
        ax.set_title(panel["title"], fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("seconds", fontsize=7)
        handles = ax.get_legend_handles_labels()[0]
        if 0 < len(handles) <= 8:
            ax.legend(fontsize=6)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    fig.suptitle(
        "QAdA dashboard queries, rendered from a real Prometheus (policies switched: "
        + ", ".join(f"{p['policy']}{' τ=' + str(p['tau']) if 'tau' in p else ''}" for p in POLICIES)
        + ")",
        fontsize=10,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds-per-policy", type=float, default=60)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    args = parser.parse_args()
    binary = shutil.which("prometheus")
    if binary is None:
        sys.exit("needs Debian's prometheus (make system-deps)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepare_model())
    text = haystack_text()
    prompts = [text[i * 9000 : i * 9000 + 6000] for i in range(3)]
    work = Path(tempfile.mkdtemp(prefix="qada-snapshot-"))
    server = Server(["--config", str(REPO / "configs/smollm2-cpu-qada.yaml")], work / "server.log")
    try:
        server.wait_ready()
        prometheus = Prometheus(binary, server.url.removeprefix("http://"), work)
        try:
            start = time.time()
            for policy in POLICIES:
                httpx.put(server.url + "/v1/qada/policy", json=policy, headers=AUTH).raise_for_status()
                asyncio.run(traffic(server.url, prompts, args.seconds_per_policy))
            time.sleep(3)
            print(render(prometheus.url, start, time.time(), args.out / "dashboard.png"))
        finally:
            prometheus.stop()
        httpx.put(
            server.url + "/v1/qada/policy", json={"policy": "qada", "tau": 0.8}, headers=AUTH
        ).raise_for_status()
        request_id, tokens = run_prompt(
            server.url, API_KEY, SERVED_NAME, passkey_prompt(tokenizer, 3000, 0.5, "71432", text), 24
        )
        print(
            plot(
                fetch_decisions(server.url, request_id, API_KEY),
                args.out / "heatmap.png",
                tokens,
                "passkey prompt (3k tokens), qada τ=0.8: long-context heads (black) per token",
            )
        )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
