"""schemas/fast_path.py: the plain form is read without pydantic, and never more leniently.

The property: whenever ``parse_plain`` answers, pydantic accepts the same bytes and builds an equal
request (fields, fields set, decoded arrays; tensor data compared as canonical base64); when pydantic refuses, ``parse_plain`` answers None,
so the rejection and its reason come from pydantic as before. Messages are generated valid, then
mutated field by field with the values producers get wrong (types pydantic coerces, limits,
malformed base64, timestamps in other forms, duplicate keys)."""

from __future__ import annotations

import base64
import json

import msgspec
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas import MirroredRequest, Tensor, decode_request
from schemas.events import MAX_ATTRIBUTE_VALUE_CHARS, MAX_REQUEST_ID_CHARS
from schemas.decode import decode_for_replay
from schemas.fast_path import PlainRequest, PlainTensor, parse_plain


def _message(rng_seed: int = 0, **overrides) -> dict:
    rng = np.random.default_rng(rng_seed)
    doc = {
        "schema_version": 1, "request_id": f"req-{rng_seed}", "model": "digits", "baseline_version": "v1",
        "sent_at": "2026-11-27T04:50:13.970662Z",
        "inputs": {"pixels": Tensor.from_array(rng.random((1, 64), dtype=np.float32)).model_dump()},
        "baseline_output": {"probabilities": Tensor.from_array(rng.random((1, 10))).model_dump()},
        "baseline_latency_ms": 2.5, "attributes": {"country": "de"}, "label": 3,
    }  # fmt: skip
    doc.update(overrides)
    return doc


def _tensor(**overrides) -> dict:
    return {**Tensor.from_array(np.arange(6, dtype=np.int32).reshape(2, 3)).model_dump(), **overrides}


ODD = [True, False, None, 0, 1, -1, 1.0, 2.5, -0.0, 1e308, 10**400, "", "x", "1.5", "2026-11-27", [], [1], {}, {"a": 1},
       "2026-11-27T04:50:13Z", "2026-11-27T04:50:13.1234567Z", "2026-11-27 04:50:13Z", "2026-11-27T04:50:13",
       "2026-11-27T04:50:13+05:30", "2026-11-27T04:50:13z", "2026-11-27T24:00:00Z", "0000-01-01T00:00:00Z",
       "9999-12-31T23:59:59-12:00", "x" * (MAX_REQUEST_ID_CHARS + 1), "y" * (MAX_ATTRIBUTE_VALUE_CHARS + 1),
       "\ud800", "a\u0000b", "2026-11-27T04:50:13Z\n", "2026-11-27T04:50:13.5+01:00", "é" * MAX_REQUEST_ID_CHARS, 10**30, -(2**63) - 1, 2**64]  # fmt: skip
TENSOR_ODD = [_tensor(), _tensor(dtype="float"), _tensor(dtype="int64"), _tensor(shape=[6]), _tensor(shape=[2, 3.0]),
              _tensor(shape=[2, True, 3]), _tensor(shape=[-2, -3]), _tensor(shape=[0, 3]), _tensor(data="!!!!"),
              _tensor(data=base64.b64encode(b"\0" * 23).decode()), _tensor(data=[[1, 2, 3], [4, 5, 6]]),
              {"dtype": "int32", "shape": [1]}, {**_tensor(), "extra": 1}, _tensor(shape=[2**70, 0]),
              # base64 edge forms: canonical, non-zero padding bits, missing, excess or inner padding, whitespace
              *({"dtype": "float32", "shape": [1], "data": d}
                for d in ("AAAAAA==", "AAAAAB==", "AAAAAA", "AAAAAA=", "AAAAAA===", "AAA=AAA=", "AAAA AA==",
                          "AAAAAA==\n", "-_-_AA==", "")),
              {"dtype": "float32", "shape": [], "data": "AACAPw=="}, {"dtype": "float32", "shape": [1], "data": 1.0}]  # fmt: skip
FIELDS = ["schema_version", "request_id", "model", "baseline_version", "sent_at", "inputs", "baseline_output",
          "baseline_latency_ms", "attributes", "sample_key", "label", "unknown_field", "sent_ms", "absent"]  # fmt: skip
# (the last two: the fast path's own struct fields, never read from a message)


def _full(raw: bytes) -> MirroredRequest | None:
    try:
        return MirroredRequest.model_validate_json(raw)
    except ValidationError:
        return None


def _canonical(dump: dict) -> dict:
    for where in ("inputs", "baseline_output"):
        for t in dump[where].values():
            t["data"] = base64.b64encode(base64.b64decode(t["data"])).decode()
    return dump


