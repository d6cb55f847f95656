"""Schema round trips and validation messages (property tests with hypothesis)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pydantic import ValidationError

from schemas import SUPPORTED_DTYPES, MirroredRequest, Tensor, Verdict, ddl_statements, describe_validation_error

arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.int64, np.int32, np.uint8, np.float16, np.bool_]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
)


@given(arrays)
def test_tensor_round_trip_is_bit_exact(array):
    tensor = Tensor.from_array(array)
    again = Tensor.model_validate_json(tensor.model_dump_json()).to_array()
    assert again.dtype == array.dtype and again.shape == array.shape
    assert again.tobytes() == np.ascontiguousarray(array).tobytes()  # NaN-safe bytewise equality


@given(st.lists(st.integers(-1000, 1000), min_size=1, max_size=20))
def test_nested_lists_are_accepted_and_packed(values):
    tensor = Tensor.model_validate({"dtype": "int64", "shape": [len(values)], "data": values})
    assert tensor.to_array().tolist() == values
    base64.b64decode(tensor.data, validate=True)  # stored compactly, whatever came in


def test_big_endian_input_is_stored_little_endian():
    array = np.arange(4, dtype=">f4")
    raw = base64.b64decode(Tensor.from_array(array).data)
    assert raw == np.arange(4, dtype="<f4").tobytes()


@pytest.mark.parametrize(
    ("payload", "field", "hint"),
    [
        ({"dtype": "float32", "shape": [3], "data": base64.b64encode(b"\0" * 8).decode()}, "data", "shape"),
        ({"dtype": "complex64", "shape": [1], "data": "AAAAAA=="}, "dtype", "one of"),
        ({"dtype": "float32", "shape": [1], "data": "***"}, "data", "base64"),
        ({"dtype": "float32", "shape": [-1], "data": ""}, "shape", ">= 0"),
    ],
)
def test_tensor_errors_name_the_field_and_the_fix(payload, field, hint):
    with pytest.raises(ValidationError) as info:
        Tensor.model_validate(payload)
    message = describe_validation_error(info.value)
    assert f"{field}:" in message and hint in message


def _request(**overrides):
    base = {
        "request_id": "r-1",
        "model": "digits",
        "baseline_version": "v1",
        "sent_at": "2026-11-25T12:00:00Z",
        "inputs": {"pixels": Tensor.from_array(np.zeros((1, 64), np.float32))},
        "baseline_output": {"probabilities": Tensor.from_array(np.full((1, 10), 0.1, np.float32))},
        "baseline_latency_ms": 1.5,
    }
    base.update(overrides)
    return base


@given(
    request_id=st.text(min_size=1, max_size=40),
    latency=st.floats(0, 1e6),
    attributes=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4),
    label=st.none() | st.integers(0, 9),
    offset_minutes=st.integers(-600, 600),
)
@settings(max_examples=60)
def test_mirrored_request_json_round_trip(request_id, latency, attributes, label, offset_minutes):
    sent = datetime(2026, 11, 25, 12, tzinfo=timezone(timedelta(minutes=offset_minutes)))
    event = MirroredRequest.model_validate(
        _request(request_id=request_id, baseline_latency_ms=latency, attributes=attributes, label=label, sent_at=sent)
    )
    again = MirroredRequest.model_validate_json(event.model_dump_json())
    assert again == event
    assert again.sent_at.tzinfo == UTC and again.sent_at == sent


def test_naive_timestamps_are_utc():
    event = MirroredRequest.model_validate(_request(sent_at="2026-11-25T12:00:00"))
    assert event.sent_at == datetime(2026, 11, 25, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"request_id": ""}, "request_id"),
        ({"inputs": {}}, "inputs"),
        ({"baseline_latency_ms": -1}, "baseline_latency_ms"),
        ({"baseline_latency_ms": float("nan")}, "baseline_latency_ms"),
        ({"sent_at": "yesterday"}, "sent_at"),
        ({"schema_version": 2}, "schema_version"),
        ({"unexpected": 1}, "unexpected"),
        ({"inputs": {"pixels": {"dtype": "float32", "shape": [2], "data": [1.0]}}}, "inputs.pixels"),
    ],
)
def test_request_errors_name_the_field(overrides, field):
    with pytest.raises(ValidationError) as info:
        MirroredRequest.model_validate(_request(**overrides))
    assert describe_validation_error(info.value).startswith(field)


@given(st.sampled_from(SUPPORTED_DTYPES), st.lists(st.integers(0, 4), max_size=3))
def test_wrong_byte_count_is_always_rejected(dtype, shape):
    itemsize = np.dtype(dtype).itemsize
    count = int(np.prod(shape)) if shape else 1
    data = base64.b64encode(b"\1" * (count * itemsize + 1)).decode()
    with pytest.raises(ValidationError, match="make shape match the data"):
        Tensor.model_validate({"dtype": dtype, "shape": shape, "data": data})


def test_verdict_json_has_the_fields_gates_read():
    now = datetime.now(UTC)
    verdict = Verdict(model="m", candidate="c", verdict="hold", reasons=["x"], metrics=[], samples=0,
                      window_start=now, window_end=now, updated_at=now)  # fmt: skip
    body = json.loads(verdict.model_dump_json())
    assert {"verdict", "reasons", "metrics", "samples", "window_start", "window_end", "updated_at"} <= set(body)


def test_ddl_is_idempotent_on_chdb(tmp_path):
    import clickhouse_connect

    client = clickhouse_connect.get_client(dsn=f"chdb:///{tmp_path}/ch")
    for _ in range(2):
        for statement in ddl_statements("shadowlens_test"):
            client.command(statement)
    tables = {r[0] for r in client.query("SHOW TABLES FROM shadowlens_test").result_rows}
    assert tables == {"request_diffs", "window_stats", "verdicts", "verdict_changes", "candidate_events"}  # 4th: a view
    with pytest.raises(ValueError, match="database"):
        ddl_statements("bad-name; DROP")


@pytest.mark.parametrize("tensor,message", [
    ({"dtype": "float", "shape": [1, 2], "data": [[1, 2]]}, "inputs.pixels.dtype: 'float' is not supported"),
    ({"dtype": "float32", "shape": [1, 2], "data": {"x": 1}}, "inputs.pixels.data: a dict is not tensor data"),
    ({"dtype": "int8", "shape": [1, 2], "data": [[1, 300]]}, "inputs.pixels.data: cannot read the list as int8"),
])
def test_dtype_mistakes_name_the_real_problem(tensor, message):
    """Backfill files written by hand: each mistake gets its own message, not 'should be a valid string'."""
    import json as _json

    from schemas import decode_request

    event = {"schema_version": 1, "request_id": "r1", "model": "digits", "baseline_version": "v1",
             "sent_at": "2026-11-26T12:00:00Z", "inputs": {"pixels": tensor}, "baseline_latency_ms": 1.0,
             "baseline_output": {"p": {"dtype": "float32", "shape": [1, 2], "data": [[0.5, 0.5]]}}}  # fmt: skip
    rejected = decode_request(_json.dumps(event).encode())
    assert rejected.reason.startswith(message), rejected.reason
    assert "valid string" not in rejected.reason
