"""Checks that run on the caller's thread inside ``publish``, before a record is buffered.

They must be cheap (a few hundred nanoseconds per numpy tensor): dtype against the schema's
list, element count, dimensions and non-empty shape against the schema's limits, tensor count
and name length, attribute bounds, and, when the caller declared one, the model's signature.
Anything that would make the worker reject the message is caught here, so bad calls fail
loudly in development (strict) and are counted in production (lenient). One exception, by
design: NaN/infinity in inputs costs a pass over the data, so it is left to the worker, which
dead-letters it as ``non_finite_input`` (schemas.decode.check_scorable).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mirror.errors import MirrorError
from schemas.events import (
    MAX_ATTRIBUTE_KEY_CHARS,
    MAX_ATTRIBUTE_VALUE_CHARS,
    MAX_ATTRIBUTES,
    MAX_NAME_CHARS,
    MAX_REQUEST_ID_CHARS,
    MAX_TENSOR_NAME_CHARS,
    MAX_TENSORS,
)
from schemas.tensors import MAX_TENSOR_DIMS, MAX_TENSOR_ELEMENTS, SUPPORTED_DTYPES

_SUPPORTED = frozenset(SUPPORTED_DTYPES)
# numpy's dtype.name costs ~2 us (it builds the string); a set of native dtypes answers in ~30 ns.
_NATIVE_DTYPES = frozenset(np.dtype(name) for name in SUPPORTED_DTYPES)
_BY_NAME = {name: np.dtype(name) for name in SUPPORTED_DTYPES}
_DTYPE_HELP = "cast to one of " + ", ".join(SUPPORTED_DTYPES)


@dataclass(frozen=True)
class TensorSpec:
    """What one named tensor must look like; ``None`` in ``shape`` matches any size (e.g. batch)."""

    dtype: str
    shape: tuple[int | None, ...] | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _SUPPORTED:
            raise MirrorError("TensorSpec.dtype", f"{self.dtype!r} is not supported", _DTYPE_HELP)

    @property
    def np_dtype(self) -> np.dtype:
        return _BY_NAME[self.dtype]


@dataclass(frozen=True)
class ModelSignature:
    """Declared inputs and outputs of a model; publish checks calls against it."""

    inputs: Mapping[str, TensorSpec] = field(default_factory=dict)
    outputs: Mapping[str, TensorSpec] = field(default_factory=dict)

    @classmethod
    def of(cls, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> ModelSignature:
        """Build from shorthand: ``{"x": ("float32", (None, 64))}`` or ``{"x": "float32"}``."""
        return cls(inputs=_specs(inputs), outputs=_specs(outputs))


def _specs(raw: Mapping[str, Any]) -> dict[str, TensorSpec]:
    out = {}
    for name, spec in raw.items():
        if isinstance(spec, TensorSpec):
            out[name] = spec
        elif isinstance(spec, str):
            out[name] = TensorSpec(spec)
        else:
            dtype, shape = spec
            out[name] = TensorSpec(dtype, None if shape is None else tuple(shape))
    return out


def check_tensors(
    arg: str,
    value: Any,
    default_name: str,
    spec: Mapping[str, TensorSpec] | None,
    copy: bool,
) -> dict[str, np.ndarray]:
    """Named arrays ready to buffer, or ``MirrorError`` naming the tensor and the fix.

    A bare array (not a mapping) is taken as one tensor called ``default_name``. Lists are
    converted here, on the caller's thread, so the dtype check sees what will be sent.
    """
    if type(value) is not dict and not isinstance(value, Mapping):
        value = {default_name: value}
    if not value:
        raise MirrorError(arg, "is empty", "pass at least one named array")
    if len(value) > MAX_TENSORS:
        raise MirrorError(arg, f"{len(value)} tensors exceed the limit of {MAX_TENSORS}",
                          "mirror only the tensors the candidates need")
    arrays: dict[str, np.ndarray] = {}
    for name, array in value.items():
        if not isinstance(name, str):  # the encoder writes names as JSON keys
            raise MirrorError(f"{arg}.{name!r}", "tensor names must be strings", "use str keys")
        if len(name) > MAX_TENSOR_NAME_CHARS:
            raise MirrorError(f"{arg}.{name[:40]}...", f"name has {len(name)} characters, over the limit of "
                              f"{MAX_TENSOR_NAME_CHARS}", "use the model's (short) input/output names")
        if type(array) is not np.ndarray:
            want = spec[name].dtype if spec is not None and name in spec else None
            try:
                array = np.asarray(array, dtype=want)
            except (TypeError, ValueError, OverflowError) as exc:
                raise MirrorError(f"{arg}.{name}", f"cannot be read as an array ({exc})",
                                  "pass a numpy array or a (nested) list of numbers") from None
        elif copy:
            array = array.copy()
        if array.dtype not in _NATIVE_DTYPES and array.dtype.name not in _SUPPORTED:  # 2nd: other byte order
            raise MirrorError(f"{arg}.{name}", f"dtype {array.dtype.name!r} is not supported", _DTYPE_HELP)
        if array.size > MAX_TENSOR_ELEMENTS:
            raise MirrorError(f"{arg}.{name}", f"{array.size} elements exceed the limit of {MAX_TENSOR_ELEMENTS}",
                              "mirror a smaller tensor (or a summary of it)")
        if array.size == 0:  # the worker can neither replay nor compare an empty tensor
            axis = array.shape.index(0)
            raise MirrorError(f"{arg}.{name}.shape", f"dimension {axis} is 0 (shape {array.shape})",
                              "every dimension must be >= 1; do not mirror empty tensors")
        if array.ndim > MAX_TENSOR_DIMS:
            raise MirrorError(f"{arg}.{name}.shape", f"{array.ndim} dimensions exceed the limit of {MAX_TENSOR_DIMS}",
                              "flatten the tensor")
        if spec is not None:
            _check_spec(arg, name, array, spec)
        arrays[name] = array
    if spec is not None and len(arrays) != len(spec):
        missing = sorted(set(spec) - set(arrays))
        if missing:
            raise MirrorError(f"{arg}.{missing[0]}", "is missing", f"the signature declares {sorted(spec)}")
    return arrays


def _check_spec(arg: str, name: str, array: np.ndarray, spec: Mapping[str, TensorSpec]) -> None:
    expected = spec.get(name)
    if expected is None:
        raise MirrorError(f"{arg}.{name}", "is not in the model's signature", f"send only {sorted(spec)}")
    if array.dtype != expected.np_dtype and array.dtype.name != expected.dtype:
        raise MirrorError(f"{arg}.{name}", f"dtype is {array.dtype.name}, the signature says {expected.dtype}",
                          f"cast with .astype('{expected.dtype}')")
    want = expected.shape
    if want is not None:
        got = array.shape
        if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got, strict=True)):
            shown = tuple("*" if w is None else w for w in want)
            raise MirrorError(f"{arg}.{name}", f"shape is {got}, the signature says {shown}",
                              "reshape, or fix the signature")


def check_attributes(attributes: Any) -> None:
    """The schema's limits on ``attributes`` (``None`` or a mapping), measured on the ``str()``
    of keys and values, which is what the encoder sends."""
    if attributes is None:
        return
    if not isinstance(attributes, Mapping):
        raise MirrorError("attributes", f"{type(attributes).__name__} is not a mapping",
                          "pass a dict of str -> str (values are converted with str())")
    if len(attributes) > MAX_ATTRIBUTES:
        raise MirrorError("attributes", f"{len(attributes)} entries exceed the limit of {MAX_ATTRIBUTES}",
                          f"send at most {MAX_ATTRIBUTES} slice keys")
    for key, value in attributes.items():
        key, value = str(key), str(value)
        if len(key) > MAX_ATTRIBUTE_KEY_CHARS:
            raise MirrorError("attributes", f"key {key[:40]!r} has {len(key)} characters, over the limit of "
                              f"{MAX_ATTRIBUTE_KEY_CHARS}", "use a shorter slice key")
        if len(value) > MAX_ATTRIBUTE_VALUE_CHARS:
            raise MirrorError(f"attributes.{key}", f"value has {len(value)} characters, over the limit of "
                              f"{MAX_ATTRIBUTE_VALUE_CHARS}",
                              "attributes are slice values (e.g. a country), not payloads")


def check_sample_key(sample_key: Any) -> str | None:
    """The record's ``sample_key``: ``None`` (or "") means none; anything else is ``str()``-ed and
    must fit the schema's 1..``MAX_REQUEST_ID_CHARS`` characters (the worker would refuse it)."""
    if sample_key is None:
        return None
    if type(sample_key) is not str:
        if isinstance(sample_key, bool):
            raise MirrorError("sample_key", f"{sample_key!r} is not a key",
                              "pass the user / session / device id as a str, or None")
        sample_key = str(sample_key)
    if not sample_key:
        return None
    if len(sample_key) > MAX_REQUEST_ID_CHARS:
        raise MirrorError("sample_key", f"has {len(sample_key)} characters, over the limit of {MAX_REQUEST_ID_CHARS}",
                          "pass a user / session / device id (hash a longer one)")
    return sample_key


