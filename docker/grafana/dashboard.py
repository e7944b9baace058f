"""The QAdA Grafana dashboard, as code: `python docker/grafana/dashboard.py` rewrites
docker/grafana/dashboards/qada.json (a test keeps the two in sync and runs every query against
a real Prometheus that scraped a real server)."""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "qada.json"
RATE = "[$__rate_interval]"
KV_GROUPS = 'qada_head_decisions_total{level="kv_group"}'

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
        ],
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


def panel(index: int, title: str, unit: str, targets: list[tuple[str, str]], kind: str) -> dict:
    return {
        "id": index + 1,
        "type": kind,
        "title": title,
        "datasource": {"type": "prometheus", "uid": "prometheus"},
        "gridPos": {"x": 12 * (index % 2), "y": 8 * (index // 2), "w": 12, "h": 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "expr": expr,
                "legendFormat": legend,
                "datasource": {"type": "prometheus", "uid": "prometheus"},
            }
            for i, (legend, expr) in enumerate(targets)
        ],
    }


def dashboard() -> dict:
    return {
        "uid": "qada-overview",
        "title": "QAdA: long-context heads",
        "tags": ["qada", "vllm"],
        "timezone": "browser",
        "refresh": "5s",
        "time": {"from": "now-30m", "to": "now"},
        "schemaVersion": 39,
        "version": 1,
        "panels": [panel(i, *spec) for i, spec in enumerate(PANELS)],
    }


def queries(board: dict) -> list[str]:
    return [t["expr"] for p in board["panels"] for t in p["targets"]]


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
