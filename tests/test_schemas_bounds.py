"""Poison messages: decode_request never raises, every limit is named, dead letters stay bounded.

Fuzz tests are derandomized (a fixed example sequence per test), so a failure reproduces.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import get_args

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import schemas.decode
from mirror.encoding import BufferedRecord, encode_value
from mirror.errors import MirrorError
from mirror.validation import check_attributes, check_tensors
from schemas import (
    DEAD_LETTER_ERROR_TYPES,
    MAX_ATTRIBUTE_KEY_CHARS,
    MAX_ATTRIBUTE_VALUE_CHARS,
    MAX_ATTRIBUTES,
    MAX_DEAD_LETTER_KEY_BYTES,
    MAX_JSON_DEPTH,
    MAX_MESSAGE_BYTES,
    MAX_REASON_CHARS,
    MAX_TENSOR_DIMS,
    MAX_TENSOR_NAME_CHARS,
    MAX_TENSORS,
    SUPPORTED_DTYPES,
    DeadLetter,
    MirroredRequest,
    Rejection,
    Tensor,
    decode_request,
    json_nesting_depth,
)

FUZZ = settings(derandomize=True, deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
REJECTION_TYPES = set(get_args(schemas.decode.RejectionType))


def _fields(**overrides) -> dict:
    base = {
        "request_id": "r-1",
        "model": "digits",
        "baseline_version": "v1",
        "sent_at": "2026-11-25T12:00:00Z",
        "inputs": {"pixels": Tensor.from_array(np.zeros((1, 64), np.float32)).model_dump()},
        "baseline_output": {"probabilities": Tensor.from_array(np.full((1, 10), 0.1, np.float32)).model_dump()},
        "baseline_latency_ms": 1.5,
        "attributes": {"country": "de"},
        "label": None,
    }
    base.update(overrides)
    return base


def _message(**overrides) -> bytes:
    return json.dumps(_fields(**overrides)).encode()


def _outcome_is_sound(result) -> None:
    assert isinstance(result, (MirroredRequest, Rejection))
    event(result.error_type if isinstance(result, Rejection) else "valid")  # --hypothesis-show-statistics
    if isinstance(result, Rejection):
        assert result.error_type in REJECTION_TYPES and result.error_type in DEAD_LETTER_ERROR_TYPES
        assert result.reason and len(result.reason) <= MAX_REASON_CHARS


# -- never raises ---------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_raise(raw):
    _outcome_is_sound(decode_request(raw))


@FUZZ
@given(st.data())
def test_mutated_valid_messages_never_raise(data):
    raw = bytearray(_message())
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(raw)))
        op = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = data.draw(st.sampled_from(list(b'[]{}",:\\0e-.n\x00\xff')) | st.integers(0, 255))
        if op == "insert":
            raw.insert(at, byte)
        elif at < len(raw):
            if op == "delete":
                del raw[at]
            else:
                raw[at] = byte
    _outcome_is_sound(decode_request(bytes(raw)))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
fields = st.sampled_from(sorted(_fields()) + ["inputs.pixels", "inputs.pixels.shape", "inputs.pixels.data",
                                              "inputs.pixels.dtype", "extra"])  # fmt: skip


@FUZZ
@given(fields, json_values)
def test_any_json_in_any_field_never_raises(field, value):
    body = _fields()
    *parents, last = field.split(".")
    target = body
    for part in parents:
        target = target[part]
    target[last] = value
    raw = json.dumps(body, allow_nan=True).encode()
    _outcome_is_sound(decode_request(raw))


@pytest.mark.parametrize(
    "raw",
    [b"[" * 200_000, b'{"a":' * 100_000, b"[{" * 50_000 + b"]}" * 50_000, b'{"x":' + b"[" * 200_000 + b'"',
     b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)],
    ids=["brackets", "objects", "balanced", "unterminated", "just-over"],
)  # fmt: skip
def test_deep_nesting_is_too_deep_without_recursion(raw):
    result = decode_request(raw)
    assert isinstance(result, Rejection) and result.error_type == "too_deep"
    assert str(MAX_JSON_DEPTH) in result.reason


def test_recursion_error_is_still_caught_when_the_scan_is_off():
    result = decode_request(b"[" * 200_000, max_depth=10**9)  # the parser itself hits the limit
    assert isinstance(result, Rejection) and result.error_type == "too_deep"
    assert "recursion limit" in result.reason and str(MAX_JSON_DEPTH) in result.reason


def test_brackets_inside_strings_do_not_count():
    value = {**_fields(), "attributes": {"q": '[[[[{{{{\\"' * 20}}
    assert isinstance(decode_request(json.dumps(value).encode()), MirroredRequest)


@FUZZ
@given(json_values)
def test_nesting_depth_matches_the_parsed_value(value):
    def depth(v) -> int:
        if isinstance(v, list):
            return 1 + max(map(depth, v), default=0)
        if isinstance(v, dict):
            return 1 + max(map(depth, v.values()), default=0)
        return 0

    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False, indent=1)):
        assert json_nesting_depth(text.encode()) == depth(value)


# -- one representative input per error type ------------------------------------------------------

NAN_INPUT = {"pixels": {"dtype": "float32", "shape": [1, 2], "data": [[1.0, float("nan")]]}}
REPRESENTATIVES = {
    "tombstone": None,
    "oversized": b" " * (MAX_MESSAGE_BYTES + 1),
    "invalid_json": b'{"request_id": ',
    "too_deep": b"[" * 1000,
    "invalid_schema": _message(baseline_latency_ms=-1),
    "invalid_tensor": _message(inputs={"pixels": {"dtype": "complex64", "shape": [1], "data": "AAAAAAAAAAA="}}),
    "non_finite_input": json.dumps(_fields(inputs=NAN_INPUT), allow_nan=True).encode(),
}


@pytest.mark.parametrize(("error_type", "raw"), REPRESENTATIVES.items(), ids=list(REPRESENTATIVES))
def test_each_error_type_has_a_representative(error_type, raw):
    result = decode_request(raw)
    assert isinstance(result, Rejection), result
    assert result.error_type == error_type, result.reason


def test_not_utf8_is_invalid_json():
    result = decode_request(b'{"request_id": "\xff"}')
    assert isinstance(result, Rejection) and result.error_type == "invalid_json" and "UTF-8" in result.reason


def test_oversized_respects_the_parameter():
    result = decode_request(_message(), max_bytes=100)
    assert isinstance(result, Rejection) and result.error_type == "oversized" and "100" in result.reason


def test_unexpected_exceptions_are_other_and_named(monkeypatch):
    def boom(request):
        raise RuntimeError("scorer bug")

    monkeypatch.setattr(schemas.decode, "_non_finite", boom)  # run for plain and pydantic-read requests alike
    result = decode_request(_message())
    assert result == Rejection("other", "(message): unexpected RuntimeError while decoding: scorer bug")


def test_non_finite_baseline_output_is_production_s_answer_and_passes():
    outputs = {"probabilities": {"dtype": "float32", "shape": [2], "data": [float("nan"), float("inf")]}}
    assert isinstance(decode_request(json.dumps(_fields(baseline_output=outputs)).encode()), MirroredRequest)


def test_integer_inputs_need_no_finiteness_check():
    inputs = {"ids": {"dtype": "int64", "shape": [3], "data": [1, 2, 3]}}
    assert isinstance(decode_request(_message(inputs=inputs)), MirroredRequest)


# -- limits name the field, the limit and the fix ----------------------------------------------------

LIMITS = [
    ({"inputs": {"pixels": {"dtype": "float32", "shape": [0, 64], "data": ""}}},
     "inputs.pixels.shape: dimension 0 is 0; every dimension must be >= 1", "invalid_tensor"),
    ({"baseline_output": {"p": {"dtype": "float32", "shape": [3, 0], "data": ""}}},
     "baseline_output.p.shape: dimension 1 is 0", "invalid_tensor"),
    ({"inputs": {"x": {"dtype": "uint8", "shape": [1] * (MAX_TENSOR_DIMS + 1), "data": "AA=="}}},
     f"inputs.x.shape: {MAX_TENSOR_DIMS + 1} dimensions exceed the limit of {MAX_TENSOR_DIMS}; flatten",
     "invalid_tensor"),
    ({"inputs": {"x": {"dtype": "float32", "shape": [0, 2**70], "data": ""}}}, "inputs.x.shape: a dimension",
     "invalid_tensor"),
    ({"inputs": {"x": {"dtype": "int8", "shape": [1], "data": [300]}}}, "inputs.x.data: cannot read the list as int8",
     "invalid_tensor"),
    ({"inputs": {f"x{i}": {"dtype": "uint8", "shape": [1], "data": [1]} for i in range(MAX_TENSORS + 1)}},
     f"inputs: {MAX_TENSORS + 1} tensors exceed the limit of {MAX_TENSORS}; mirror only", "invalid_schema"),
    ({"inputs": {"x" * (MAX_TENSOR_NAME_CHARS + 1): {"dtype": "uint8", "shape": [1], "data": [1]}}},
     f"over the limit of {MAX_TENSOR_NAME_CHARS}; use the model", "invalid_schema"),
    ({"attributes": {str(i): "v" for i in range(MAX_ATTRIBUTES + 1)}},
     f"attributes: {MAX_ATTRIBUTES + 1} entries exceed the limit of {MAX_ATTRIBUTES}; send at most", "invalid_schema"),
    ({"attributes": {"k" * (MAX_ATTRIBUTE_KEY_CHARS + 1): "v"}},
     f"over the limit of {MAX_ATTRIBUTE_KEY_CHARS}; use a shorter slice key", "invalid_schema"),
    ({"attributes": {"country": "v" * (MAX_ATTRIBUTE_VALUE_CHARS + 1)}},
     f"attributes: key 'country': value has {MAX_ATTRIBUTE_VALUE_CHARS + 1} characters, over the limit of "
     f"{MAX_ATTRIBUTE_VALUE_CHARS}", "invalid_schema"),
    ({"request_id": "r" * 257}, "request_id: String should have at most 256 characters", "invalid_schema"),
    ({"label": 10**400}, "label: a 1329-bit integer does not fit a float64", "invalid_schema"),
    ({"sent_at": "9999-12-31T23:00:00-12:00"}, "sent_at: 9999-12-31T23:00:00-12:00 is out of range in UTC",
     "invalid_schema"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "expected", "error_type"), LIMITS, ids=[e[:30] for _, e, _ in LIMITS])
def test_limit_violations_name_field_limit_and_fix(overrides, expected, error_type):
    result = decode_request(_message(**overrides))
    assert isinstance(result, Rejection), result
    assert (result.error_type, expected in result.reason) == (error_type, True), result.reason


def test_limits_are_inclusive():
    at_limit = _fields(
        request_id="r" * 256,
        attributes={f"{i:0{MAX_ATTRIBUTE_KEY_CHARS}d}": "v" * MAX_ATTRIBUTE_VALUE_CHARS for i in range(MAX_ATTRIBUTES)},
        inputs={f"{i:0{MAX_TENSOR_NAME_CHARS}d}": {"dtype": "uint8", "shape": [1], "data": [1]}
                for i in range(MAX_TENSORS)},
    )  # fmt: skip
    assert isinstance(decode_request(json.dumps(at_limit).encode()), MirroredRequest)


def test_scalars_and_demo_shaped_traffic_stay_valid():
    scalar = {"t": Tensor.from_array(np.float32(3.5)).model_dump()}
    assert isinstance(decode_request(_message(inputs=scalar)), MirroredRequest)
    assert isinstance(decode_request(_message(attributes={"country": "de", "device": "web"}, label=7)), MirroredRequest)


# -- valid requests round-trip --------------------------------------------------------------------


def _tensors(finite: bool):
    def arrays(dtype: str):
        elements = hnp.from_dtype(np.dtype(dtype), allow_nan=not finite, allow_infinity=not finite)
        return hnp.arrays(np.dtype(dtype), hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4),
                          elements=elements)  # fmt: skip

    names = st.text(min_size=1, max_size=12)
    return st.dictionaries(names, st.sampled_from(SUPPORTED_DTYPES).flatmap(arrays).map(Tensor.from_array),
                           min_size=1, max_size=3)  # fmt: skip


@settings(derandomize=True, deadline=None, max_examples=150)
@given(
    request_id=st.text(min_size=1, max_size=256),
    inputs=_tensors(finite=True),
    outputs=_tensors(finite=False),
    attributes=st.dictionaries(st.text(max_size=MAX_ATTRIBUTE_KEY_CHARS), st.text(max_size=40), max_size=6),
    label=st.none() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False, allow_infinity=False),
    latency=st.floats(0, 1e9),
    offset_minutes=st.integers(-900, 900),
)
def test_valid_requests_round_trip_through_the_decoder(request_id, inputs, outputs, attributes, label, latency,
                                                       offset_minutes):  # fmt: skip
    event = MirroredRequest(
        request_id=request_id, model="digits", baseline_version="v1", inputs=inputs, baseline_output=outputs,
        sent_at=datetime(2026, 11, 25, 12, tzinfo=timezone(timedelta(minutes=offset_minutes))),
        baseline_latency_ms=latency, attributes=attributes, label=label,
    )  # fmt: skip
    assert decode_request(event.model_dump_json().encode()) == event


# -- the SDK refuses what the worker would reject ---------------------------------------------------


@settings(derandomize=True, deadline=None, max_examples=150)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3)))
def test_sdk_and_worker_agree_on_tensor_shapes(array):
    try:
        ins = check_tensors("inputs", {"x": array}, "input", None, copy=False)
    except MirrorError as exc:
        sdk_error = str(exc)
    else:
        sdk_error = None
        assert array.size > 0
    record = BufferedRecord("r-1", "digits", "v1", {"x": array}, {"y": np.ones(2, np.float32)}, 1.0, None, "r-1",
                            None, 1_700_000_000.0)  # fmt: skip
    result = decode_request(encode_value(record))
    if sdk_error is None:
        assert isinstance(result, MirroredRequest) or result.error_type == "non_finite_input"  # left to the worker
        assert ins["x"] is array
    else:
        assert sdk_error.startswith("inputs.x.shape: dimension") and "every dimension must be >= 1" in sdk_error
        assert isinstance(result, Rejection) and result.error_type == "invalid_tensor"
        assert result.reason.startswith("inputs.x.shape: dimension")


@pytest.mark.parametrize(
    ("attributes", "field"),
    [({str(i): "v" for i in range(MAX_ATTRIBUTES + 1)}, "attributes"), ({"k" * 65: "v"}, "attributes"),
     ({"country": "v" * 257}, "attributes.country"), ({"n": 10**300}, "attributes.n"), (["de"], "attributes")],
)  # fmt: skip
def test_sdk_checks_attribute_bounds(attributes, field):
    with pytest.raises(MirrorError) as info:
        check_attributes(attributes)
    assert info.value.field == field


def test_sdk_checks_tensor_count_and_names():
    with pytest.raises(MirrorError, match=f"exceed the limit of {MAX_TENSORS}"):
        check_tensors("inputs", {f"x{i}": np.ones(1) for i in range(MAX_TENSORS + 1)}, "input", None, copy=False)
    with pytest.raises(MirrorError, match=f"over the limit of {MAX_TENSOR_NAME_CHARS}"):
        check_tensors("outputs", {"y" * 200: np.ones(1)}, "output", None, copy=False)
    check_attributes({"country": "de", "n": 3})
    check_attributes(None)


# -- bounded dead letters --------------------------------------------------------------------------


def _payload_bytes(letter: DeadLetter) -> bytes:
    if letter.payload_encoding == "base64":
        return base64.b64decode(letter.payload)
    return letter.payload.encode("utf-8")


payloads = st.binary(max_size=3000) | st.text(max_size=1500).map(lambda t: t.encode("utf-8", "surrogatepass"))


@FUZZ
@given(payloads, st.integers(0, 2500), st.none() | st.binary(max_size=1500) | st.text(max_size=600))
def test_dead_letters_are_bounded_and_identify_the_payload(raw, limit, key):
    letter = DeadLetter.for_payload(raw, "invalid_json", "reason", "mirror", 3, 7, max_payload_bytes=limit, key=key)
    body = json.dumps(letter.payload, ensure_ascii=False).encode("utf-8")
    assert len(body) - 2 <= limit  # the payload's JSON text, escapes included
    kept = _payload_bytes(letter)
    assert raw.startswith(kept) and letter.payload_truncated == (kept != raw)
    assert letter.original_size == len(raw) and letter.payload_sha256 == hashlib.sha256(raw).hexdigest()
    assert len(letter.model_dump_json().encode()) <= limit + MAX_DEAD_LETTER_KEY_BYTES + 600
    again = DeadLetter.model_validate_json(letter.model_dump_json())
    assert again == letter


@pytest.mark.parametrize("unit", [b"\x00", b'"', b"\n", "€".encode(), b"\xff", b"a"], ids=repr)
def test_worst_case_payloads_stay_under_the_bound(unit):
    raw = unit * 200_000
    letter = DeadLetter.for_payload(raw, "oversized", "x" * 10_000, "mirror", 0, 1, key=b"\xfe" * 5000,
                                    candidate="c" * 500)  # fmt: skip
    size = len(letter.model_dump_json().encode())
    assert size <= 65536 + MAX_REASON_CHARS + MAX_DEAD_LETTER_KEY_BYTES + 128 + 500
    assert letter.payload_truncated and letter.key_truncated and len(letter.reason) == MAX_REASON_CHARS


def test_tombstone_dead_letter():
    letter = DeadLetter.for_payload(None, "tombstone", "null value", "mirror", 0, 9, key="r-1")
    assert (letter.payload, letter.original_size, letter.payload_sha256) == ("", 0, None)
    assert not letter.payload_truncated
    assert (letter.key, letter.key_encoding) == ("r-1", "utf-8")


def test_binary_key_is_base64_and_small_payload_is_whole():
    letter = DeadLetter.for_payload(b'{"a": 1}', "invalid_schema", "r", "t", 0, 0, key=b"\xff\x00")
    assert (letter.payload, letter.payload_truncated, letter.original_size) == ('{"a": 1}', False, 8)
    assert (letter.key, letter.key_encoding) == (base64.b64encode(b"\xff\x00").decode(), "base64")


def test_direct_construction_keeps_working_and_caps_the_reason():
    letter = DeadLetter(reason="r" * 10_000, error_type="invalid_json", topic="t", partition=0, offset=1,
                        payload="eyJ9", payload_encoding="base64", failed_at=datetime.now(UTC))  # fmt: skip
    assert len(letter.reason) == MAX_REASON_CHARS and letter.reason.endswith("[10000 characters, truncated]")
    assert (letter.payload_truncated, letter.original_size, letter.key) == (False, None, None)


def test_list_values_that_overflow_the_dtype_are_refused():
    outputs = {"p": {"dtype": "float32", "shape": [1], "data": [1e300]}}
    result = decode_request(_message(baseline_output=outputs))
    assert isinstance(result, Rejection) and result.error_type == "invalid_tensor"
    assert result.reason.startswith("baseline_output.p.data: cannot read the list as float32")
