"""The QAdA Grafana dashboard, as code with Grafana's own SDK (`grafana-foundation-sdk`):
`python docker/grafana/dashboard.py` rewrites docker/grafana/dashboards/qada.json (a test keeps
the two in sync and runs every query against a real Prometheus that scraped a real server)."""

from __future__ import annotations

import json
from pathlib import Path

from grafana_foundation_sdk.builders import common, prometheus, stat, timeseries
from grafana_foundation_sdk.builders.dashboard import Dashboard
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import LegendDisplayMode, LegendPlacement
from grafana_foundation_sdk.models.dashboard import DataSourceRef, GridPos

OUT = Path(__file__).resolve().parent / "dashboards" / "qada.json"
RATE = "[$__rate_interval]"
KV_GROUPS = 'qada_head_decisions_total{level="kv_group"}'
PROMETHEUS = DataSourceRef(type_val="prometheus", uid="prometheus")  # provisioned with this uid
KINDS = {"timeseries": timeseries.Panel, "stat": stat.Panel}
# (title, unit, [(legend, PromQL)], panel type)
PANELS = [
    (
        "Long-context fraction per decode step (KV groups)",
        "percentunit",
        [
            (
                "mean",
                f"sum(rate(qada_long_context_fraction_sum{RATE}))"
                f" / sum(rate(qada_long_context_fraction_count{RATE}))",
            ),
            ("p90", f"histogram_quantile(0.9, sum by (le) (rate(qada_long_context_fraction_bucket{RATE})))"),
        ],
        "timeseries",
    ),
    (
        "Long-context fraction by layer (KV groups)",
        "percentunit",
        [
            (
                "layer {{layer}}",
                f'sum by (layer) (rate(qada_head_decisions_total{{level="kv_group", decision="long"}}{RATE}))'
                f" / sum by (layer) (rate({KV_GROUPS}{RATE}))",
            ),
        ],
        "timeseries",
    ),
    (
        "KV-cache traffic saved",
        "percentunit",
        [
            (
                "share of KV bytes skipped",
                f"sum(rate(qada_kv_bytes_skipped_total{RATE})) / "
                f"(sum(rate(qada_kv_bytes_read_total{RATE})) + sum(rate(qada_kv_bytes_skipped_total{RATE})))",
            ),
        ],
        "timeseries",
    ),
    (
        "KV-cache bytes per second",
        "Bps",
        [
            ("read", f"sum(rate(qada_kv_bytes_read_total{RATE}))"),
            ("skipped", f"sum(rate(qada_kv_bytes_skipped_total{RATE}))"),
            ("key copy read (page_rank_bits)", f"sum(rate(qada_key_copy_bytes_read_total{RATE}))"),
        ],
        "timeseries",
    ),
    (
        "KV blocks of long groups per second (page selection)",
        "short",
        [("{{decision}}", f"sum by (decision) (rate(qada_kv_blocks_total{RATE}))")],
        "timeseries",
    ),
    (
        "Decisions per second",
        "ops",
        [
            ("{{level}} {{decision}}", f"sum by (level, decision) (rate(qada_head_decisions_total{RATE}))"),
        ],
        "timeseries",
    ),
    (
        "Active policy",
        "none",
        [
            (
                "{{policy}} stats={{stats}} tau={{tau}} sink={{t_sink}} local={{t_local}}",
                "qada_policy_info == 1",
            ),
        ],
        "stat",
    ),
    (
        "Token throughput (vLLM)",
        "tps",
        [
            ("generated", f"sum(rate(vllm:generation_tokens_total{RATE}))"),
            ("prompt", f"sum(rate(vllm:prompt_tokens_total{RATE}))"),
        ],
        "timeseries",
    ),
    (
        "Time to first token (vLLM)",
        "s",
        [
            (
                "p50",
                f"histogram_quantile(0.5, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket{RATE})))",
            ),
            (
                "p95",
                f"histogram_quantile(0.95, sum by (le) "
                f"(rate(vllm:time_to_first_token_seconds_bucket{RATE})))",
            ),
        ],
        "timeseries",
    ),
    (
        "Inter-token latency (vLLM)",
        "s",
        [
            (
                "p50",
                f"histogram_quantile(0.5, sum by (le) (rate(vllm:inter_token_latency_seconds_bucket{RATE})))",
            ),
            (
                "p95",
                f"histogram_quantile(0.95, sum by (le) "
                f"(rate(vllm:inter_token_latency_seconds_bucket{RATE})))",
            ),
        ],
        "timeseries",
    ),
    (
        "Requests running and waiting (vLLM)",
        "short",
        [
            ("running", "sum(vllm:num_requests_running)"),
            ("waiting", "sum(vllm:num_requests_waiting)"),
        ],
        "timeseries",
    ),
]


def panel(index: int, title: str, unit: str, targets: list[tuple[str, str]], kind: str):
    built = (
        KINDS[kind]()
        .id(index + 1)
        .title(title)
        .unit(unit)
        .datasource(PROMETHEUS)
        .grid_pos(GridPos(x=12 * (index % 2), y=8 * (index // 2), w=12, h=8))
    )
    if kind == "timeseries":
        legend = common.VizLegendOptions().show_legend(True).display_mode(LegendDisplayMode.LIST)
        legend = legend.placement(LegendPlacement.BOTTOM)
        built = built.legend(legend)
    for i, (legend_format, expr) in enumerate(targets):
        query = prometheus.Dataquery().ref_id(chr(ord("A") + i)).expr(expr).legend_format(legend_format)
        built = built.with_target(query.datasource(PROMETHEUS))
    return built


def dashboard() -> dict:
    """The dashboard as Grafana's JSON model."""
    board = (
        Dashboard("QAdA: long-context heads")
        .uid("qada-overview")
        .tags(["qada", "vllm"])
        .timezone("browser")
        .refresh("5s")
        .time("now-30m", "now")
        .version(1)
    )
    for i, spec in enumerate(PANELS):
        board = board.with_panel(panel(i, *spec))
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"


def queries(board: dict) -> list[str]:
    return [t["expr"] for p in board["panels"] for t in p["targets"]]


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
