"""Latency sketch: relative error, agreement with the ddsketch package, exact merges, serialisation."""

import json

import ddsketch
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scorers.sketch import LatencySketch

QS = (0.5, 0.9, 0.95, 0.99, 0.999)


@pytest.mark.parametrize("dist", ["lognormal", "pareto", "uniform", "bimodal"])
def test_quantiles_within_one_percent(dist):
    rng = np.random.default_rng(7)
    n = 200_000
    x = {"lognormal": rng.lognormal(3, 1.2, n), "pareto": (rng.pareto(1.5, n) + 1) * 5,
         "uniform": rng.uniform(0.1, 1000, n),
         "bimodal": np.concatenate([rng.normal(5, 0.5, n // 2).clip(0.01), rng.normal(300, 30, n // 2)])}[dist]
    s = LatencySketch()
    for part in np.array_split(x, 7):
        s.update(part)
    for q in QS:
        exact = np.quantile(x, q, method="lower")
        assert abs(s.quantile(q) - exact) <= 0.005 * exact + 1e-12, (q, s.quantile(q), exact)


def test_agrees_with_ddsketch_package():
    x = np.random.default_rng(3).lognormal(2, 1, 20_000)
    ref = ddsketch.DDSketch(relative_accuracy=0.005)
    for v in x:
        ref.add(float(v))
    s = LatencySketch(relative_accuracy=0.005)
    s.update(x)
    for q in (0.0, 0.1, 0.5, 0.9, 0.99, 0.999):
        assert s.quantile(q) == pytest.approx(ref.get_quantile_value(q), rel=1e-9) or q == 0.0


def test_missing_zero_and_empty():
    s = LatencySketch()
    assert s.quantile(0.5) is None and s.count == 0
    s.update([np.nan, -1.0, np.inf, 0.0, 0.0, 10.0])
    assert s.missing == 3 and s.count == 3 and s.zero_count == 2
    assert s.quantile(0.0) == 0.0 and s.quantile(1.0) == pytest.approx(10.0, rel=0.005)
    s.update(5.0)
    assert s.count == 4


def test_bounded_buckets_collapse_lowest():
    s = LatencySketch(max_buckets=100)
    s.update(np.geomspace(0.001, 1e5, 10_000))
    assert s.counts.size <= 100 and s.collapsed
    assert s.quantile(0.99) == pytest.approx(np.quantile(np.geomspace(0.001, 1e5, 10_000), 0.99, method="lower"),
                                             rel=0.005)


values = st.lists(st.floats(0, 1e5, allow_nan=False), max_size=300)


@settings(max_examples=80, deadline=None)
@given(values, values)
def test_merge_equals_update_on_concatenation(a, b):
    sa, sb, sab = LatencySketch(), LatencySketch(), LatencySketch()
    sa.update(a)
    sb.update(b)
    sab.update(a + b)
    sa.merge(sb)
    assert sa.count == sab.count and sa.zero_count == sab.zero_count
    assert sa.sum == pytest.approx(sab.sum)
    for q in QS:
        assert sa.quantile(q) == sab.quantile(q)
    back = LatencySketch.from_dict(json.loads(json.dumps(sa.to_dict())))
    assert [back.quantile(q) for q in QS] == [sa.quantile(q) for q in QS] and back.count == sa.count


def test_serialisation_is_compact():
    s = LatencySketch()
    s.update(np.random.default_rng(0).lognormal(3, 1, 1_000_000))
    assert len(json.dumps(s.to_dict())) < 8_000


def test_merge_refuses_other_accuracy():
    with pytest.raises(ValueError):
        LatencySketch(0.005).merge(LatencySketch(0.01))
