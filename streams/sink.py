"""ClickHouse access through clickhouse-connect only: chDB (embedded) or an HTTP server, same code.

chDB allows one process per data path and a sync client only, so every call goes through one
lock-guarded client; async callers hop to a thread with ``asyncio.to_thread``.
"""

from __future__ import annotations


import os
import threading
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import clickhouse_connect

from schemas import RequestDiff, Verdict, WindowStats, ddl_statements

DIFF_COLUMNS = [
    "model", "candidate", "request_id", "baseline_version", "sent_at", "scored_at", "baseline_label",
    "candidate_label", "label_flip", "confidence_delta", "l1_distance", "baseline_confidence", "candidate_confidence",
    "baseline_latency_ms",
    "candidate_latency_ms", "error", "label", "attributes", "metrics", "source_partition", "source_offset",
]  # fmt: skip
WINDOW_COLUMNS = list(WindowStats.model_fields)
VERDICT_COLUMNS = ["model", "candidate", "verdict", "samples", "window_start", "window_end", "updated_at", "body"]


class ClickHouseSink:
    def __init__(self, dsn: str, database: str = "shadowlens"):
        self.dsn = dsn = resolve_dsn(dsn)
        self.database = database
        self._lock = threading.Lock()
        self.client = clickhouse_connect.get_client(dsn=dsn)
        for statement in ddl_statements(database):
            self.client.command(statement)

    def close(self) -> None:
        with self._lock:
            self.client.close()

    # -- writes ---------------------------------------------------------------------------
    def insert_diffs(self, diffs: Sequence[RequestDiff]) -> None:
        self._insert("request_diffs", DIFF_COLUMNS, [[getattr(d, c) for c in DIFF_COLUMNS] for d in diffs])

    def insert_windows(self, windows: Sequence[WindowStats]) -> None:
        self._insert("window_stats", WINDOW_COLUMNS, [[getattr(w, c) for c in WINDOW_COLUMNS] for w in windows])

    def insert_verdicts(self, verdicts: Sequence[Verdict]) -> None:
        # The whole verdict is kept as JSON in ``body``; the other columns are for filtering.
        rows = [[*(getattr(v, c) for c in VERDICT_COLUMNS[:-1]), v.model_dump_json()] for v in verdicts]
        self._insert("verdicts", VERDICT_COLUMNS, rows)

    def _insert(self, table: str, columns: list[str], rows: list[list]) -> None:
        if rows:
            with self._lock:
                self.client.insert(f"{self.database}.{table}", rows, column_names=columns)

    # -- reads (verdicts API, demo, tests) --------------------------------------------------
    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple]:
        with self._lock:
            return self.client.query(sql, parameters=parameters or {}).result_rows

    def latest_verdict(self, model: str, candidate: str) -> Verdict | None:
        rows = self.query(
            f"SELECT body FROM {self.database}.verdicts WHERE model = %(m)s AND candidate = %(c)s "
            "ORDER BY updated_at DESC LIMIT 1",
            {"m": model, "c": candidate},
        )
        return Verdict.model_validate_json(rows[0][0]) if rows else None

    def latest_verdicts(self) -> list[Verdict]:
        rows = self.query(
            f"SELECT argMax(body, updated_at) FROM {self.database}.verdicts GROUP BY model, candidate "
            "ORDER BY model, candidate"
        )
        return [Verdict.model_validate_json(r[0]) for r in rows]

    def pair_known(self, model: str, candidate: str) -> bool:
        rows = self.query(
            f"SELECT count() FROM {self.database}.request_diffs WHERE model = %(m)s AND candidate = %(c)s",
            {"m": model, "c": candidate},
        )
        return rows[0][0] > 0

    def windows(self, model: str, candidate: str, limit: int = 100) -> list[dict[str, Any]]:
        cols = [c for c in WINDOW_COLUMNS if c != "state"]
        rows = self.query(
            f"SELECT {', '.join(cols)} FROM {self.database}.window_stats FINAL "
            "WHERE model = %(m)s AND candidate = %(c)s ORDER BY window_start DESC LIMIT %(n)s",
            {"m": model, "c": candidate, "n": limit},
        )
        return [dict(zip(cols, r, strict=True)) for r in rows]

    def scored_positions(
        self, model: str, candidates: list[str], request_ids: list[str]
    ) -> dict[str, dict[str, tuple[int, int]]]:
        """For request ids that already have a diff row: candidate -> id -> source (partition, offset).

        A primary-key lookup (model, candidate, request_id); FINAL is not needed because every
        copy of a row carries the position of the message that first wrote it.
        """
        if not request_ids:
            return {}
        rows = self.query(
            f"SELECT candidate, request_id, source_partition, source_offset FROM {self.database}.request_diffs "
            "WHERE model = %(m)s AND candidate IN %(c)s AND request_id IN %(ids)s",
            {"m": model, "c": candidates, "ids": request_ids},
        )
        out: dict[str, dict[str, tuple[int, int]]] = {}
        for candidate, request_id, partition, offset in rows:
            out.setdefault(candidate, {})[request_id] = (partition, offset)
        return out

    def window_predictions(self, model: str, candidate: str, start: datetime, end: datetime) -> dict[str, list]:
        """Scored rows of one window: both models' top-class confidence and predicted label."""
        rows = self.query(
            f"SELECT baseline_confidence, candidate_confidence, baseline_label, candidate_label "
            f"FROM {self.database}.request_diffs FINAL WHERE model = %(m)s AND candidate = %(c)s "
            "AND sent_at >= %(s)s AND sent_at < %(e)s AND error = ''",
            {"m": model, "c": candidate, "s": start, "e": end},
        )
        columns = ("baseline_confidence", "candidate_confidence", "baseline_label", "candidate_label")
        return {name: [r[i] for r in rows] for i, name in enumerate(columns)}

    def diff_counts(self) -> dict[tuple[str, str], int]:
        """Distinct scored requests per (model, candidate), duplicates collapsed."""
        rows = self.query(
            f"SELECT model, candidate, count() FROM {self.database}.request_diffs FINAL GROUP BY model, candidate"
        )
        return {(m, c): n for m, c, n in rows}


def resolve_dsn(dsn: str) -> str:
    """``chdb:///./data`` means a path relative to the working directory (clickhouse-connect
    would read it as ``/./data``, i.e. from the filesystem root); make it absolute."""
    prefix = "chdb:///"
    if dsn.startswith(prefix) and dsn[len(prefix) :].startswith(("./", "../")):
        return "chdb://" + os.path.abspath(dsn[len(prefix) :])
    return dsn
