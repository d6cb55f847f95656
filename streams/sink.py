"""ClickHouse access through clickhouse-connect only: chDB (embedded) or an HTTP server, same code.

chDB allows one process per data path and a sync client only, so every call goes through one
lock-guarded client; async callers hop to a thread with ``asyncio.to_thread``.

Diff rows go in column by column (``insert_diff_batches``): the replay stage already hands them
over as columns, so no per-row Python object is built between decode and insert. ``sent_at`` is
sent as float seconds (clickhouse-connect's DateTime64 writer wants datetime objects; ClickHouse
converts the column on insert, exact to the millisecond).
"""

from __future__ import annotations


import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver import options as _insert_options

import numpy as np

from schemas import RequestDiff, Verdict, WindowStats, ddl_statements
from schemas.clickhouse import sql_literal

DIFF_COLUMNS = [
    "model", "candidate", "request_id", "baseline_version", "sent_at", "scored_at", "baseline_label",
    "candidate_label", "label_flip", "confidence_delta", "l1_distance", "baseline_confidence", "candidate_confidence",
    "baseline_latency_ms",
    "candidate_latency_ms", "error", "label", "attributes", "metrics", "source_partition", "source_offset", "kind",
]  # fmt: skip
# Types the columnar insert sends (ClickHouse converts where the table's differ: seconds -> DateTime64).
DIFF_INSERT_TYPES = [
    "String", "String", "String", "String", "Float64", "Float64", "Int32", "Int32", "UInt8", "Float64", "Float64",
    "Float64", "Float64", "Float64", "Float64", "String", "Nullable(Float64)", "Map(String, String)",
    "Map(String, Float64)", "Int32", "Int64", "String",
]  # fmt: skip
# Also written by the columnar insert (not by ``insert_diffs``): the cluster keys and the replayed
# baseline's latency, which ``shadowlens rejudge`` (streams/judge/rejudge.py) replays through the judge.
REJUDGE_COLUMNS = {"input_hash": "UInt64", "sample_hash": "UInt64", "reference_latency_ms": "Float64"}
WINDOW_COLUMNS = list(WindowStats.model_fields)
VERDICT_COLUMNS = ["model", "candidate", "verdict", "samples", "window_start", "window_end", "updated_at", "body"]


class SinkUnavailable(RuntimeError):
    """The database cannot be opened for a reason an operator fixes; the message is one line
    naming the cause and the fix."""

    says_fix = True  # streams.kafka_io.Health logs the message as it is, without a second hint


class DataPathInUse(SinkUnavailable):
    """Another live process holds the chDB data path: waiting will not help, stop and say so."""


