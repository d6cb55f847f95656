"""ClickHouse DDL for shadowlens, version 1. Every statement is idempotent (IF NOT EXISTS).

Why these engines:
- ``request_diffs`` is a ReplacingMergeTree ordered by (model, candidate, hour of sent_at,
  request_id): a message redelivered by Kafka (at-least-once) writes the same key again (same
  ``sent_at``) and collapses on merge; queries that count use ``FINAL`` so a not-yet-merged
  duplicate never counts twice. The hour in the key lets the judge's producer-retry lookup (ids
  within the dedup horizon of ``sent_at``) read only the granules of those hours, whatever the
  table holds; a bloom-filter index keeps lookups by request id alone fast for analysts.
- ``request_diffs`` is partitioned by day of ``sent_at`` and dropped after ``retention_days``
  (TTL): the judge's producer-retry lookup names a ``sent_at`` range (the dedup horizon), so it
  reads the few partitions of that range whatever the table's history, and disk stays bounded.
  The min/max skip index on ``sent_at`` prunes further inside a partition.
- ``window_stats`` is keyed by (model, candidate, window_start) the same way, so re-emitting a
  window after a restart replaces it.
- ``verdicts`` keeps history (plain MergeTree); the latest per pair is ``argMax(..., updated_at)``.
"""

from __future__ import annotations

DDL_VERSION = 2  # 2: request_diffs partitioned by day with a retention TTL

TABLES = ("request_diffs", "window_stats", "verdicts")


def ddl_statements(database: str, retention_days: int = 30) -> list[str]:
    db = _ident(database)
    days = int(retention_days)
    if days < 1:
        raise ValueError(f"retention_days: {retention_days} must be >= 1")
    return [
        f"CREATE DATABASE IF NOT EXISTS {db}",
        f"""CREATE TABLE IF NOT EXISTS {db}.request_diffs (
    model LowCardinality(String),
    candidate LowCardinality(String),
    request_id String,
    baseline_version LowCardinality(String),
    sent_at DateTime64(3, 'UTC'),
    scored_at DateTime64(3, 'UTC'),
    baseline_label Int32,
    candidate_label Int32,
    label_flip UInt8,
    confidence_delta Float64,
    l1_distance Float64,
    baseline_confidence Float64,
    candidate_confidence Float64,
    baseline_latency_ms Float64,
    candidate_latency_ms Float64,
    error String,
    label Nullable(Float64),
    attributes Map(String, String),
    metrics Map(String, Float64),
    source_partition Int32,
    source_offset Int64,
    INDEX sent_at_range sent_at TYPE minmax GRANULARITY 4,
    INDEX request_id_lookup request_id TYPE bloom_filter GRANULARITY 4
) ENGINE = ReplacingMergeTree(scored_at)
PARTITION BY toYYYYMMDD(sent_at)
ORDER BY (model, candidate, toStartOfHour(sent_at), request_id)
TTL toDateTime(sent_at) + INTERVAL {days} DAY""",
        # A table made by an earlier run keeps its partitioning; its retention follows the config.
        f"ALTER TABLE {db}.request_diffs MODIFY TTL toDateTime(sent_at) + INTERVAL {days} DAY",
        f"""CREATE TABLE IF NOT EXISTS {db}.window_stats (
    model LowCardinality(String),
    candidate LowCardinality(String),
    window_start DateTime64(3, 'UTC'),
    window_end DateTime64(3, 'UTC'),
    requests UInt64,
    errors UInt64,
    label_flips UInt64,
    flip_rate Nullable(Float64),
    mean_abs_confidence_delta Nullable(Float64),
    baseline_latency_p50_ms Nullable(Float64),
    baseline_latency_p95_ms Nullable(Float64),
    baseline_latency_p99_ms Nullable(Float64),
    candidate_latency_p50_ms Nullable(Float64),
    candidate_latency_p95_ms Nullable(Float64),
    candidate_latency_p99_ms Nullable(Float64),
    duplicates_dropped UInt64,
    divergence Map(String, Float64),
    state String,
    updated_at DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree(updated_at)
ORDER BY (model, candidate, window_start)""",
        f"""CREATE TABLE IF NOT EXISTS {db}.verdicts (
    model LowCardinality(String),
    candidate LowCardinality(String),
    verdict LowCardinality(String),
    samples UInt64,
    window_start DateTime64(3, 'UTC'),
    window_end DateTime64(3, 'UTC'),
    updated_at DateTime64(3, 'UTC'),
    body String
) ENGINE = MergeTree
ORDER BY (model, candidate, updated_at)""",
    ]


def _ident(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise ValueError(f"database: {name!r} must be letters, digits and underscores")
    return name
