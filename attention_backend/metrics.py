"""Prometheus metrics of the decode-time decisions, written by the worker processes that make them
(under tensor or pipeline parallel, each for its share of the model: the counters add up).

With PROMETHEUS_MULTIPROC_DIR set before launch (`qada serve` does), prometheus_client writes
these to files that vLLM's API server aggregates into its `/metrics`. Names carry the frozen
prefix `qada_` (never `vllm:`, which vLLM unregisters); labels stay low-cardinality (per layer at
most, never per head or request).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

HEAD_DECISIONS = Counter(
    "qada_head_decisions",
    "Decode-time attention decisions: query heads (level=head) and KV "
    "groups (level=kv_group) that read the long context or only sinks + recent tokens",
    ["decision", "level", "layer"],
)
LONG_CONTEXT_FRACTION = Histogram(
    "qada_long_context_fraction",
    "Per decode step and worker: share of the worker's KV groups (its layers, all rows) that "
    "read the long context (one worker, unless tensor or pipeline parallel)",
    buckets=[i / 20 for i in range(21)],
)
KV_BYTES_READ = Counter(
    "qada_kv_bytes_read",
    "KV-cache bytes the decisions required reading (long groups: the whole context, or with "
    "page selection the blocks selected; local groups: sinks + recent tokens)",
    ["layer"],
)
KV_BYTES_SKIPPED = Counter(
    "qada_kv_bytes_skipped",
    "KV-cache bytes that full attention would have read and the decisions skipped",
    ["layer"],
)
KV_BLOCKS = Counter(
    "qada_kv_blocks",
    "With page selection: KV blocks of the long KV groups' contexts read (sink and window blocks "
    "and the selected ones) or skipped (decision=read|skipped)",
    ["decision", "layer"],
)
KEY_COPY_BYTES_READ = Counter(
    "qada_key_copy_bytes_read",
    "With page_rank_bits: bytes of the low-bit key copy beside the KV cache (codes and their "
    "chunks' min / max) that page selection's ranking read (not counted in qada_kv_bytes_read)",
    ["layer"],
)
POLICY = Gauge(
    "qada_policy_info",
    "The active attention policy (value 1; 0 for policies no longer active)",
    ["policy", "stats", "tau", "t_sink", "t_local"],
    multiprocess_mode="mostrecent",
)


def policy_changed(old, new) -> None:
    """Mark `new` (QadaSettings) as the active policy, and `old` (or None) as no longer active."""
    for settings, value in ((old, 0), (new, 1)):
        if settings is not None:
            labels = (
                settings.policy,
                settings.stats,
                f"{settings.tau:g}",
                str(settings.t_sink),
                str(settings.t_local),
            )
            POLICY.labels(*labels).set(value)