class ClickHouseSink:
    def __init__(self, dsn: str, database: str = "shadowlens", retention_days: int = 30, create: bool = True,
                 analyst_rows_per_s: int | None = None):  # fmt: skip
        """``create=False``: read-only use (``shadowlens query``, ``api``): a chDB path that does not
        exist is an error instead of a new empty database, and no DDL runs. ``analyst_rows_per_s``:
        the analysts' read budget ([api] analyst_rows_per_s; None: the default, 0: none)."""
        self.dsn = dsn = resolve_dsn(dsn)
        self.database = database
        self._lock = threading.Lock()
        self._analyst, self._analyst_lock = None, threading.Lock()  # opened on the first analyst query
        self._analyst_rows_per_s = analyst_rows_per_s
        path = chdb_path(dsn)
        if path is not None and not create and not os.path.isdir(path):
            raise SinkUnavailable(f"no shadowlens data at {path}: run where the worker (or demo) ran, or pass the "
                                  f"full path, e.g. --dsn chdb:///abs/path/shadowlens-data/chdb")
        try:
            with _native_stderr_held(path is not None) as held:
                self.client = clickhouse_connect.get_client(dsn=dsn)
        except Exception as exc:  # noqa: BLE001 - translated into one operator line, or re-raised
            explained = _explain_open_failure(dsn, path, exc)
            if not isinstance(explained, DataPathInUse):
                held.release()  # chDB's own lines may help; a held path is said in one line
            raise explained from exc
        held.release()
        # clickhouse-connect imports pandas (when installed) at the first insert, to ask whether
        # the data is a DataFrame: about a second in the first micro-batch, and a heap that
        # streams.heap.tune_collector would not freeze. Resolve it now, at start-up.
        _insert_options.pd  # noqa: B018 - a lazy attribute; reading it is the point
        if create:
            for statement in ddl_statements(database, retention_days):
                self.client.command(statement)

    def close(self) -> None:
        if self._analyst is not None:
            self._analyst.close()
        with self._lock:
            self.client.close()

    # -- writes ---------------------------------------------------------------------------
    def insert_diffs(self, diffs: Sequence[RequestDiff]) -> None:
        self._insert("request_diffs", DIFF_COLUMNS, [[getattr(d, c) for c in DIFF_COLUMNS] for d in diffs])

    def insert_diff_batches(self, batches: Sequence[Any]) -> None:
        """Columnar insert of ``streams.records.DiffBatch`` objects (one insert for all of them)."""
        batches = [b for b in batches if len(b)]
        if not batches:
            return
        cols = {name: np.concatenate([b.columns[name] for b in batches]) for name in batches[0].columns}
        n = len(cols["sent_ms"])
        label = cols["label"]
        data = [
            [m for b in batches for m in [b.model] * len(b)],
            [c for b in batches for c in [b.candidate] * len(b)],
            [r for b in batches for r in b.request_id],
            [v for b in batches for v in b.baseline_version],
            cols["sent_ms"] / 1000.0,
            np.concatenate([np.full(len(b), b.scored_ms / 1000.0) for b in batches]),
            cols["baseline_label"], cols["candidate_label"], cols["label_flip"],
            np.nan_to_num(cols["confidence_delta"]), np.nan_to_num(cols["l1"]),
            cols["baseline_confidence"], cols["candidate_confidence"],
            cols["baseline_latency_ms"], cols["candidate_latency_ms"],
            [e for b in batches for e in b.error],
            [None if x != x else x for x in label.tolist()],  # NaN -> NULL (no label)
            [a for b in batches for a in b.attributes],
            [m for b in batches for m in _metric_maps(b)],
            cols["source_partition"], cols["source_offset"],
            [k for b in batches for k in [b.kind] * len(b)],
            *(cols[c] for c in REJUDGE_COLUMNS),
        ]  # fmt: skip
        assert all(len(col) == n for col in data)
        with self._lock:
            self.client.insert(f"{self.database}.request_diffs", data, column_names=[*DIFF_COLUMNS, *REJUDGE_COLUMNS],
                               column_type_names=[*DIFF_INSERT_TYPES, *REJUDGE_COLUMNS.values()],
                               column_oriented=True)  # fmt: skip

    def insert_windows(self, windows: Sequence[WindowStats]) -> None:
        self._insert("window_stats", WINDOW_COLUMNS, [[getattr(w, c) for c in WINDOW_COLUMNS] for w in windows])

    def insert_verdicts(self, verdicts: Sequence[Verdict], provenance: Sequence[tuple[str, str]] | None = None) -> None:
        # The whole verdict is kept as JSON in ``body``; the other columns are for filtering.
        rows = [[*(getattr(v, c) for c in VERDICT_COLUMNS[:-1]), v.model_dump_json()] for v in verdicts]
        if provenance is None:  # a retirement, a seeded verdict: no policy, nothing to re-judge
            self._insert("verdicts", VERDICT_COLUMNS, rows)
        else:  # the judge's: (policy_hash, evidence JSON) per verdict (streams/judge/history.py)
            rows = [[*row, *extra] for row, extra in zip(rows, provenance, strict=True)]
            self._insert("verdicts", [*VERDICT_COLUMNS, "policy_hash", "evidence"], rows)

    def insert_candidate_events(self, rows: Sequence[dict[str, Any]]) -> None:
        """Registry records as history rows (streams/registry/events.py makes them)."""
        self._insert("candidate_events", list(rows[0]) if rows else [], [list(r.values()) for r in rows])

    def _insert(self, table: str, columns: list[str], rows: list[list]) -> None:
        if rows:
            with self._lock:
                self.client.insert(f"{self.database}.{table}", rows, column_names=columns)

    # -- reads (verdicts API, demo, tests) --------------------------------------------------
    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple]:
        with self._lock:
            return self.client.query(sql, parameters=parameters or {}).result_rows

    def readonly_query(self, sql: str) -> dict[str, Any]:
        """An analyst's query (``POST /v1/query``): checked by the engine's analysis and run on a
        read-only session of its own, never on the writer's (streams/api/analyst_sql.py says why).
        Returns {"columns": [...], "rows": [[...]]}; raises ``QueryRefused`` (one line) for a 400."""
        return self._analyst_session().run(sql)

    def _analyst_session(self):
        from streams.api.analyst_sql import AnalystSession

        with self._analyst_lock:
            if self._analyst is None:
                chdb = chdb_path(self.dsn) is not None
                # HTTP: plain table names resolve in the project's database (chDB: the session's USE)
                client = clickhouse_connect.get_client(dsn=self.dsn, **({} if chdb else {"database": self.database}))
                budget = {} if self._analyst_rows_per_s is None else {"rows_per_s": self._analyst_rows_per_s}
                self._analyst = AnalystSession(client, self.database, chdb=chdb, **budget)
            return self._analyst

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

    def scored_pairs(self) -> list[tuple[str, str]]:
        """(model, candidate) pairs with at least one diff row (read from the primary key only)."""
        rows = self.query(f"SELECT model, candidate FROM {self.database}.request_diffs GROUP BY model, candidate")
        return [(m, c) for m, c in rows]

    def windows(self, model: str, candidate: str, limit: int = 100) -> list[dict[str, Any]]:
        cols = [c for c in WINDOW_COLUMNS if c != "state"]
        rows = self.query(
            f"SELECT {', '.join(cols)} FROM {self.database}.window_stats FINAL "
            "WHERE model = %(m)s AND candidate = %(c)s ORDER BY window_start DESC LIMIT %(n)s",
            {"m": model, "c": candidate, "n": limit},
        )
        return [dict(zip(cols, r, strict=True)) for r in rows]

    def scored_positions(
        self, pairs: Sequence[tuple[str, str]], request_ids: Sequence[str], since_ms: int, until_ms: int
    ) -> dict[tuple[str, str, str], tuple[int, int]]:
        """Request ids of these (model, candidate) pairs that already have a diff row sent within
        [since, until]: (model, candidate, id) -> the (partition, offset) of the message that wrote it.

        One query for a whole apply. The ``sent_at`` range (the dedup horizon around the batch)
        prunes the table's daily partitions, so the cost does not grow with history; the ids travel
        as one JSON string (binding thousands of literals costs more than the query). FINAL is not
        needed: every copy of a row carries the position of the message that first wrote it.
        """
        ids = sorted(set(request_ids))
        out: dict[tuple[str, str, str], tuple[int, int]] = {}
        for lo in range(0, len(ids), 4000):  # keeps each query under ClickHouse's max_query_size
            out.update(self._scored_positions(pairs, ids[lo : lo + 4000], since_ms, until_ms))
        return out

    def stored_id_hashes(self, model: str, candidate: str, since_ms: int) -> tuple[np.ndarray, np.ndarray]:
        """Hashes (``streams.judge.recent_ids.id_hashes``) of the pair's stored request ids with
        ``sent_at >= since_ms``, and their sent times (ms): what the judge's ``RecentIds`` starts
        from. Numbers only (millions of ids load in a second), from the partitions from ``since_ms`` on."""
        with self._lock:
            rows = self.client.query_np(
                f"SELECT reinterpretAsUInt64(MD5(request_id)) AS h, toUnixTimestamp64Milli(sent_at) AS s "
                f"FROM {self.database}.request_diffs WHERE model = {sql_literal(model)} "
                f"AND candidate = {sql_literal(candidate)} AND sent_at >= fromUnixTimestamp64Milli({int(since_ms)}, 'UTC')"
            )  # fmt: skip
        if not len(rows):
            return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
        return np.ascontiguousarray(rows["h"], dtype=np.uint64), np.ascontiguousarray(rows["s"], dtype=np.int64)

    def _scored_positions(self, pairs, request_ids, since_ms, until_ms):
        models = ", ".join(sql_literal(m) for m in sorted({m for m, _ in pairs}))
        candidates = ", ".join(sql_literal(c) for c in sorted({c for _, c in pairs}))
        # Literals built here, not bound: clickhouse-connect escapes bound strings one character at
        # a time in Python, which cost more than the query for a few thousand ids.
        rows = self.query(
            f"SELECT model, candidate, request_id, source_partition, source_offset FROM {self.database}.request_diffs "
            f"WHERE model IN ({models}) AND candidate IN ({candidates}) "
            f"AND request_id IN (SELECT arrayJoin(JSONExtract({sql_literal(json.dumps(request_ids))}, 'Array(String)'))) "
            f"AND sent_at >= fromUnixTimestamp64Milli({int(since_ms)}, 'UTC') "
            f"AND sent_at <= fromUnixTimestamp64Milli({int(until_ms)}, 'UTC')"
        )  # fmt: skip
        wanted = set(pairs)
        return {(m, c, r): (p, o) for m, c, r, p, o in rows if (m, c) in wanted}

    def diff_counts(self) -> dict[tuple[str, str], int]:
        """Distinct scored requests per (model, candidate), duplicates collapsed."""
        rows = self.query(
            f"SELECT model, candidate, count() FROM {self.database}.request_diffs FINAL GROUP BY model, candidate"
        )
        return {(m, c): n for m, c, n in rows}


