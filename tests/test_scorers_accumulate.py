"""PairAccumulator: merge(a, b) equals one update on the concatenation; compact JSON round-trip."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scorers.accumulate import MAX_SLICE_VALUES, OTHER, TOP_EXAMPLES, PairAccumulator
from scorers.diffs import ClassificationDiffs, classification_diffs

SUMMARY_KEYS = {"requests", "errors", "label_flips", "flip_rate", "mean_abs_confidence_delta",
                "baseline_latency_p50_ms", "baseline_latency_p95_ms", "baseline_latency_p99_ms",
                "candidate_latency_p50_ms", "candidate_latency_p95_ms", "candidate_latency_p99_ms"}


def batch(seed: int, n: int, start: int = 0):
    rng = np.random.default_rng(seed)
    b = rng.dirichlet(np.ones(4), n)
    c = np.where(rng.random((n, 1)) < 0.3, rng.dirichlet(np.ones(4), n), b)
    c[rng.random(n) < 0.1] = np.nan
    d = classification_diffs(b, c)
    lat_c = rng.lognormal(2, 0.5, n)
    lat_c[~d.ok] = np.nan
    return dict(diffs=d, baseline_latency_ms=rng.lognormal(2, 0.5, n), candidate_latency_ms=lat_c,
                request_ids=[f"r{start + i}" for i in range(n)],
                attributes=[{"country": "abc"[int(i) % 3], "device": "xy"[int(i) % 2]} for i in rng.integers(0, 6, n)],
                labels=np.where(rng.random(n) < 0.5, rng.integers(0, 4, n), np.nan),
                baseline_confidence=b.max(axis=1), candidate_confidence=c.max(axis=1))


def concat(x, y):
    return dict(diffs=ClassificationDiffs.concat([x["diffs"], y["diffs"]]),
                **{k: (list(x[k]) + list(y[k])) if isinstance(x[k], list) else np.concatenate([x[k], y[k]])
                   for k in x if k != "diffs"})


def assert_same(a: PairAccumulator, b: PairAccumulator):
    da, db = a.to_dict(), b.to_dict()
    sums_a, sums_b = da.pop("sums"), db.pop("sums")
    for k in sums_a:
        assert sums_a[k] == pytest.approx(sums_b[k], abs=1e-9)
    for side in ("baseline_latency", "candidate_latency"):
        sa, sb = da.pop(side), db.pop(side)
        assert sa.pop("sum") == pytest.approx(sb.pop("sum"))
        assert sa == sb
    slices_a, slices_b = da.pop("slices"), db.pop("slices")
    assert slices_a.keys() == slices_b.keys()
    for k in slices_a:
        assert slices_a[k].keys() == slices_b[k].keys()
        for v in slices_a[k]:
            assert slices_a[k][v][:4] == slices_b[k][v][:4]
            assert slices_a[k][v][4] == pytest.approx(slices_b[k][v][4])
            assert slices_a[k][v][5:] == slices_b[k][v][5:]
    assert da == db


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 60), st.integers(0, 60))
def test_merge_equals_update_on_concatenation(seed, n1, n2):
    x, y = batch(seed, n1), batch(seed + 1, n2, start=1000)
    a, b, ab = PairAccumulator(), PairAccumulator(), PairAccumulator()
    a.update(**x)
    b.update(**y)
    ab.update(**concat(x, y))
    a.merge(b)
    assert_same(a, ab)
    # and through JSON, as the changelog does
    assert_same(PairAccumulator.from_dict(json.loads(json.dumps(a.to_dict()))), ab)


def test_counts_summary_and_examples():
    x = batch(1, 500)
    acc = PairAccumulator()
    acc.update(**x)
    d = x["diffs"]
    assert acc.requests == 500 and acc.errors == int((~d.ok).sum()) and acc.scored == int(d.ok.sum())
    assert acc.label_flips == int(d.label_flip.sum())
    s = acc.summary()
    assert set(s) == SUMMARY_KEYS
    assert s["flip_rate"] == pytest.approx(d.label_flip[d.ok].mean())
    assert s["mean_abs_confidence_delta"] == pytest.approx(np.abs(d.confidence_delta[d.ok]).mean())
    assert acc.candidate_latency.missing == acc.errors
    assert acc.error_reasons == {"candidate output has NaN": acc.errors}
    ids = acc.example_request_ids
    assert len(ids) == TOP_EXAMPLES
    err_ids = {f"r{i}" for i in np.flatnonzero(~d.ok)}
    assert set(ids) <= err_ids  # errors rank first
    assert acc.labelled == int((np.isfinite(x["labels"]) & d.ok).sum())
    assert sum(st.requests for st in acc.slices["country"].values()) == 500


def test_empty_summary_has_nones():
    s = PairAccumulator().summary()
    assert s["flip_rate"] is None and s["baseline_latency_p99_ms"] is None and s["requests"] == 0
    json.dumps(PairAccumulator().to_dict())


def test_slice_values_are_bounded():
    n = MAX_SLICE_VALUES + 20
    d = classification_diffs(np.full((n, 2), 0.5) + [0.1, -0.1], np.full((n, 2), 0.5) + [0.1, -0.1])
    acc = PairAccumulator()
    acc.update(d, baseline_latency_ms=np.ones(n), candidate_latency_ms=np.ones(n),
               request_ids=[str(i) for i in range(n)], attributes=[{"user": f"u{i:04d}"} for i in range(n)])
    table = acc.slices["user"]
    assert len(table) == MAX_SLICE_VALUES + 1 and table[OTHER].requests == 20


def test_to_dict_is_small_for_large_spans():
    acc = PairAccumulator()
    for i in range(20):
        acc.update(**batch(i, 1000, start=i * 1000))
    assert acc.requests == 20_000
    assert len(json.dumps(acc.to_dict())) < 12_000


def test_update_rejects_misaligned_ids():
    x = batch(0, 5)
    x["request_ids"] = x["request_ids"][:3]
    with pytest.raises(ValueError):
        PairAccumulator().update(**x)
