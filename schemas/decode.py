"""Reading a Kafka message value into a ``MirroredRequest``, or a ``Rejection`` saying why not.

``decode_request`` never raises (any ``Exception`` becomes a rejection), so a streaming worker
can turn every unscorable message into a dead letter and move on. Checks run cheapest first,
and each one bounds the cost of the next:

1. ``None`` (a Kafka tombstone) -> ``tombstone``.
2. More than ``MAX_MESSAGE_BYTES`` -> ``oversized``, without reading it.

   A valid request in the plain form the SDK writes is read right here (schemas/fast_path.py),
   without pydantic's per-field machinery; everything else goes on:

3. Not UTF-8 -> ``invalid_json``.
4. Nested deeper than ``MAX_JSON_DEPTH`` -> ``too_deep``, found by a scan *before* parsing:
   ``json.loads`` recurses per level and "[" * 200000 would raise RecursionError (or worse,
   exhaust the C stack in a thread with a small one). A RecursionError is still caught.
5. Not JSON -> ``invalid_json``.
6. Validated by pydantic. Not a valid ``MirroredRequest`` -> ``invalid_tensor`` when any problem is inside a named
   tensor of ``inputs``/``baseline_output``, else ``invalid_schema``.
7. Valid but unscorable (``check_scorable``): a tensor with a zero-size dimension ->
   ``invalid_tensor``; NaN/infinity in an input tensor -> ``non_finite_input``. Non-finite
   *baseline outputs* pass decoding: only the output a candidate compares with matters, and the
   replay stage makes a request whose configured baseline output is NaN, infinite or no
   probability vector a ``baseline_invalid`` dead letter for that candidate (streams/replay/blame.py).

Anything else (a bug, MemoryError) -> ``other``, naming the exception.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import ValidationError

from schemas.fast_path import PlainRequest, parse_plain_request
from schemas.dead_letter import MAX_REASON_CHARS
from schemas.events import MirroredRequest, describe_validation_error
from schemas.tensors import clip

MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # 8 MiB: far above a real request (the SDK's default max is 1 MiB)
# A valid request nests object > inputs > tensor > data lists (up to MAX_TENSOR_DIMS = 32 deep):
# 35 levels at most; 64 leaves room and stays far below Python's recursion limit.
MAX_JSON_DEPTH = 64

RejectionType = Literal[
    "tombstone", "oversized", "invalid_json", "too_deep", "invalid_schema", "invalid_tensor",
    "non_finite_input", "other",
]  # fmt: skip
_FLOAT_KINDS = "f"  # numpy dtype kinds that can hold NaN or infinity


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a message cannot be scored: ``error_type`` (one of ``RejectionType``, the
    ``DeadLetter.error_type`` to use) and a one-line ``reason`` naming the field and the fix."""

    error_type: RejectionType
    reason: str


def decode_request(
    raw: bytes | bytearray | memoryview | str | None,
    *,
    max_bytes: int = MAX_MESSAGE_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
    check_finite: bool = True,
) -> MirroredRequest | Rejection:
    """A validated, scorable request, or the ``Rejection`` that says why not. Never raises
    ``Exception``s (``KeyboardInterrupt``/``SystemExit`` still propagate).

    ``check_finite=False`` leaves the NaN/infinity check of the inputs to the caller (the replay
    stage does it once over a micro-batch's stacked inputs)."""
    decoded = _guarded(raw, max_bytes, max_depth, check_finite)
    return decoded.to_request() if isinstance(decoded, PlainRequest) else decoded


def decode_for_replay(
    raw: bytes | bytearray | memoryview | str | None, *, max_bytes: int = MAX_MESSAGE_BYTES
) -> PlainRequest | MirroredRequest | Rejection:
    """``decode_request(raw, check_finite=False)``, except that a request in the plain form comes
    back as the ``PlainRequest`` the fast path read (no pydantic objects: the replay stage stacks
    its tensors' bytes directly). Its inputs' finiteness is the caller's to check."""
    return _guarded(raw, max_bytes, MAX_JSON_DEPTH, False)


def _guarded(raw, max_bytes: int, max_depth: int, check_finite: bool) -> PlainRequest | MirroredRequest | Rejection:
    try:
        return _decode(raw, max_bytes, max_depth, check_finite)
    except RecursionError:
        return _reject("too_deep", "(message): nesting exhausted Python's recursion limit; keep JSON within "
                                   f"{MAX_JSON_DEPTH} levels")  # fmt: skip
    except Exception as exc:  # the contract: a message never takes the worker down
        return _reject("other", f"(message): unexpected {type(exc).__name__} while decoding: {_text(exc)}")


