"""The mirror's direct encoder produces what schemas/ expects: parsed back with
MirroredRequest.model_validate_json it equals the model built with Tensor.from_array."""

from __future__ import annotations

import calendar
import json
from datetime import UTC, datetime

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mirror.encoding import BufferedRecord, encode_message, encode_value, format_sent_at
from schemas import SUPPORTED_DTYPES, MirroredRequest, Tensor


def _reference(record: BufferedRecord) -> MirroredRequest:
    return MirroredRequest(
        request_id=record.request_id,
        model=record.model,
        baseline_version=record.version,
        sent_at=datetime.fromtimestamp(record.sent_at, UTC),
        inputs={k: Tensor.from_array(v) for k, v in record.inputs.items()},
        baseline_output={k: Tensor.from_array(v) for k, v in record.outputs.items()},
        baseline_latency_ms=record.latency_ms,
        attributes={str(k): str(v) for k, v in (record.attributes or {}).items()},
        label=record.label,
    )


def _record(inputs, outputs, **kw) -> BufferedRecord:
    fields = dict(request_id="req-1", model="digits", version="v1", inputs=inputs, outputs=outputs,
                  latency_ms=1.25, attributes={"country": "de"}, key="req-1", label=None,
                  sent_at=1_700_000_000.123456)
    fields.update(kw)
    return BufferedRecord(**fields)


arrays = st.sampled_from(SUPPORTED_DTYPES).flatmap(
    lambda dtype: hnp.arrays(dtype=np.dtype(dtype), shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)))
text = st.text(min_size=1, max_size=20)


@settings(max_examples=200, deadline=None)
@given(
    inputs=st.dictionaries(text, arrays, min_size=1, max_size=3),
    outputs=st.dictionaries(text, arrays, min_size=1, max_size=2),
    request_id=text,
    attributes=st.dictionaries(text, text, max_size=3),
    latency=st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False),
    label=st.none() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False),
    sent_at=st.floats(min_value=0, max_value=4_000_000_000),
)
def test_round_trip_matches_schema_model(inputs, outputs, request_id, attributes, latency, label, sent_at):
    record = _record(inputs, outputs, request_id=request_id, attributes=attributes, latency_ms=latency,
                     label=label, sent_at=sent_at)
    parsed = MirroredRequest.model_validate_json(encode_value(record))
    assert parsed.model_dump_json() == _reference(record).model_dump_json()
    for name, array in inputs.items():
        np.testing.assert_array_equal(parsed.inputs[name].to_array(), array)


def test_value_is_compact_base64_not_float_lists():
    x = np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 64)
    value = json.loads(encode_value(_record({"x": x}, {"p": np.ones(10, np.float32)})))
    assert value["inputs"]["x"] == {"dtype": "float32", "shape": [1, 64], "data": Tensor.from_array(x).data}
    assert isinstance(value["inputs"]["x"]["data"], str)


@pytest.mark.parametrize("dtype", ["float32", "int64", "uint16", "float16"])
def test_big_endian_and_non_contiguous_arrays_encode_as_little_endian_c_order(dtype):
    base = np.arange(24, dtype=dtype).reshape(4, 6)
    big = base.astype(np.dtype(dtype).newbyteorder(">"))
    strided = base.T  # Fortran-ordered view
    parsed = MirroredRequest.model_validate_json(encode_value(_record({"big": big, "t": strided}, {"y": base})))
    np.testing.assert_array_equal(parsed.inputs["big"].to_array(), base)
    np.testing.assert_array_equal(parsed.inputs["t"].to_array(), base.T)
    assert parsed.inputs["big"].dtype == dtype


def test_message_key_and_timestamp():
    record = _record({"x": np.zeros(2)}, {"y": np.zeros(1)}, key="user-7", sent_at=1_700_000_000.5)
    key, value, timestamp_ms = encode_message(record)
    assert key == b"user-7"
    assert timestamp_ms == 1_700_000_000_500
    assert MirroredRequest.model_validate_json(value).sent_at == datetime(2023, 11, 14, 22, 13, 20, 500000, tzinfo=UTC)


@given(st.floats(min_value=0, max_value=4_000_000_000))
def test_sent_at_format_and_kafka_timestamp_agree_with_datetime(epoch):
    ours = datetime.fromisoformat(format_sent_at(epoch))
    assert ours == datetime.fromtimestamp(epoch, UTC)
    _, _, timestamp_ms = encode_message(_record({"x": np.zeros(1)}, {"y": np.zeros(1)}, sent_at=epoch))
    assert timestamp_ms == calendar.timegm(ours.utctimetuple()) * 1000 + ours.microsecond // 1000
