"""Backfill: recorded requests (JSONL, or Parquet with pyarrow) into the mirror topic.

Unlike live mirroring, a backfill must not drop: it waits for the producer (backpressure)
instead of using the client's bounded buffer, and every row ends up counted as sent, skipped
(did not validate against ``MirroredRequest``) or failed (the broker did not take it).

A row may carry the optional ``sample_key`` (a JSON field or a Parquet column: the user, session or
device the request came from; integers are taken as their decimal text, null or "" as none): it goes
into the record as the SDK writes it, and is the Kafka key as well (else the request id).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from pydantic import ValidationError

from mirror.config import MirrorConfig
from schemas import MirroredRequest

PARQUET_SUFFIXES = (".parquet", ".pq")
_MAPPING_FIELDS = ("inputs", "baseline_output", "attributes")
_NO_SAMPLE_KEY = {"sample_key"}
_MAX_IN_FLIGHT = 20_000  # delivery futures outstanding before the reader waits


class BackfillError(Exception):
    """The backfill could not run at all (file unreadable, broker unreachable)."""


@dataclass
class BackfillSummary:
    sent: int = 0
    skipped: int = 0
    failed: int = 0
    problems: list[str] = field(default_factory=list)  # "line N: field: problem", in file order
    oldest: datetime | None = None  # sent_at range of the valid rows
    newest: datetime | None = None

    def line(self) -> str:
        return f"sent {self.sent}, skipped {self.skipped}, failed {self.failed}"


Row = tuple[str, dict | None, str | None]  # (where, row, error): where is "line N" / "row N"


def read_rows(path: Path) -> Iterator[Row]:
    """Rows of a JSONL or Parquet file with their position; unreadable ones carry an error."""
    if path.suffix.lower() in PARQUET_SUFFIXES:
        yield from _parquet_rows(path)
        return
    with path.open("r", encoding="utf-8", errors="replace") as lines:
        for number, text in enumerate(lines, 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                yield f"line {number}", None, f"(line): not valid JSON ({exc.msg} at column {exc.colno})"
                continue
            if not isinstance(row, dict):
                yield f"line {number}", None, f"(line): expected a JSON object, got {type(row).__name__}"
                continue
            yield f"line {number}", row, None


def count_rows(path: Path) -> int | None:
    try:
        if path.suffix.lower() in PARQUET_SUFFIXES:
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        with path.open("rb") as f:
            return sum(1 for line in f if line.strip())
    except Exception:
        return None  # only the progress bar's total


def _parquet_rows(path: Path) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise BackfillError("reading Parquet needs pyarrow: pip install 'shadowlens[parquet]'") from exc
    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            number += 1
            yield f"row {number}", _parquet_row(row), None


def _parquet_row(row: dict[str, Any]) -> dict[str, Any]:
    # Nested fields may be stored as JSON text, or as Arrow maps (which read back as pairs).
    for name in _MAPPING_FIELDS:
        value = row.get(name)
        if isinstance(value, str):
            try:
                row[name] = json.loads(value)
            except json.JSONDecodeError:
                pass  # validation reports the field
        elif isinstance(value, list) and all(isinstance(p, tuple) and len(p) == 2 for p in value):
            row[name] = dict(value)
    return {k: v for k, v in row.items() if v is not None or k == "label"}


def validate(row: dict, model: str | None) -> tuple[MirroredRequest | None, list[str]]:
    if model is not None:
        row = {**row, "model": model}
    sample_key = row.get("sample_key")
    if sample_key == "" or (isinstance(sample_key, int) and not isinstance(sample_key, bool)):
        # a user id column of integers (Parquet int64) is that id's text; "" is none, as in publish
        row = {**row, "sample_key": None if sample_key == "" else str(sample_key)}
    try:
        return MirroredRequest.model_validate(row), []
    except ValidationError as exc:
        return None, [f"{'.'.join(str(p) for p in e['loc']) or '(row)'}: {e['msg'].removeprefix('Value error, ')}"
                      for e in exc.errors(include_url=False)]


async def backfill(
    path: Path,
    config: MirrorConfig,
    *,
    model: str | None = None,
    dry_run: bool = False,
    on_row: Callable[[], None] = lambda: None,
    on_problem: Callable[[str], None] = lambda _line: None,
) -> BackfillSummary:
    """Validate every row and (unless ``dry_run``) send the valid ones, keyed by sample key (else
    request id) as the SDK keys them, timestamped with sent_at. Raises ``BackfillError`` only if it
    cannot start."""
    summary = BackfillSummary()

    def problem(text: str) -> None:
        summary.problems.append(text)
        on_problem(text)

    producer = None
    if not dry_run:
        producer = AIOKafkaProducer(**config.producer_kwargs())
        try:
            await asyncio.wait_for(producer.start(), config.delivery_timeout_ms / 1000 + 5)
        except Exception as exc:
            await _stop(producer)
            raise BackfillError(f"cannot reach Kafka at {config.bootstrap}: {exc!r}") from exc
    in_flight: set[asyncio.Future] = set()

    def delivered(where: str, future: asyncio.Future) -> None:
        in_flight.discard(future)
        exc = asyncio.CancelledError() if future.cancelled() else future.exception()
        if exc is None:
            summary.sent += 1
        else:
            summary.failed += 1
            problem(f"{where}: delivery failed: {exc!r}")

    try:
        for where, row, error in read_rows(path):
            on_row()
            if error is None:
                request, errors = validate(row, model)
            else:
                request, errors = None, [error]
            if request is None:
                summary.skipped += 1
                for text in errors:
                    problem(f"{where}: {text}")
                continue
            summary.oldest = min(summary.oldest or request.sent_at, request.sent_at)
            summary.newest = max(summary.newest or request.sent_at, request.sent_at)
            if producer is None:
                summary.sent += 1  # dry run: "would send"
                continue
            try:
                future = await producer.send(
                    # without a sample key the value is what it was before the field existed (as the SDK's)
                    config.topic, request.model_dump_json(exclude=_NO_SAMPLE_KEY if request.sample_key is None
                                                          else None).encode("utf-8"),
                    key=(request.sample_key or request.request_id).encode("utf-8"),
                    timestamp_ms=int(request.sent_at.timestamp() * 1000))
            except Exception as exc:
                summary.failed += 1
                problem(f"{where}: delivery failed: {exc!r}")
                continue
            in_flight.add(future)
            future.add_done_callback(lambda f, w=where: delivered(w, f))
            if len(in_flight) >= _MAX_IN_FLIGHT:
                await asyncio.wait(set(in_flight), return_when=asyncio.FIRST_COMPLETED)
        if in_flight:
            await asyncio.wait(set(in_flight))
    except (OSError, UnicodeError) as exc:
        raise BackfillError(f"cannot read {path}: {exc}") from exc
    finally:
        if producer is not None:
            await _stop(producer)
    return summary


async def _stop(producer: AIOKafkaProducer) -> None:
    try:
        await asyncio.wait_for(producer.stop(), 30)
    except Exception:
        pass