def _metric_maps(batch) -> list[dict[str, float]]:
    """The diff rows' typed ``metrics`` map: classification's distances from their columns (as
    before kinds), and the output kind's own metrics (``DiffBatch.metrics``; NaN on error rows)."""
    if batch.kind == "classification" and not batch.metrics:  # the common case, as fast as before kinds
        return [{"linf": a, "hellinger": h, "topk_overlap": k} for a, h, k in zip(
            np.nan_to_num(batch.columns["linf"]).tolist(), np.nan_to_num(batch.columns["hellinger"]).tolist(),
            np.nan_to_num(batch.columns["topk_overlap"]).tolist(), strict=True)]  # fmt: skip
    names, values = [], []
    if batch.kind == "classification":
        names += ["linf", "hellinger", "topk_overlap"]
        values += [np.nan_to_num(batch.columns[n]).tolist() for n in names]
    for name, column in batch.metrics.items():
        names.append(name)
        values.append(np.asarray(column, dtype=np.float64).tolist())
    if not names:
        return [{} for _ in range(len(batch))]
    return [dict(zip(names, row, strict=True)) for row in zip(*values, strict=True)]


class _Held:
    def __init__(self, file=None):
        self.file = file

    def release(self) -> None:
        """Write what chDB printed while opening to the real stderr (once)."""
        if self.file is not None:
            self.file.seek(0)
            data = self.file.read()
            self.file.close()
            self.file = None
            if data:
                os.write(2, data)


