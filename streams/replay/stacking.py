"""A micro-batch's requests as arrays: grouping by input signature, stacking inputs, reading
baseline outputs. Plain requests (schemas/fast_path.py) are joined as bytes and read once: no
array or pydantic object per request on the replay stage's hot path."""

from __future__ import annotations

import numpy as np

from schemas.fast_path import PlainRequest, PlainTensor
from schemas.tensors import _LITTLE_ENDIAN
from streams.config import CandidateConfig


def stack(tensors: list) -> np.ndarray:
    """One input of a group (same dtype and per-row shape), one row per request. Plain tensors
    of one row each are joined as bytes and read once: no array per request."""
    first = tensors[0]
    if type(first) is PlainTensor and all(type(t) is PlainTensor and (len(t.shape) < 2 or t.shape[0] == 1)
                                          for t in tensors):  # fmt: skip
        row = first.shape[1:] if len(first.shape) >= 2 else first.shape
        return np.frombuffer(b"".join([t.data for t in tensors]), dtype=_LITTLE_ENDIAN[first.dtype]).reshape(
            len(tensors), *row
        )
    return np.concatenate([as_batch(t.to_array()) for t in tensors])


def groups_by_signature(items):
    """Requests whose inputs stack (same names, dtypes, per-row shapes), in arrival order."""
    groups: dict[tuple, list] = {}
    for ev, msg in items:
        # Shapes as one row sees them: (64,) and (1, 64) stack alike; (5, 64) is its own group.
        sig = tuple(sorted((n, t.dtype, tuple(t.shape) if len(t.shape) >= 2 else (1, *t.shape)) for n, t in ev.inputs.items()))
        groups.setdefault(sig, []).append((ev, msg))
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
    tensors = [ev.baseline_output.get(name) if type(ev) is PlainRequest else None for ev in events]
    first = tensors[0]
    if first is None:
        return None
    size = len(first.data)
    if any(t is None or t.dtype != first.dtype or len(t.data) != size for t in tensors):
        return None
    rows = np.frombuffer(b"".join([t.data for t in tensors]), dtype=_LITTLE_ENDIAN[first.dtype]).reshape(len(tensors), -1)
    if width is not None and rows.shape[1] != width:
        return None
    return rows.astype(np.float64)


def as_batch(array: np.ndarray) -> np.ndarray:
    # A request tensor of shape (64,) and (1, 64) both mean one row of 64 features.
    return array if array.ndim >= 2 else array[None, ...]
