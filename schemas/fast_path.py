"""The common, well-formed ``MirroredRequest`` read without pydantic's per-field machinery.

The replay stage decodes every mirrored message. pydantic's ``model_validate_json`` (with the
Python validators a ``Tensor`` needs) took about 30 us of a digits request's ~100 us in the
replay core, and building pydantic objects per request another 5. ``parse_plain_request`` reads
the form the mirror SDK and the wire contract produce (base64 tensors, an ISO-8601 ``sent_at``
with ``Z`` or an offset, plain JSON types) with msgspec into typed structs (one C pass, no Python
dict per field) and a few Python checks, in about a fifth of that, and answers ``None`` for
*anything* else: every other form, every invalid message, anything it is unsure of goes to the
full pydantic path, which accepts or rejects it with the field and the fix named, exactly as
before. So this path can only be slower to refuse, never more lenient: whenever it answers, the
request equals ``MirroredRequest.model_validate_json(raw)`` (``PlainRequest.to_request``), its
tensors' ``data`` written as canonical base64 of the same bytes (property tests in
tests/test_schemas_fast_path.py check this on valid, mutated and hand-written messages, and
msgspec's base64 against binascii's).

msgspec (rather than more hand-written Python over a parsed dict) because it validates types,
required and unknown keys while parsing, in C; it is stricter than pydantic where they differ
(no bool for an int, no float for an int, no ``NaN`` literal, no excess base64 padding), and
whatever it refuses simply takes the pydantic path.
"""

from __future__ import annotations

import base64
import math
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta
import numpy as np

from schemas.events import (
    MAX_ATTRIBUTE_KEY_CHARS, MAX_ATTRIBUTE_VALUE_CHARS, MAX_ATTRIBUTES, MAX_NAME_CHARS, MAX_REQUEST_ID_CHARS,
    MAX_TENSOR_NAME_CHARS, MAX_TENSORS, SCHEMA_VERSION, MirroredRequest,
)  # fmt: skip
from schemas.tensors import _LITTLE_ENDIAN, MAX_TENSOR_DIMS, MAX_TENSOR_ELEMENTS, Tensor

# What both pydantic and datetime.fromisoformat read the same way; anything else takes the full path.
_ISO_PATTERN = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)\Z"  # \Z: "$" would let a final newline through
_REQUIRED = frozenset({"request_id", "model", "baseline_version", "sent_at", "inputs", "baseline_output",
                       "baseline_latency_ms"})  # fmt: skip
_TENSOR_FIELDS = frozenset({"dtype", "shape", "data"})


# pydantic's limits as msgspec constraints, checked in C while parsing (lengths count characters
# in both); what msgspec cannot say is checked in _checked below.
_Dtype = Literal[tuple(_LITTLE_ENDIAN)]  # type: ignore[valid-type]
_Attributes = Annotated[
    dict[Annotated[str, Meta(max_length=MAX_ATTRIBUTE_KEY_CHARS)], Annotated[str, Meta(max_length=MAX_ATTRIBUTE_VALUE_CHARS)]],
    Meta(max_length=MAX_ATTRIBUTES),
]


class PlainTensor(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A tensor of a plain request: ``data`` is the decoded bytes (msgspec reads base64 into
    ``bytes`` in C, refusing padding or characters that binascii would let through)."""

    dtype: _Dtype
    # Every dimension from 1 (a zero-size tensor cannot be scored: pydantic accepts it,
    # schemas.decode.check_scorable then explains) to the element limit. A tuple, not a list: the
    # cycle collector stops tracking a tuple of ints at its first pass, while three lists per
    # request stay tracked and made every collection of a micro-batch's requests slower.
    shape: Annotated[tuple[Annotated[int, Meta(ge=1, le=MAX_TENSOR_ELEMENTS)], ...], Meta(max_length=MAX_TENSOR_DIMS)]
    data: bytes

    def to_array(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=_LITTLE_ENDIAN[self.dtype]).reshape(self.shape)

    def to_tensor(self) -> Tensor:
        # The canonical base64 of the same bytes: pydantic keeps the text as sent, which differs
        # only where a producer set the unused bits of the last character (same array).
        text = base64.b64encode(self.data).decode("ascii")
        t = _bare(Tensor, {"dtype": self.dtype, "shape": list(self.shape), "data": text}, _TENSOR_FIELDS)
        t.__pydantic_private__["_array"] = self.to_array()
        return t


# MirroredRequest.sample_key's limits (schemas.events): refused alike by both paths.
_SampleKey = Annotated[str, Meta(min_length=1, max_length=MAX_REQUEST_ID_CHARS)]
_TensorMap = Annotated[
    dict[Annotated[str, Meta(max_length=MAX_TENSOR_NAME_CHARS)], PlainTensor], Meta(min_length=1, max_length=MAX_TENSORS)
]


class PlainRequest(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A plain request as the replay stage reads it: the ``MirroredRequest`` fields it uses
    (``sent_at`` as text, its epoch milliseconds in ``sent_ms``), tensors as ``PlainTensor``.

    ``gc=False``: thousands of these live through a micro-batch, and they hold no reference
    cycles (strings, numbers, bytes, dicts and lists of them), so the cycle collector need not
    scan them. ``sent_ms`` and ``absent`` are set by the checks, not read from JSON: a message
    that carries either key is not plain (pydantic refuses it as an unknown field)."""

    request_id: Annotated[str, Meta(min_length=1, max_length=MAX_REQUEST_ID_CHARS)]
    model: Annotated[str, Meta(min_length=1, max_length=MAX_NAME_CHARS)]
    baseline_version: Annotated[str, Meta(min_length=1, max_length=MAX_NAME_CHARS)]
    sent_at: Annotated[str, Meta(pattern=_ISO_PATTERN)]
    inputs: _TensorMap
    baseline_output: _TensorMap
    baseline_latency_ms: Annotated[float, Meta(ge=0)]
    schema_version: Literal[1] | msgspec.UnsetType = msgspec.UNSET
    attributes: _Attributes | msgspec.UnsetType = msgspec.UNSET
    sample_key: _SampleKey | None | msgspec.UnsetType = msgspec.UNSET  # None once checked, when absent
    label: int | float | None | msgspec.UnsetType = msgspec.UNSET
    sent_ms: int | msgspec.UnsetType = msgspec.UNSET
    absent: tuple[str, ...] | msgspec.UnsetType = msgspec.UNSET  # optional fields the message left out

    def to_request(self) -> MirroredRequest:
        """The equal ``MirroredRequest`` (what pydantic builds from the same bytes)."""
        fields: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "request_id": self.request_id, "model": self.model,
            "baseline_version": self.baseline_version, "sent_at": datetime.fromisoformat(self.sent_at).astimezone(UTC),
            "inputs": {n: t.to_tensor() for n, t in self.inputs.items()},
            "baseline_output": {n: t.to_tensor() for n, t in self.baseline_output.items()},
            "baseline_latency_ms": self.baseline_latency_ms, "attributes": self.attributes,
            "sample_key": self.sample_key, "label": self.label,
        }  # fmt: skip
        given = _REQUIRED | {"attributes", "sample_key", "label"}.difference(self.absent)
        return _bare(MirroredRequest, fields, given | ({"schema_version"} if self.schema_version is not msgspec.UNSET else set()))


