"""Window divergences from mergeable counts (scorers.histograms + divergence.from_counts +
PairAccumulator.divergence) against the raw-data functions the worker used to run on rows read back.

Tolerances, and why (bins = CONFIDENCE_BINS = 50, all values in [0, 1]):

* chi2_labels_pvalue, stuart_maxwell_pvalue: equal (==) to the raw-data functions; same tables, same code;
* psi, kl, js_distance, hellinger: the same formulas on the same fixed-bin counts, computed here
  independently (np.histogram + scipy), to 1e-9 relative; they are *not* describe()'s numbers, which
  use 10 baseline-quantile bins;
* wasserstein: within 1/bins of the raw value (midpoints move each sample by <= half a bin in W1);
* ks: binned <= raw <= binned + the largest single-bin share of either sample;
* wasserstein_normalised: within (1/bins) / sd + 1e-6 relative slack (sd from 2^-20 fixed-point moments);
* merge: bit-for-bit the same dict as one accumulator over all rows (integer state).
"""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.spatial import distance

from scorers import divergence as dv
from scorers.accumulate import PairAccumulator
from scorers.diffs import classification_diffs
from scorers.histograms import (
    CONFIDENCE_BINS,
    MAX_LABELS,
    MOMENT_SCALE,
    ConfidenceHistogram,
    LabelPairTable,
    confidence_bins,
)

KEYS = set(dv.describe(np.arange(10.0), np.arange(10.0))) | {"chi2_labels_pvalue", "stuart_maxwell_pvalue"}
H = 1.0 / CONFIDENCE_BINS


def rows(seed: int, n: int, *, k: int = 4, alpha: float = 0.3, flip: float = 0.3, drift: float = 1.0):
    """Probability rows for both models; candidate rows re-drawn (sharper / flatter with ``drift``) for a
    share ``flip`` of requests, a few NaN rows that become candidate errors."""
    rng = np.random.default_rng(seed)
    b = rng.dirichlet(np.full(k, alpha), n)
    c = np.where(rng.random((n, 1)) < flip, rng.dirichlet(np.full(k, alpha * drift), n), b)
    c[rng.random(n) < 0.05] = np.nan
    return b, c


def accumulate(b, c, start: int = 0, acc: PairAccumulator | None = None) -> PairAccumulator:
    acc = acc or PairAccumulator()
    n = len(b)
    acc.update(classification_diffs(b, c), baseline_latency_ms=np.ones(n), candidate_latency_ms=np.ones(n),
               request_ids=[f"r{start + i}" for i in range(n)], baseline_confidence=b.max(axis=1),
               candidate_confidence=c.max(axis=1))
    return acc


def raw_columns(b, c):
    """What sink.window_predictions returned: scored rows only."""
    d = classification_diffs(b, c)
    ok = d.ok
    return b.max(axis=1)[ok], c.max(axis=1)[ok], d.baseline_label[ok], d.candidate_label[ok]


def reference_binned(x, y, smoothing=dv.DEFAULT_SMOOTHING):
    """PSI / KL / JS / Hellinger on the fixed bins, independently of scorers (np.histogram, scipy)."""
    hb = np.histogram(x, bins=CONFIDENCE_BINS, range=(0, 1))[0].astype(float)
    hc = np.histogram(y, bins=CONFIDENCE_BINS, range=(0, 1))[0].astype(float)
    used = (hb + hc) > 0
    hb, hc = hb[used], hc[used]
    sb, sc = (hb + smoothing) / (hb + smoothing).sum(), (hc + smoothing) / (hc + smoothing).sum()
    pb, pc = hb / hb.sum(), hc / hc.sum()
    return {"psi": float(np.sum((sc - sb) * np.log(sc / sb))), "kl": float(stats.entropy(sc, sb)),
            "js_distance": float(distance.jensenshannon(pb, pc)),
            "hellinger": float(distance.euclidean(np.sqrt(pb), np.sqrt(pc)) / np.sqrt(2))}


# -- the tables ------------------------------------------------------------------------------
def test_binning_convention():
    edge = np.linspace(0, 1, CONFIDENCE_BINS + 1)
    assert confidence_bins([0.0, edge[1], edge[1] - 1e-12, 1.0, 1.0005, -1e-7]).tolist() == [0, 1, 0, 49, 49, 0]
    x = np.random.default_rng(3).random(10_000)
    np.testing.assert_array_equal(np.bincount(confidence_bins(x), minlength=CONFIDENCE_BINS),
                                  np.histogram(x, bins=CONFIDENCE_BINS, range=(0, 1))[0])
    h = ConfidenceHistogram()
    h.update([0.5, np.nan, np.inf, 0.25])
    assert h.total == 2 and h.missing == 2 and h.mean() == pytest.approx(0.375)