def check_scalars(request_id: Any, model: Any, version: Any, latency_ms: Any, label: Any) -> float:
    """The schema's limits on the plain fields; returns the latency as a float."""
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_REQUEST_ID_CHARS:
        raise MirrorError("request_id", f"{request_id!r} is not a 1-{MAX_REQUEST_ID_CHARS} character string",
                          "pass a unique id per request")
    if not isinstance(model, str) or not 0 < len(model) <= MAX_NAME_CHARS:
        raise MirrorError("model", f"{model!r} is not a 1-{MAX_NAME_CHARS} character string",
                          "pass the logical model name")
    if not isinstance(version, str) or not 0 < len(version) <= MAX_NAME_CHARS:
        raise MirrorError("version", f"{version!r} is not a 1-{MAX_NAME_CHARS} character string",
                          "pass the production version")
    try:
        latency = float(latency_ms)
    except (TypeError, ValueError):
        raise MirrorError("latency_ms", f"{latency_ms!r} is not a number", "pass milliseconds as a float") from None
    if not (latency >= 0.0 and math.isfinite(latency)):
        raise MirrorError("latency_ms", f"{latency_ms!r} is not a finite, non-negative number",
                          "pass the measured latency in milliseconds")
    if label is not None and (isinstance(label, bool) or not isinstance(label, (int, float))
                              or (isinstance(label, float) and not math.isfinite(label))):
        raise MirrorError("label", f"{label!r} is not a finite number", "pass an int or float, or None")
    return latency