def _decode(raw, max_bytes: int, max_depth: int, check_finite: bool = True) -> MirroredRequest | Rejection:
    if raw is None:
        return Rejection("tombstone", "(message): null value (a tombstone); producers must send a MirroredRequest")
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")  # lone surrogates then fail the UTF-8 check below
    elif not isinstance(raw, bytes):
        raw = bytes(raw)
    if len(raw) > max_bytes:
        return Rejection("oversized", f"(message): {len(raw)} bytes exceed the limit of {max_bytes}; "
                                      "mirror smaller tensors (or a summary of them)")  # fmt: skip
    plain = parse_plain_request(raw)  # the common well-formed case, without pydantic's per-field machinery
    if plain is not None:  # its shapes are checked already: only the inputs' finiteness is left
        return (_non_finite(plain) if check_finite else None) or plain
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejection("invalid_json", f"(message): not UTF-8 ({exc.reason} at byte {exc.start}); "
                                         "send UTF-8 JSON")  # fmt: skip
    # Fast path: a request's tensor data is base64 (no brackets in its alphabet), so a real message
    # has a few dozen brackets in all and cannot nest deeper than that count: skip the scan.
    depth = 0 if raw.count(b"[") + raw.count(b"{") <= max_depth else json_nesting_depth(raw)
    if depth > max_depth:
        return Rejection("too_deep", f"(message): JSON nests {depth} levels, over the limit of {max_depth}; "
                                     "send a MirroredRequest (tensor data as base64, not deep lists)")  # fmt: skip
    try:
        # pydantic's own JSON parser: faster than json.loads + model_validate on the hot path.
        request = MirroredRequest.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        if any(e["type"] == "json_invalid" for e in errors):
            try:  # the standard parser's message names the position the way people expect
                json.loads(text)
            except ValueError as parse_error:  # JSONDecodeError, integers over 4300 digits
                return _reject("invalid_json", f"(message): not valid JSON: {_text(parse_error)}")
            return _reject("invalid_json", f"(message): not valid JSON: {errors[0]['msg']}")
        tensor = any(_is_tensor_error(e["loc"]) for e in errors)
        return _reject("invalid_tensor" if tensor else "invalid_schema", describe_validation_error(exc))
    return check_scorable(request, check_finite) or request


def check_scorable(request: MirroredRequest, check_finite: bool = True) -> Rejection | None:
    """What a valid request still needs to be scored, or ``None`` when it has it.

    Every tensor in ``inputs`` and ``baseline_output`` has at least one element (no dimension
    is 0: an empty tensor can be neither replayed nor compared), and every float tensor in
    ``inputs`` is finite (NaN/infinity inputs are the producer's bad data: replaying them
    measures nothing). Scalars (shape ``[]``) hold one element and pass.
    """
    for field, tensors in (("inputs", request.inputs), ("baseline_output", request.baseline_output)):
        for name, tensor in tensors.items():
            for axis, size in enumerate(tensor.shape):
                if size == 0:
                    return _reject("invalid_tensor", f"{field}.{clip(name, 64)}.shape: dimension {axis} is 0; "
                                                     "every dimension must be >= 1")  # fmt: skip
    return _non_finite(request) if check_finite else None


def _non_finite(request: MirroredRequest | PlainRequest) -> Rejection | None:
    for name, tensor in request.inputs.items():
        array = tensor.to_array()
        if array.dtype.kind in _FLOAT_KINDS:
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            if bad:
                return _reject("non_finite_input", f"inputs.{clip(name, 64)}: {bad} of {array.size} values are NaN "
                                                   "or infinite; the producer must send finite inputs")  # fmt: skip
    return None


def json_nesting_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in JSON text ``raw`` (``1`` -> 0, ``[[]]`` -> 2), in C-speed
    passes (a regex and numpy), without parsing: brackets inside strings do not count.

    For invalid JSON the answer only bounds what a parser would reach before failing.
    """
    # Strings (escapes included) become "0"; an unterminated one runs to the end of the text, so
    # each byte is scanned once (no retry from every later quote, which would be quadratic).
    bare = _STRING.sub(b"0", raw)
    codes = np.frombuffer(bare, dtype=np.uint8)
    depth = deepest = 0
    for start in range(0, len(codes), _CHUNK):  # chunks bound the int32 temporaries to 4 MiB
        chunk = codes[start : start + _CHUNK]
        step = _STEP[chunk]
        if not step.any():
            continue
        levels = np.cumsum(step, dtype=np.int32)
        levels += depth
        deepest = max(deepest, int(levels.max()))
        depth = int(levels[-1])
    return deepest


_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.DOTALL)
_CHUNK = 1 << 20
_STEP = np.zeros(256, dtype=np.int8)  # per byte: +1 opens a level, -1 closes one
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1


def _is_tensor_error(loc: tuple) -> bool:
    # Inside a named tensor (the same rule as streams/pipeline.py has used): the producer's
    # encoding of that tensor, not the message's layout, is what needs fixing.
    return len(loc) >= 2 and loc[0] in ("inputs", "baseline_output")


def _reject(error_type: RejectionType, reason: str) -> Rejection:
    return Rejection(error_type, clip(reason, MAX_REASON_CHARS))


def _text(exc: BaseException) -> str:
    try:
        return clip(str(exc), 300)
    except Exception:  # a broken __str__ must not break the catch-all
        return "(unprintable)"