def test_std_from_fixed_point_moments():
    rng = np.random.default_rng(4)
    for x in (rng.beta(8, 1, 5000), rng.random(3), np.full(10, 0.7), np.array([0.999, 0.9991, 0.9992])):
        h = ConfidenceHistogram()
        h.update(x)
        assert h.std() == pytest.approx(np.std(x, ddof=1), abs=2 / MOMENT_SCALE)
    h = ConfidenceHistogram()
    h.update([0.4])
    assert h.std() is None


def test_label_pairs_are_bounded():
    t = LabelPairTable()
    b = np.arange(MAX_LABELS + 10)
    t.update(b, b)
    assert len(t.labels) == MAX_LABELS and t.overflow == 10 and t.total == MAX_LABELS
    t.update([0, 0, 70], [1, 70, 0])  # known pair kept; pairs needing a new label overflow
    assert t.pairs[(0, 1)] == 1 and t.overflow == 12
    t2 = LabelPairTable.from_dict(json.loads(json.dumps(t.to_dict())))
    assert t2.pairs == t.pairs and t2.labels == t.labels and t2.overflow == t.overflow


hist_batches = st.lists(st.floats(-0.1, 1.1) | st.just(float("nan")), max_size=40)
label_batches = st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), max_size=40)


@settings(max_examples=60, deadline=None)
@given(hist_batches, hist_batches, hist_batches, label_batches, label_batches, label_batches)
def test_merge_is_associative_and_order_free(x, y, z, p, q, r):
    def hist(v):
        h = ConfidenceHistogram()
        h.update(np.asarray(v, dtype=float))
        return h

    def table(v, max_labels=MAX_LABELS):
        t = LabelPairTable(max_labels)
        if v:
            t.update(*np.asarray(v).T)
        return t

    for make, batches in ((hist, (x, y, z)), (table, (p, q, r))):
        a, b, c = (make(v) for v in batches)
        left, bc = make(batches[0]), make(batches[1])
        left.merge(b)
        left.merge(c)  # (a + b) + c
        bc.merge(c)
        a.merge(bc)  # a + (b + c)
        ca, cb = make(batches[2]), make(batches[1])
        ca.merge(cb)
        ca.merge(make(batches[0]))  # (c + b) + a
        one = make(batches[0] + batches[1] + batches[2])
        assert left.to_dict() == a.to_dict() == ca.to_dict() == one.to_dict()
    # past the label limit the overflow bucket depends on order, but no pair is lost
    a, b, c = table(p, 4), table(q, 4), table(r, 4)
    a.merge(b)
    a.merge(c)
    assert a.total + a.overflow == len(p) + len(q) + len(r) and len(a.labels) <= 4


# -- the statistics --------------------------------------------------------------------------
SCENARIOS = [dict(seed=s, n=n, k=k, alpha=a, drift=d) for s, n, k, a, d in
             [(0, 3000, 4, 0.3, 1.0), (1, 3000, 4, 0.3, 3.0), (2, 500, 10, 0.2, 0.5), (3, 40, 3, 1.0, 1.0),
              (4, 5000, 2, 0.5, 2.0), (5, 2000, 20, 0.1, 1.5)]]


@pytest.mark.parametrize("case", SCENARIOS, ids=lambda c: f"seed{c['seed']}-n{c['n']}-k{c['k']}")
def test_count_statistics_agree_with_the_raw_data_functions(case):
    b, c = rows(case["seed"], case["n"], k=case["k"], alpha=case["alpha"], drift=case["drift"])
    got = accumulate(b, c).divergence()
    assert set(got) == KEYS and all(np.isfinite(v) for v in got.values())
    xb, xc, lb, lc = raw_columns(b, c)
    # exact: the same tables through the same code
    assert got["chi2_labels_pvalue"] == dv.chi2_labels(lb, lc).pvalue
    assert got["stuart_maxwell_pvalue"] == dv.stuart_maxwell(lb, lc).pvalue
    # exact given the binning
    for k, v in reference_binned(xb, xc).items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    # approximate, with the documented bounds
    w = dv.wasserstein(xb, xc).statistic
    assert w == pytest.approx(stats.wasserstein_distance(xb, xc))
    assert abs(got["wasserstein"] - w) <= H + 1e-12
    hb = np.histogram(xb, bins=CONFIDENCE_BINS, range=(0, 1))[0] / xb.size
    hc = np.histogram(xc, bins=CONFIDENCE_BINS, range=(0, 1))[0] / xc.size
    raw_ks = dv.ks(xb, xc).statistic
    assert got["ks"] <= raw_ks + 1e-12 and raw_ks <= got["ks"] + max(hb.max(), hc.max()) + 1e-12
    sd = np.std(xb, ddof=1)
    assert abs(got["wasserstein_normalised"] - dv.wasserstein_normalised(xb, xc).statistic) <= H / sd * (1 + 1e-6) + 1e-6


