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
- Output kinds (scorers/kinds): every kind writes the same ``request_diffs`` columns (README, "Output
  kinds", says what the gated ones hold per kind), its name in ``kind`` and its own per-request
  metrics in the typed ``metrics`` map; ``window_stats`` has the kind and the window's mean of each
  of them. Tables made before kinds get the columns by ``ADD COLUMN IF NOT EXISTS`` (their rows
  read as classification, the only kind there was).
"""

from __future__ import annotations

DDL_VERSION = 3  # 2: request_diffs partitioned by day with a retention TTL; 3: output kinds

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
    kind LowCardinality(String) DEFAULT 'classification',
    input_hash UInt64 DEFAULT 0,
    sample_hash UInt64 DEFAULT 0,
    reference_latency_ms Float64 DEFAULT nan,
    INDEX sent_at_range sent_at TYPE minmax GRANULARITY 4,
    INDEX request_id_lookup request_id TYPE bloom_filter GRANULARITY 4
) ENGINE = ReplacingMergeTree(scored_at)
PARTITION BY toYYYYMMDD(sent_at)
ORDER BY (model, candidate, toStartOfHour(sent_at), request_id)
TTL toDateTime(sent_at) + INTERVAL {days} DAY""",
        # A table made by an earlier run keeps its partitioning; its retention follows the config.
        f"ALTER TABLE {db}.request_diffs MODIFY TTL toDateTime(sent_at) + INTERVAL {days} DAY",
        f"ALTER TABLE {db}.request_diffs ADD COLUMN IF NOT EXISTS kind LowCardinality(String) DEFAULT 'classification'",
        # What the judge keys clusters by and pairs latency with: `shadowlens rejudge` (streams/judge/rejudge.py)
        # replays stored rows through the judge, and needs them to reproduce its verdicts exactly.
        *(f"ALTER TABLE {db}.request_diffs ADD COLUMN IF NOT EXISTS {c}" for c in REJUDGE_DIFF_COLUMNS),
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
    updated_at DateTime64(3, 'UTC'),
    kind LowCardinality(String) DEFAULT 'classification',
    metrics Map(String, Float64)
) ENGINE = ReplacingMergeTree(updated_at)
ORDER BY (model, candidate, window_start)""",
        f"ALTER TABLE {db}.window_stats ADD COLUMN IF NOT EXISTS kind LowCardinality(String) DEFAULT 'classification'",
        f"ALTER TABLE {db}.window_stats ADD COLUMN IF NOT EXISTS metrics Map(String, Float64)",
        f"""CREATE TABLE IF NOT EXISTS {db}.verdicts (
    model LowCardinality(String),
    candidate LowCardinality(String),
    verdict LowCardinality(String),
    samples UInt64,
    window_start DateTime64(3, 'UTC'),
    window_end DateTime64(3, 'UTC'),
    updated_at DateTime64(3, 'UTC'),
    body String,
    policy_hash String DEFAULT '',
    evidence String DEFAULT ''
) ENGINE = MergeTree
ORDER BY (model, candidate, updated_at)""",
        # The policy a verdict was judged under, and what it rested on (streams/judge/history.py): tables
        # made before them get them empty (such verdicts cannot be re-judged).
        f"ALTER TABLE {db}.verdicts ADD COLUMN IF NOT EXISTS policy_hash String DEFAULT ''",
        f"ALTER TABLE {db}.verdicts ADD COLUMN IF NOT EXISTS evidence String DEFAULT ''",
        # The candidate registry's history for analysts (the compacted topic keeps only the last
        # record per key): every record the judge saw, by source (record: an operator's or the
        # seed's write; status: a replay process's; verdict: the judge's promoted / rolled_back).
        # Replacing on the whole event, so a judge that re-reads the topic after a restart adds nothing.
        f"""CREATE TABLE IF NOT EXISTS {db}.candidate_events (
    at DateTime64(3, 'UTC'),
    model LowCardinality(String),
    candidate LowCardinality(String),
    version UInt32,
    pair LowCardinality(String),
    source LowCardinality(String),
    state LowCardinality(String),
    sha256 String,
    path String,
    policy_version UInt32,
    policy String,
    by String,
    reason String,
    start_offsets String,
    stop_offsets String
) ENGINE = ReplacingMergeTree
ORDER BY (model, candidate, version, at, source, state)""",
        verdict_changes_view(db),
    ]


def sql_literal(text: str) -> str:
    """A ClickHouse string literal: backslash and quote escaped (str.replace runs in C). For values
    in statements built as text (the analyst session takes no parameters); never for identifiers."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _ident(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise ValueError(f"database: {name!r} must be letters, digits and underscores")
    return name


# request_diffs columns `shadowlens rejudge` needs to replay stored rows through the judge exactly
# (cluster keys, the replayed baseline's latency for paired latency); also in the CREATE above.
REJUDGE_DIFF_COLUMNS = (
    "input_hash UInt64 DEFAULT 0",
    "sample_hash UInt64 DEFAULT 0",
    "reference_latency_ms Float64 DEFAULT nan",
)


def verdict_changes_view(db: str) -> str:
    """Every verdict *change* per pair (the first verdict too, from NULL): from, to, when, samples,
    the metric that decided and the policy it was judged under. A view (no storage, always current),
    replaced on every start so a newer definition takes over. ``decided_by``: on a rollback the first
    failing critical metric, else the first failing metric that gates (informational ones say so in
    their detail), else ``slices``; on a hold its ``blocking_metric`` (``retired`` for a retirement);
    on a promote ``all_gating``. GET /v1/verdicts/{model}/{candidate}/history reads it."""
    metrics = "JSONExtractArrayRaw(body, 'metrics')"
    failing = (f"arrayFilter(m -> JSONExtractString(m, 'decision') = 'fail' AND NOT startsWith("
               f"JSONExtractString(m, 'detail'), 'informational'), {metrics})")
    names = "arrayMap(m -> JSONExtractString(m, 'name'), {})"
    critical = names.format(f"arrayFilter(m -> JSONExtractBool(m, 'critical'), {failing})")
    return f"""CREATE OR REPLACE VIEW {db}.verdict_changes AS
SELECT model, candidate, if(look = 1, NULL, previous) AS from_verdict, to_verdict, changed_at, samples,
    nullIf(decided_by, '') AS decided_by, policy_hash, state, reason, look
FROM (
    SELECT model, candidate, toString(verdict) AS to_verdict, updated_at AS changed_at, samples, policy_hash,
        lagInFrame(toString(verdict)) OVER pair AS previous,
        row_number() OVER pair AS look,
        JSONExtractString(body, 'state') AS state,
        JSONExtractString(body, 'reasons', 1) AS reason,
        multiIf(
            verdict = 'rollback', if(notEmpty({critical}), {critical}[1],
                                     if(notEmpty({names.format(failing)}), {names.format(failing)}[1], 'slices')),
            verdict = 'hold', if(state = 'retired', 'retired', JSONExtractString(body, 'blocking_metric')),
            'all_gating') AS decided_by
    FROM {db}.verdicts
    WINDOW pair AS (PARTITION BY model, candidate ORDER BY updated_at ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
)
WHERE look = 1 OR to_verdict != previous"""
