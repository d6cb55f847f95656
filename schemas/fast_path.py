"""The common, well-formed ``MirroredRequest`` read without pydantic's per-field machinery.

The replay stage decodes every mirrored message; pydantic's ``model_validate_json`` (with the
Python validators a ``Tensor`` needs) took about 30 us of a digits request's ~100 us in the
replay core. ``parse_plain`` takes the form the mirror SDK and the wire contract produce (base64
tensors, an ISO-8601 ``sent_at`` with ``Z`` or an offset, plain JSON types) in about half that,
and answers ``None`` for *anything* else: every other form, every invalid message, anything it
is unsure of goes to the full pydantic path, which accepts or rejects it with the field and the
fix named, exactly as before. So this path can only be slower to refuse, never more lenient:
whenever it answers, the answer equals ``MirroredRequest.model_validate_json(raw)`` (a property
test in tests/test_schemas_fast_path.py checks this on valid, mutated and hand-written messages).
"""

from __future__ import annotations

import base64
import math
import re
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pydantic_core

from schemas.events import (
    MAX_ATTRIBUTE_KEY_CHARS, MAX_ATTRIBUTE_VALUE_CHARS, MAX_ATTRIBUTES, MAX_NAME_CHARS, MAX_REQUEST_ID_CHARS,
    MAX_TENSOR_NAME_CHARS, MAX_TENSORS, SCHEMA_VERSION, MirroredRequest,
)  # fmt: skip
from schemas.tensors import _LITTLE_ENDIAN, MAX_TENSOR_DIMS, MAX_TENSOR_ELEMENTS, Tensor

_REQUIRED = frozenset({"request_id", "model", "baseline_version", "sent_at", "inputs", "baseline_output",
                       "baseline_latency_ms"})  # fmt: skip
_ALLOWED = _REQUIRED | {"schema_version", "attributes", "label"}
_TENSOR_KEYS = frozenset({"dtype", "shape", "data"})
_INT = frozenset({int})  # bool is a subclass of int, not int: shapes of true/false take the full path
# What both pydantic and datetime.fromisoformat read the same way; anything else takes the full path.
_ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)\Z")


class _NotPlain(Exception):
    """Not the plain form: let pydantic decide (and explain)."""


def parse_plain(raw: bytes) -> MirroredRequest | None:
    """The request, when ``raw`` is a valid request in the plain form; else ``None``. A plain
    request's tensors have no zero-size dimension (``check_scorable``'s shape rule holds)."""
    try:
        return _parse(raw)
    except Exception:  # noqa: BLE001 - _NotPlain, or anything unforeseen: pydantic decides
        return None


def _parse(raw: bytes) -> MirroredRequest:
    doc = pydantic_core.from_json(raw)  # the parser pydantic's validate_json uses (jiter)
    if type(doc) is not dict or not _REQUIRED <= doc.keys() or not doc.keys() <= _ALLOWED:
        raise _NotPlain
    version = doc.get("schema_version", SCHEMA_VERSION)
    if type(version) is not int or version != SCHEMA_VERSION:
        raise _NotPlain
    fields: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
    for name, limit in (("request_id", MAX_REQUEST_ID_CHARS), ("model", MAX_NAME_CHARS),
                        ("baseline_version", MAX_NAME_CHARS)):  # fmt: skip
        fields[name] = _text(doc[name], 1, limit)
    sent = doc["sent_at"]
    if type(sent) is not str or not _ISO.match(sent):
        raise _NotPlain
    fields["sent_at"] = datetime.fromisoformat(sent).astimezone(UTC)
    fields["inputs"] = _tensors(doc["inputs"])
    fields["baseline_output"] = _tensors(doc["baseline_output"])
    latency = doc["baseline_latency_ms"]
    if type(latency) not in (int, float) or not math.isfinite(latency) or latency < 0:
        raise _NotPlain
    fields["baseline_latency_ms"] = float(latency)
    attributes = doc.get("attributes", {})
    if type(attributes) is not dict or len(attributes) > MAX_ATTRIBUTES:
        raise _NotPlain
    for key, value in attributes.items():
        _text(key, 0, MAX_ATTRIBUTE_KEY_CHARS)
        _text(value, 0, MAX_ATTRIBUTE_VALUE_CHARS)
    fields["attributes"] = attributes
    label = doc.get("label")
    if label is not None and type(label) not in (int, float):
        raise _NotPlain
    if type(label) is int:
        float(label)  # OverflowError past float64: pydantic's validator explains it
    fields["label"] = label  # NaN stays accepted, as the model accepts it
    return _bare(MirroredRequest, fields, doc.keys())


def _text(value: Any, least: int, most: int) -> str:
    if type(value) is not str or not least <= len(value) <= most:
        raise _NotPlain
    return value


def _tensors(value: Any) -> dict[str, Tensor]:
    if type(value) is not dict or not 1 <= len(value) <= MAX_TENSORS:
        raise _NotPlain
    out = {}
    for name, tensor in value.items():
        if len(name) > MAX_TENSOR_NAME_CHARS or type(tensor) is not dict or tensor.keys() != _TENSOR_KEYS:
            raise _NotPlain
        dtype, shape, data = tensor["dtype"], tensor["shape"], tensor["data"]
        if type(dtype) is not str or dtype not in _LITTLE_ENDIAN or type(shape) is not list or type(data) is not str:
            raise _NotPlain
        # Every dimension an int from 1 (a zero-size tensor cannot be scored: pydantic accepts it,
        # schemas.decode.check_scorable then explains) to the element limit.
        if len(shape) > MAX_TENSOR_DIMS or (shape and (not _INT.issuperset(map(type, shape))
                                                       or min(shape) < 1 or max(shape) > MAX_TENSOR_ELEMENTS)):
            raise _NotPlain
        count = math.prod(shape)
        little = _LITTLE_ENDIAN[dtype]
        if count > MAX_TENSOR_ELEMENTS:
            raise _NotPlain
        decoded = base64.b64decode(data, validate=True)  # binascii.Error: pydantic names it
        if len(decoded) != count * little.itemsize:
            raise _NotPlain
        t = _bare(Tensor, {"dtype": dtype, "shape": shape, "data": data}, _TENSOR_KEYS)
        t.__pydantic_private__["_array"] = np.frombuffer(decoded, dtype=little).reshape(shape)
        out[name] = t
    return out


def _bare(cls, fields: dict[str, Any], fields_set):
    """What ``cls.model_construct(**fields)`` builds, without its per-call overhead (it costs more
    than the whole decode of a tensor otherwise): the values are already validated above."""
    obj = cls.__new__(cls)
    object.__setattr__(obj, "__dict__", fields)
    object.__setattr__(obj, "__pydantic_fields_set__", set(fields_set))
    object.__setattr__(obj, "__pydantic_extra__", None)
    object.__setattr__(obj, "__pydantic_private__", {"_array": None} if cls is Tensor else None)
    return obj
