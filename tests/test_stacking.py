"""streams/replay/stacking.py: plain requests' tensors joined as bytes read exactly as the per-request
arrays pydantic's requests give, whatever mix of forms and shapes a micro-batch holds."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import Tensor
from schemas.decode import decode_for_replay
from schemas.fast_path import PlainRequest
from streams.config import CandidateConfig
from streams.replay.stacking import baseline_rows, groups_by_signature, stack


def _raw(i: int, pixels: np.ndarray, probs: np.ndarray, as_list: bool = False) -> bytes:
    def tensor(a: np.ndarray) -> dict:
        t = Tensor.from_array(a).model_dump()
        return {**t, "data": a.tolist()} if as_list else t  # list data: pydantic's path

    return json.dumps({"request_id": f"r{i}", "model": "digits", "baseline_version": "v1",
                       "sent_at": "2026-11-27T04:50:13Z", "inputs": {"pixels": tensor(pixels)},
                       "baseline_output": {"probabilities": tensor(probs)}, "baseline_latency_ms": 1.0}).encode()  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=12), st.integers(0, 2**32 - 1))
def test_joined_bytes_equal_per_request_arrays(forms, seed):
    """Each request: list form (pydantic) or base64 (plain), shape (64,) or (1, 64)."""
    rng = np.random.default_rng(seed)
    events = []
    for i, (as_list, flat) in enumerate(forms):
        pixels = rng.random(64 if flat else (1, 64), dtype=np.float32)
        events.append((decode_for_replay(_raw(i, pixels, rng.random(10), as_list)), None))
    assert all(isinstance(ev, PlainRequest) != as_list for (ev, _), (as_list, _) in zip(events, forms, strict=True))
    (group,) = groups_by_signature(events)  # (64,) and (1, 64) stack alike
    evs = [ev for ev, _ in group]
    stacked = stack([ev.inputs["pixels"] for ev in evs])
    expected = np.concatenate([ev.inputs["pixels"].to_array().reshape(1, 64) for ev in evs])
    assert stacked.dtype == expected.dtype and np.array_equal(stacked, expected)
    rows, problems = baseline_rows(evs, CandidateConfig.model_construct(baseline_output="probabilities"), 10)
    assert not problems
    assert np.array_equal(rows, np.stack([ev.baseline_output["probabilities"].to_array().astype(np.float64) for ev in evs]))


def test_a_mis_shaped_baseline_is_still_named_per_request():
    rng = np.random.default_rng(0)
    evs = [decode_for_replay(_raw(0, rng.random((1, 64), dtype=np.float32), rng.random(10))),
           decode_for_replay(_raw(1, rng.random((1, 64), dtype=np.float32), rng.random(7)))]  # fmt: skip
    rows, problems = baseline_rows(evs, CandidateConfig.model_construct(baseline_output="probabilities"), 10)
    assert list(problems) == [1] and "7 values" in problems[1] and rows.shape == (2, 10)
    assert np.isnan(rows[1]).all() and not np.isnan(rows[0]).any()
