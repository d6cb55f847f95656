"""Named tensors on the wire: dtype, shape and base64 of the little-endian bytes.

Why base64 of raw bytes rather than JSON lists: a 10-class float32 output is 40 bytes raw
(56 in base64) against ~200 bytes as JSON text, and decoding is a single ``np.frombuffer``.
Nested lists are still accepted on input so hand-written events and backfills stay easy.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

# dtypes a tensor may carry; names are numpy's canonical names.
SUPPORTED_DTYPES: tuple[str, ...] = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
)

_LITTLE_ENDIAN = {name: np.dtype(name).newbyteorder("<") for name in SUPPORTED_DTYPES}  # made once, not per tensor

MAX_TENSOR_ELEMENTS = 1 << 24  # 16M elements: anything larger is not a single mirrored request
# numpy 1.x arrays have at most 32 dimensions (2.x: 64); the lower bound keeps every valid tensor
# decodable by either, and keeps list-form data within the JSON nesting bound of schemas.decode.
MAX_TENSOR_DIMS = 32


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters: error messages echo inputs, and inputs may be huge."""
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def _short(value: Any, limit: int = 40) -> str:
    return clip(repr(value), limit)


class Tensor(BaseModel):
    """One named tensor: ``{"dtype": "float32", "shape": [1, 64], "data": "<base64>"}``.

    ``data`` may also be a (nested) list of numbers on input; it is then packed to bytes,
    so every validated tensor carries base64 bytes whatever the input form.

    Limits: at most ``MAX_TENSOR_DIMS`` dimensions, ``MAX_TENSOR_ELEMENTS`` elements. A tensor
    with a zero-size dimension is a valid *Tensor* (``from_array`` of an empty array works), but
    not a scorable request tensor: ``schemas.decode.check_scorable`` rejects it in a request.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    dtype: str = Field(description="numpy dtype name, one of: " + ", ".join(SUPPORTED_DTYPES))
    shape: list[int] = Field(description="dimensions; their product is the element count")
    data: str = Field(description="base64 of the little-endian bytes in C order")

    _array: np.ndarray | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _pack_lists(cls, value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return _array_fields(value)
        if isinstance(value, dict) and "dtype" in value and value["dtype"] not in SUPPORTED_DTYPES:
            # Reported before the data: a list with a bad dtype cannot be packed, and the data
            # field's own "should be a valid string" would hide the real mistake.
            raise ValueError(f"dtype: {_short(value['dtype'])} is not supported; use one of "
                             f"{', '.join(SUPPORTED_DTYPES)} (numpy names: float32, not float)")
        if isinstance(value, dict) and "data" in value and not isinstance(value["data"], (str, list, tuple, int, float)):
            raise ValueError(f"data: a {type(value['data']).__name__} is not tensor data; send base64 of the "
                             "little-endian bytes, or a (nested) list of numbers")
        if isinstance(value, dict) and isinstance(value.get("data"), (list, tuple, int, float)):
            dtype = value.get("dtype")
            if dtype not in SUPPORTED_DTYPES:
                return value  # the field check below reports the missing dtype
            try:
                # 1e300 as float32 would silently become inf: refused like 300 as int8 is.
                with np.errstate(over="raise", invalid="raise"):
                    array = np.asarray(value["data"], dtype=np.dtype(dtype))
            except (TypeError, ValueError, OverflowError, FloatingPointError) as exc:
                # numpy raises OverflowError for e.g. 300 as int8; pydantic only turns ValueError
                # into a validation error, anything else would escape validation.
                raise ValueError(f"data: cannot read the list as {dtype} ({clip(str(exc), 120)}); "
                                 "send numbers that fit the dtype") from None
            fields = _array_fields(array)
            if "shape" in value:
                fields["shape"] = value["shape"]
            return {**value, **fields}
        return value

    @model_validator(mode="after")
    def _check(self) -> Tensor:
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype: {_short(self.dtype)} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}")
        if len(self.shape) > MAX_TENSOR_DIMS:
            raise ValueError(f"shape: {len(self.shape)} dimensions exceed the limit of {MAX_TENSOR_DIMS}; "
                             "flatten the tensor")
        if any(d < 0 for d in self.shape):
            raise ValueError(f"shape: dimensions must be >= 0, got {_short(self.shape, 120)}")
        if any(d > MAX_TENSOR_ELEMENTS for d in self.shape):  # [0, 2**70] has 0 elements yet breaks numpy
            raise ValueError(f"shape: a dimension exceeds the limit of {MAX_TENSOR_ELEMENTS}, "
                             f"got {_short(self.shape, 120)}")
        count = math.prod(self.shape)
        if count > MAX_TENSOR_ELEMENTS:
            raise ValueError(f"shape: {_short(count)} elements exceed the limit of {MAX_TENSOR_ELEMENTS}; "
                             "mirror a smaller tensor (or a summary of it)")
        try:
            raw = base64.b64decode(self.data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("data: not valid base64; send base64 of the little-endian bytes, or a list") from exc
        little = _LITTLE_ENDIAN[self.dtype]
        if len(raw) != count * little.itemsize:
            raise ValueError(
                f"data: holds {len(raw)} bytes but shape {self.shape} of {self.dtype} needs {count * little.itemsize}; "
                "make shape match the data"
            )
        # The private slot directly: pydantic's __setattr__ for a private attribute costs more than
        # the decode itself on the replay hot path.
        self.__pydantic_private__["_array"] = np.frombuffer(raw, dtype=little).reshape(self.shape)
        return self

    @classmethod
    def from_array(cls, array: Any, dtype: str | None = None) -> Tensor:
        """Encode a numpy array (or anything ``np.asarray`` takes)."""
        arr = np.asarray(array, dtype=dtype)
        return cls.model_validate(_array_fields(arr))

    def __eq__(self, other: object) -> bool:
        # The decoded array is a cache of ``data``; equality is the wire form's.
        if not isinstance(other, Tensor):
            return NotImplemented
        return (self.dtype, self.shape, self.data) == (other.dtype, other.shape, other.data)

    __hash__ = None  # type: ignore[assignment]

    def to_array(self) -> np.ndarray:
        """The decoded array (read-only view; copy before writing to it)."""
        # Read the private slot directly: pydantic's attribute lookup for private attributes costs
        # more than the rest of this call on the replay hot path.
        array = self.__pydantic_private__["_array"]
        assert array is not None
        return array


def _array_fields(array: np.ndarray) -> dict[str, Any]:
    name = array.dtype.name
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype: {name!r} is not supported; cast to one of {', '.join(SUPPORTED_DTYPES)}")
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return {"dtype": name, "shape": list(array.shape), "data": base64.b64encode(little.tobytes()).decode("ascii")}


def encode_tensors(arrays: dict[str, Any]) -> dict[str, Tensor]:
    """Encode a mapping of name -> array-like into wire tensors."""
    return {name: Tensor.from_array(value) for name, value in arrays.items()}


def decode_tensors(tensors: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """Decode wire tensors into numpy arrays."""
    return {name: tensor.to_array() for name, tensor in tensors.items()}