_DECODER = msgspec.json.Decoder(PlainRequest)


def parse_plain_request(raw: bytes) -> PlainRequest | None:
    """The request, when ``raw`` is a valid request in the plain form; else ``None``. A plain
    request's tensors have no zero-size dimension (``check_scorable``'s shape rule holds); its
    inputs' finiteness is not checked here."""
    try:
        return _checked(_DECODER.decode(raw))
    except Exception:  # noqa: BLE001 - msgspec's errors, _NotPlain, anything unforeseen: pydantic decides
        return None


def parse_plain(raw: bytes) -> MirroredRequest | None:
    """``parse_plain_request`` as the ``MirroredRequest`` pydantic would build."""
    plain = parse_plain_request(raw)
    return None if plain is None else plain.to_request()


class _NotPlain(Exception):
    """Not the plain form: let pydantic decide (and explain)."""


_UNSET = msgspec.UNSET
_FROM_ISO = datetime.fromisoformat
# (dtype, shape, byte length) of tensors already found consistent: the few forms a producer sends
# are checked once each (element count within the limit, bytes = count x item size). Bounded.
_GOOD_TENSORS: set[tuple] = set()
_MAX_GOOD_TENSORS = 4096


def _checked(req: PlainRequest) -> PlainRequest:
    """What msgspec's types do not say: pydantic's limits and value rules."""
    if req.sent_ms is not _UNSET or req.absent is not _UNSET:  # keys a request does not have
        raise _NotPlain
    # astimezone: pydantic refuses what has no UTC datetime (9999-12-31T23:00-12:00); OverflowError here
    req.sent_ms = int(_FROM_ISO(req.sent_at).astimezone(UTC).timestamp() * 1000)
    good = _GOOD_TENSORS
    for t in req.inputs.values():
        if (t.dtype, t.shape, len(t.data)) not in good:
            _tensor(t)
    for t in req.baseline_output.values():
        if (t.dtype, t.shape, len(t.data)) not in good:
            _tensor(t)
    if not math.isfinite(req.baseline_latency_ms):
        raise _NotPlain
    if req.attributes is not _UNSET and req.sample_key is not _UNSET and req.label is not _UNSET:
        req.absent = ()
        if type(req.label) is int:
            float(req.label)  # OverflowError past float64: pydantic's validator explains it
        return req
    req.absent = ()
    if req.attributes is _UNSET:  # the replay stage reads the defaults; to_request knows they were absent
        req.attributes, req.absent = {}, ("attributes",)
    if req.sample_key is _UNSET:  # no sample key: the replay stage's sample_hash is 0
        req.sample_key, req.absent = None, (*req.absent, "sample_key")
    if req.label is _UNSET:
        req.label, req.absent = None, (*req.absent, "label")
    elif type(req.label) is int:
        float(req.label)  # OverflowError past float64: pydantic's validator explains it
    return req


def _tensor(t: PlainTensor) -> None:
    count = math.prod(t.shape)
    if count > MAX_TENSOR_ELEMENTS or len(t.data) != count * _LITTLE_ENDIAN[t.dtype].itemsize:
        raise _NotPlain
    if len(_GOOD_TENSORS) >= _MAX_GOOD_TENSORS:
        _GOOD_TENSORS.clear()
    _GOOD_TENSORS.add((t.dtype, t.shape, len(t.data)))


def _bare(cls, fields: dict[str, Any], fields_set):
    """What ``cls.model_construct(**fields)`` builds, without its per-call overhead (it costs more
    than the whole decode of a tensor otherwise): the values are already validated above."""
    obj = cls.__new__(cls)
    object.__setattr__(obj, "__dict__", fields)
    object.__setattr__(obj, "__pydantic_fields_set__", set(fields_set))
    object.__setattr__(obj, "__pydantic_extra__", None)
    object.__setattr__(obj, "__pydantic_private__", {"_array": None} if cls is Tensor else None)
    return obj