def _assert_agrees(raw: bytes) -> bool:
    fast, full = parse_plain(raw), _full(raw)
    if fast is None:
        return False
    assert full is not None, raw[:300]
    # repr: a NaN label equals itself. Tensor data compares as canonical base64: the fast path
    # keeps the bytes, pydantic the text, which differ only in a last character's unused bits.
    assert repr(_canonical(fast.model_dump())) == repr(_canonical(full.model_dump()))
    assert fast.model_fields_set == full.model_fields_set
    assert fast.sent_at.tzinfo == full.sent_at.tzinfo and type(fast.baseline_latency_ms) is float
    for mine, theirs in ((fast.inputs, full.inputs), (fast.baseline_output, full.baseline_output)):
        for name in theirs:
            a, b = mine[name].to_array(), theirs[name].to_array()
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
    return True


def test_the_sdk_form_takes_the_fast_path():
    for seed in range(20):
        assert _assert_agrees(json.dumps(_message(seed)).encode())
    minimal = {k: v for k, v in _message().items() if k not in ("schema_version", "attributes", "label")}
    assert _assert_agrees(json.dumps(minimal).encode())
    assert decode_request(json.dumps(_message()).encode()) == parse_plain(json.dumps(_message()).encode())
    # The replay stage's reading of the same bytes: the fast path's struct, equal once converted.
    plain = decode_for_replay(json.dumps(_message()).encode())
    assert isinstance(plain, PlainRequest) and plain.to_request() == parse_plain(json.dumps(_message()).encode())
    assert plain.sent_ms == int(plain.to_request().sent_at.timestamp() * 1000)


def test_every_single_field_change_agrees():
    """Each field set to each odd value, each tensor form in each map: exhaustively, not sampled."""
    taken = 0
    for name in FIELDS:
        for value in [*ODD, "DROP"]:
            doc = _message()
            if value == "DROP":
                doc.pop(name, None)
            else:
                doc[name] = value
            taken += _assert_agrees(json.dumps(doc).encode())
            if name == "attributes":
                taken += _assert_agrees(json.dumps(_message(attributes={"k": value})).encode()) if value != "DROP" else 0
    for where in ("inputs", "baseline_output"):
        for tensor in TENSOR_ODD:
            taken += _assert_agrees(json.dumps(_message(**{where: {"t": tensor}})).encode())
    assert taken >= 20  # some odd values are valid and plain (label 1.0, latency 0, ...): they took this path


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(FIELDS), st.sampled_from(ODD + ["DROP"])), max_size=3),
       st.lists(st.tuples(st.sampled_from(["inputs", "baseline_output"]), st.sampled_from(TENSOR_ODD)), max_size=2),
       st.lists(st.tuples(st.sampled_from(["attributes", "label"]), st.sampled_from(ODD)), max_size=2))  # fmt: skip
def test_never_more_lenient_than_pydantic(field_changes, tensor_changes, nested_changes):
    doc = _message()
    for name, value in field_changes:
        if value == "DROP":
            doc.pop(name, None)
        else:
            doc[name] = value
    for where, tensor in tensor_changes:
        if isinstance(doc.get(where), dict):
            doc[where] = {**doc[where], "extra_tensor": tensor}
    for name, value in nested_changes:
        if name == "attributes" and isinstance(doc.get("attributes"), dict):
            doc["attributes"] = {**doc["attributes"], "k": value}
        else:
            doc[name] = value
    try:
        raw = json.dumps(doc, allow_nan=True).encode()
    except (TypeError, ValueError):
        return
    _assert_agrees(raw)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(FIELDS[:-1]), st.sampled_from(ODD), st.booleans())
def test_duplicate_keys_and_non_finite_numbers_read_alike(field, value, first):
    """A key sent twice (the parser keeps one), NaN and Infinity literals: both paths read the same bytes."""
    doc = json.dumps(_message())
    extra = json.dumps({field: value})[1:-1]
    raw = ("{" + extra + "," + doc[1:]) if first else (doc[:-1] + "," + extra + "}")
    _assert_agrees(raw.encode())
    for literal in ("NaN", "Infinity", "-Infinity"):
        _assert_agrees(json.dumps(_message(label=0.5, baseline_latency_ms=1.0)).replace("0.5", literal).encode())
        _assert_agrees(json.dumps(_message(label=0.5, baseline_latency_ms=1.5)).replace("1.5", literal).encode())


def test_invalid_messages_keep_pydantic_reasons():
    raw = json.dumps(_message(baseline_latency_ms=-1)).encode()
    assert parse_plain(raw) is None
    assert "baseline_latency_ms" in decode_request(raw).reason
    raw = json.dumps(_message(inputs={"pixels": _tensor(data="!!!!")})).encode()
    assert parse_plain(raw) is None and decode_request(raw).error_type == "invalid_tensor"


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet="AQgw+/=-_ \n\\u", max_size=14))
def test_base64_msgspec_takes_is_base64_pydantic_takes(text):
    """msgspec reads tensor data as base64 in C: whatever it accepts, binascii (pydantic's
    Tensor) accepts too, as the same bytes."""
    try:
        fast = msgspec.json.decode(json.dumps({"dtype": "uint8", "shape": [1], "data": text}), type=PlainTensor).data
    except msgspec.ValidationError:
        return
    assert base64.b64decode(text, validate=True) == fast