@contextlib.contextmanager
def _native_stderr_held(active: bool):
    """chDB prints its own error to file descriptor 2 when a data path is locked ("Code: 76 ...
    Cannot lock file"), before the exception we turn into one line; hold it back meanwhile."""
    if not active:
        yield _Held()
        return
    saved = os.dup(2)
    held = tempfile.TemporaryFile()
    os.dup2(held.fileno(), 2)
    try:
        yield _Held(held)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def chdb_path(dsn: str) -> str | None:
    return dsn[len("chdb://"):] if dsn.startswith("chdb://") else None


def data_path_in_use(path: str) -> DataPathInUse | None:
    """The one-line error for a chDB data path another live process holds, or None when it is free."""
    holder = _chdb_holder(path)
    if holder is None:
        return None
    return DataPathInUse(
        f"the chDB data at {path} is in use by process {holder} (a worker?): chDB allows one process per "
        f"data path. Stop that process, read the verdicts from its API instead, or use a ClickHouse "
        f"server (an http:// DSN) so several processes can share the data")


# What urllib3 says inside "Max retries exceeded ... (Caused by NewConnectionError(...))": the
# cause an operator acts on, without the request URL and the retry bookkeeping around it.
_NETWORK_CAUSES = ("Connection refused", "timed out", "Name or service not known", "nodename nor servname provided",
                   "Temporary failure in name resolution", "No route to host", "Network is unreachable",
                   "Connection reset", "Remote end closed connection")  # fmt: skip


def _explain_open_failure(dsn: str, path: str | None, exc: BaseException) -> BaseException:
    if path is not None:
        in_use = data_path_in_use(path)
        if in_use is not None:
            return in_use
        return SinkUnavailable(f"cannot open chDB at {path}: {_clip(_first_line(exc))}; check that the folder is "
                               f"writable and has free space")
    text = _first_line(exc)
    where = dsn.split("@")[-1]
    cause = next((c for c in _NETWORK_CAUSES if c.lower() in text.lower()), None)
    if cause is None and any(k in text for k in ("Failed to establish", "Max retries")):
        cause = "no connection"
    if cause is not None:
        return SinkUnavailable(f"cannot reach ClickHouse at {where}: {cause.lower()}; is the server running "
                               f"(docker compose up clickhouse)? check [clickhouse] dsn or SHADOWLENS_CLICKHOUSE_DSN")
    if "Authentication" in text or "AUTHENTICATION_FAILED" in text or "password" in text.lower():
        return SinkUnavailable(f"ClickHouse at {where} refused the login: {_clip(text)}; fix the user and password "
                               f"in the DSN")
    return exc


def _clip(text: str, limit: int = 200) -> str:
    """At most ``limit`` characters, cut between words: an operator line is never cut mid-word."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:(") + " …"


def _chdb_holder(path: str) -> int | None:
    """PID of a live process holding a chDB data path (ClickHouse writes it into ``status``)."""
    try:
        with open(os.path.join(path, "status")) as f:
            pid = int(next(line for line in f if line.startswith("PID:")).split(":")[1])
    except (OSError, StopIteration, ValueError):
        return None
    if pid == os.getpid():
        return pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def resolve_dsn(dsn: str) -> str:
    """``chdb:///./data`` means a path relative to the working directory (clickhouse-connect
    would read it as ``/./data``, i.e. from the filesystem root); make it absolute."""
    prefix = "chdb:///"
    if dsn.startswith(prefix) and dsn[len(prefix) :].startswith(("./", "../")):
        return "chdb://" + os.path.abspath(dsn[len(prefix) :])
    return dsn
