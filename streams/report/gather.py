"""What a report shows, read the way a gate and an analyst would read it.

Every read goes through two calls a worker's API process also offers (streams/api/process.py):
``sink.windows`` and ``sink.readonly_query`` (the analyst session: read-only, row and time limits,
plain table names resolved in the project's database). So the same code makes the report from a
worker's API while the worker holds the chDB path, from a standalone API, and from the database
directly (``shadowlens report`` with an ``http://`` DSN or a chDB path no worker holds).

The verdict is the one a gate reads at that moment (``VerdictBoard.verdict``: a stale rollback
stands, a stale promote is a hold); the rest is evidence around it. A section whose read fails is
shown as unavailable with the one-line cause; the verdict itself never is (no verdict, no report).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from schemas import Verdict, WindowSummary
from schemas.clickhouse import sql_literal
from streams.judge.history import read_history

MAX_REPORT_WINDOWS = 200
MAX_REPORT_CHANGES = 50
MAX_REPORT_EVENTS = 50
EXAMPLE_COLUMNS = ("request_id", "sent_at", "baseline_label", "candidate_label", "label_flip", "confidence_delta",
                   "l1_distance", "baseline_latency_ms", "candidate_latency_ms", "error", "attributes",
                   "metrics")  # fmt: skip
EVENT_COLUMNS = ("at", "version", "source", "state", "sha256", "path", "by", "reason")


@dataclass
class Section:
    """Rows of one part of the report, or why they could not be read (one line)."""

    rows: list[Any] = field(default_factory=list)
    unavailable: str | None = None


@dataclass
class ReportData:
    verdict: Verdict
    windows: Section  # WindowSummary, oldest first
    history: Section  # VerdictChange, newest first
    examples: Section  # dicts of EXAMPLE_COLUMNS, in the verdict's order (largest diffs first)
    registry: Section  # dicts of EVENT_COLUMNS, newest first
    generated_at: datetime
    source: str  # where it was read: "the worker's API", "ClickHouse at http://host:8123", ...


def gather(verdict: Verdict, sink: Any, source: str) -> ReportData:
    """The report of ``verdict``'s pair: ``verdict`` as served to gates, the rest read through ``sink``."""
    model, candidate = verdict.model, verdict.candidate
    return ReportData(
        verdict=verdict,
        windows=_section(lambda: [WindowSummary.model_validate(w) for w in
                                  reversed(sink.windows(model, candidate, limit=MAX_REPORT_WINDOWS))]),
        history=_section(lambda: read_history(sink, model, candidate, MAX_REPORT_CHANGES)),
        examples=_section(lambda: _examples(sink, verdict)),
        registry=_section(lambda: _rows(sink, _events_sql(model, candidate))),
        generated_at=datetime.now(UTC),
        source=source,
    )


def _section(read) -> Section:
    try:
        return Section(rows=read())
    except Exception as exc:  # noqa: BLE001 - the report says what it could not read and goes on
        text = str(exc).strip()
        line = next((x for x in text.splitlines() if "Code:" in x), text.splitlines()[0] if text else "")
        return Section(unavailable=(line or type(exc).__name__)[:300])


def _rows(sink: Any, sql: str) -> list[dict[str, Any]]:
    answer = sink.readonly_query(sql)
    return [dict(zip(answer["columns"], row, strict=True)) for row in answer["rows"]]


def _examples(sink: Any, verdict: Verdict) -> list[dict[str, Any]]:
    """The verdict's example requests (its largest diffs) as stored, in the verdict's order."""
    ids = verdict.example_request_ids[:20]
    if not ids:
        return []
    # Maps as JSON: the analyst session hands back values as text (streams/api/analyst_sql.py).
    columns = [f"toJSONString({c}) AS {c}" if c in ("attributes", "metrics") else c for c in EXAMPLE_COLUMNS]
    sql = (f"SELECT {', '.join(columns)} FROM request_diffs FINAL WHERE model = {sql_literal(verdict.model)} "
           f"AND candidate = {sql_literal(verdict.candidate)} AND request_id IN ({', '.join(map(sql_literal, ids))}) "
           f"LIMIT 1 BY request_id")  # fmt: skip
    by_id = {}
    for row in _rows(sink, sql):
        row["attributes"], row["metrics"] = json.loads(row["attributes"]), json.loads(row["metrics"])
        by_id[row["request_id"]] = row
    return [by_id[i] for i in ids if i in by_id]


def _events_sql(model: str, candidate: str) -> str:
    return (f"SELECT {', '.join(EVENT_COLUMNS)} FROM candidate_events WHERE model = {sql_literal(model)} AND "
            f"candidate = {sql_literal(candidate)} ORDER BY at DESC LIMIT {MAX_REPORT_EVENTS}")
