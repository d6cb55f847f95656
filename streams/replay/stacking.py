"""A micro-batch's requests as arrays: grouping by input signature, stacking inputs, reading
baseline outputs. Plain requests (schemas/fast_path.py) are joined as bytes and read once: no
array or pydantic object per request on the replay stage's hot path."""

from __future__ import annotations

from operator import attrgetter, itemgetter

import numpy as np

from schemas.fast_path import PlainRequest, PlainTensor
from schemas.tensors import _LITTLE_ENDIAN
from streams.config import CandidateConfig

_DATA, _DTYPE, _BASELINE = attrgetter("data"), attrgetter("dtype"), attrgetter("baseline_output")


def stack(tensors: list) -> np.ndarray:
    """One input of a group (same dtype and per-row shape), one row per request. Plain tensors
    of one row each are joined as bytes and read once: no array per request."""
    first = tensors[0]
    # A group shares dtype and per-row shape (groups_by_signature), so one row each holds for all
    # when it holds for the first; only the type is checked per request (in C: a set of types).
    if type(first) is PlainTensor and (len(first.shape) < 2 or first.shape[0] == 1) and _all_plain(tensors):
        row = first.shape[1:] if len(first.shape) >= 2 else first.shape
        return np.frombuffer(b"".join(map(_DATA, tensors)), dtype=_LITTLE_ENDIAN[first.dtype]).reshape(
            len(tensors), *row
        )
    return np.concatenate([as_batch(t.to_array()) for t in tensors])


def _all_plain(tensors: list) -> bool:
    return set(map(type, tensors)) == {PlainTensor}


# Raw input signature (names in message order, dtypes, shapes as sent) -> the canonical one:
# messages of one producer repeat the same few, so the sorting and normalising is done once each.
_SIGNATURES: dict[tuple, tuple] = {}
_MAX_SIGNATURES = 4096  # bounded: a producer sending ever new shapes only costs the cache


def _canonical(raw: tuple) -> tuple:
    # Shapes as one row sees them: (64,) and (1, 64) stack alike; (5, 64) is its own group.
    return tuple(sorted((n, d, s if len(s) >= 2 else (1, *s)) for n, d, s in raw))


def groups_by_signature(items):
    """Requests whose inputs stack (same names, dtypes, per-row shapes), in arrival order."""
    groups: dict[tuple, list] = {}
    known = _SIGNATURES
    for item in items:
        inputs = item[0].inputs
        if len(inputs) == 1:  # the usual request: one input, no comprehension (a call of its own)
            ((n, t),) = inputs.items()
            raw = ((n, t.dtype, t.shape if type(t.shape) is tuple else tuple(t.shape)),)
        else:
            raw = tuple([(n, t.dtype, tuple(t.shape)) for n, t in inputs.items()])
        sig = known.get(raw)
        if sig is None:
            if len(known) >= _MAX_SIGNATURES:
                known.clear()
            sig = known[raw] = _canonical(raw)
        group = groups.get(sig)
        if group is None:
            groups[sig] = [item]
        else:
            group.append(item)
    return list(groups.values())


def baseline_rows(events: list, cfg: CandidateConfig, width: int | None):
    """The baseline's outputs as an (n, width) array (width None: the first request's); a missing
    or mis-shaped one is a row problem (index -> reason naming the field)."""
    joined = _joined_baseline(events, cfg.baseline_output, width)
    if joined is not None:
        return joined, {}
    base, problems = None, {}
    for i, ev in enumerate(events):
        tensor = ev.baseline_output.get(cfg.baseline_output)
        if tensor is None:
            have = ", ".join(sorted(ev.baseline_output)) or "none"
            problems[i] = f"baseline_output.{cfg.baseline_output}: missing in the request (it has: {have})"
            continue
        row = np.asarray(tensor.to_array(), dtype=np.float64).reshape(-1)
        width = row.shape[0] if width is None else width
        if base is None:
            base = np.full((len(events), width), np.nan)
        if row.shape[0] != width:
            problems[i] = (f"baseline_output.{cfg.baseline_output}: {row.shape[0]} values, the candidate's "
                           f"{cfg.output} has {width}; shape mismatch")  # fmt: skip
            continue
        base[i] = row
    return (np.full((len(events), width or 1), np.nan) if base is None else base), problems



def _joined_baseline(events, name: str, width: int | None) -> np.ndarray | None:
    """The common case of ``baseline_rows`` in one read: plain requests whose baseline output
    ``name`` has one dtype and ``width`` values each (None: anything else, row by row)."""
    if set(map(type, events)) != {PlainRequest}:
        return None
    try:
        tensors = list(map(itemgetter(name), map(_BASELINE, events)))  # in C: no Python per request
    except KeyError:
        return None
    first, data = tensors[0], list(map(_DATA, tensors))
    # One dtype and one byte length for all (maps in C: no Python per request).
    if len(set(map(_DTYPE, tensors))) != 1 or len(set(map(len, data))) != 1:
        return None
    rows = np.frombuffer(b"".join(data), dtype=_LITTLE_ENDIAN[first.dtype]).reshape(len(tensors), -1)
    if width is not None and rows.shape[1] != width:
        return None
    return rows.astype(np.float64)


def as_batch(array: np.ndarray) -> np.ndarray:
    # A request tensor of shape (64,) and (1, 64) both mean one row of 64 features.
    return array if array.ndim >= 2 else array[None, ...]
