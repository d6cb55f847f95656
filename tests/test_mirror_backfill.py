"""`shadowlens mirror backfill` without a broker: reading, validation with line numbers, the
summary and exit codes (delivery into real Kafka is tested in test_mirror_kafka.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mirror.cli import app


def row(request_id: str, **overrides) -> dict:
    r = {"request_id": request_id, "model": "digits", "baseline_version": "v1", "sent_at": "2024-05-01T12:00:00Z",
         "inputs": {"x": {"dtype": "float32", "shape": [1, 2], "data": [[1.0, 2.0]]}},
         "baseline_output": {"probs": {"dtype": "float32", "shape": [2], "data": [0.25, 0.75]}},
         "baseline_latency_ms": 4.5, "attributes": {"country": "de"}}
    r.update(overrides)
    return r


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def invoke(*args: str):
    return CliRunner().invoke(app, ["backfill", *args, "--no-progress"])


def test_dry_run_reports_bad_lines_with_numbers_and_a_summary(tmp_path):
    src = write_jsonl(tmp_path / "rows.jsonl", [
        row("a1"),
        "",
        row("a2", baseline_latency_ms=-1),
        "{not json",
        row("a3", inputs={"x": {"dtype": "float32", "shape": [3], "data": [1, 2]}}),
        [1, 2],
        row("a4"),
    ])
    result = invoke(str(src), "--dry-run")
    assert result.exit_code == 1
    out = result.output
    assert "line 3: baseline_latency_ms: Input should be greater than or equal to 0" in out
    assert "line 4: (line): not valid JSON" in out
    assert "line 5: inputs.x: data: holds 8 bytes but shape [3] of float32 needs 12" in out
    assert "line 6: (line): expected a JSON object, got list" in out
    assert "would send 2, skipped 4, failed 0" in out


def test_all_valid_rows_exit_zero_and_model_override(tmp_path):
    src = write_jsonl(tmp_path / "rows.jsonl", [row("a1", model=None), row("a2")])
    assert invoke(str(src), "--dry-run").exit_code == 1  # a row without a model is invalid ...
    result = invoke(str(src), "--dry-run", "--model", "digits-replay")  # ... unless --model names one
    assert result.exit_code == 0, result.output
    assert "would send 2, skipped 0, failed 0" in result.output


def test_parquet_with_nested_json_or_map_columns(tmp_path):
    rows = [row("p1"), row("p2", baseline_latency_ms=-3)]
    table = pa.table({
        "request_id": [r["request_id"] for r in rows],
        "model": [r["model"] for r in rows],
        "baseline_version": [r["baseline_version"] for r in rows],
        "sent_at": pa.array([1714564800000, 1714564800000], pa.timestamp("ms", tz="UTC")),
        "inputs": [json.dumps(r["inputs"]) for r in rows],
        "baseline_output": [json.dumps(r["baseline_output"]) for r in rows],
        "baseline_latency_ms": [r["baseline_latency_ms"] for r in rows],
        "attributes": pa.array([[("country", "de")], []], pa.map_(pa.string(), pa.string())),
    })
    pq.write_table(table, tmp_path / "rows.parquet")
    result = invoke(str(tmp_path / "rows.parquet"), "--dry-run")
    assert "row 2: baseline_latency_ms" in result.output
    assert "would send 1, skipped 1, failed 0" in result.output


def test_unreachable_broker_exits_2_with_a_message(tmp_path):
    src = write_jsonl(tmp_path / "rows.jsonl", [row("a1")])
    result = invoke(str(src), "--bootstrap", "127.0.0.1:1")
    assert result.exit_code == 2
    assert "cannot reach Kafka at 127.0.0.1:1" in result.output


def test_missing_file_is_a_usage_error(tmp_path):
    assert invoke(str(tmp_path / "nope.jsonl")).exit_code == 2


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_compression_option(tmp_path, compression):
    src = write_jsonl(tmp_path / "rows.jsonl", [row("a1")])
    assert invoke(str(src), "--dry-run", "--compression", compression).exit_code == 0


def test_old_rows_get_a_note_that_they_join_the_live_evidence(tmp_path):
    src = write_jsonl(tmp_path / "rows.jsonl", [row("a1"), row("a2", sent_at="2024-05-03T08:30:00Z")])
    result = invoke(str(src), "--dry-run")
    assert result.exit_code == 0
    assert "note: rows sent_at 2024-05-01 12:00 .. 2024-05-03 08:30 UTC join the evidence" in result.output
    assert "--model <name>-backfill" in result.output
    recent = write_jsonl(tmp_path / "new.jsonl", [row("b1", sent_at=datetime.now(UTC).isoformat())])
    assert "note:" not in invoke(str(recent), "--dry-run").output