def test_merge_gives_the_same_divergence_exactly():
    b, c = rows(7, 2400, drift=2.0)
    whole = accumulate(b, c)
    parts = [accumulate(b[i:i + 700], c[i:i + 700], start=i) for i in range(0, 2400, 700)]
    forward, backward = PairAccumulator(), PairAccumulator()
    for p in parts:
        forward.merge(p)
    for p in reversed(parts):
        backward.merge(PairAccumulator.from_dict(json.loads(json.dumps(p.to_dict()))))
    assert forward.divergence() == backward.divergence() == whole.divergence()
    assert set(whole.divergence()) == KEYS


def test_round_trip_and_state_from_before_the_tables():
    acc = accumulate(*rows(8, 600))
    again = PairAccumulator.from_dict(json.loads(json.dumps(acc.to_dict())))
    assert again.to_dict() == acc.to_dict() and again.divergence() == acc.divergence()
    assert acc.copy().divergence() == acc.divergence()
    old = acc.to_dict()
    del old["confidence"], old["label_pairs"]
    old["v"] = 1
    restored = PairAccumulator.from_dict(old)
    assert restored.baseline_confidence.total == 0 and restored.label_pairs.total == 0
    # exact or absent: the tables no longer cover the span, so only chi2 (from the label counts) remains
    assert set(restored.divergence()) == {"chi2_labels_pvalue"}
    assert restored.divergence()["chi2_labels_pvalue"] == acc.divergence()["chi2_labels_pvalue"]


def test_without_confidences_only_the_label_tests():
    b, c = rows(9, 300)
    n = len(b)
    acc = PairAccumulator()
    acc.update(classification_diffs(b, c), baseline_latency_ms=np.ones(n), candidate_latency_ms=np.ones(n),
               request_ids=[str(i) for i in range(n)])
    assert set(acc.divergence()) == {"chi2_labels_pvalue", "stuart_maxwell_pvalue"}


def test_fewer_than_two_scored_rows_and_non_finite_values():
    b, c = rows(10, 1)
    c[:] = b
    assert accumulate(b, c).divergence() == {}
    assert PairAccumulator().divergence() == {}
    assert dv.from_counts() == {}
    # constant baseline, candidate elsewhere: wasserstein_normalised is infinite and left out
    b = np.tile([0.9, 0.1], (20, 1))
    c = np.tile([0.6, 0.4], (20, 1))
    got = accumulate(b, c).divergence()
    assert "wasserstein_normalised" not in got and got["wasserstein"] == pytest.approx(0.3)
    assert got["ks"] == 1.0


def test_too_many_labels_drop_the_paired_test_only():
    rng = np.random.default_rng(11)
    k = MAX_LABELS + 6
    b = rng.dirichlet(np.full(k, 0.05), 4000)
    c = np.where(rng.random((4000, 1)) < 0.2, rng.dirichlet(np.full(k, 0.05), 4000), b)
    acc = accumulate(b, c)
    assert acc.label_pairs.overflow > 0
    got = acc.divergence()
    assert "stuart_maxwell_pvalue" not in got
    _, _, lb, lc = raw_columns(b, c)
    assert got["chi2_labels_pvalue"] == dv.chi2_labels(lb, lc).pvalue


def test_update_checks_and_skips_unscored_rows():
    b, c = rows(12, 50)
    n = len(b)
    d = classification_diffs(b, c)
    kw = dict(baseline_latency_ms=np.ones(n), candidate_latency_ms=np.ones(n), request_ids=[str(i) for i in range(n)])
    acc = PairAccumulator()
    with pytest.raises(ValueError):
        acc.update(d, **kw, baseline_confidence=np.ones(n - 1))
    assert acc.requests == 0  # rejected before any state changed
    acc.update(d, **kw, baseline_confidence=b.max(axis=1), candidate_confidence=c.max(axis=1))
    assert acc.baseline_confidence.total == acc.candidate_confidence.total == acc.scored < n
    assert acc.candidate_confidence.missing == 0  # NaN rows were errors, never offered to the histogram
