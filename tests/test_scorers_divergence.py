"""Divergences: agreement with scipy where scipy has the statistic, hand-computed fixtures otherwise."""

import numpy as np
import pytest
from scipy import stats
from scipy.spatial import distance

from scorers import divergence as dv

rng = np.random.default_rng(0)
BASE = rng.normal(0, 1, 3000)
CAND = rng.normal(0.3, 1.2, 2500)


def test_quantile_bins_of_the_baseline():
    edges = dv.quantile_edges(np.arange(100.0), bins=4)
    np.testing.assert_allclose(edges, [24.75, 49.5, 74.25])
    b, c = dv.histograms(np.arange(100.0), [-5, 24.75, 200], bins=4)
    assert b.tolist() == [25, 25, 25, 25] and c.tolist() == [1, 1, 0, 1]  # edge value goes right
    assert dv.quantile_edges([1, 1, 1, 2], bins=4).tolist() == [1.0, 1.25]  # ties collapse


def test_psi_hand_fixture():
    # baseline 0..99 in 2 bins (50/50), candidate 80/20: smoothed shares (50.5/101, 50.5/101), (80.5/101, 20.5/101)
    cand = np.r_[np.zeros(80), np.full(20, 99.0)]
    pb = np.array([50.5, 50.5]) / 101
    pc = np.array([80.5, 20.5]) / 101
    expected = np.sum((pc - pb) * np.log(pc / pb))
    assert dv.psi(np.arange(100.0), cand, bins=2).statistic == pytest.approx(expected)
    assert dv.psi(BASE, BASE).statistic == pytest.approx(0.0)


def test_kl_js_hellinger_agree_with_scipy():
    b, c = dv.histograms(BASE, CAND)
    sb, sc = (b + 0.5) / (b + 0.5).sum(), (c + 0.5) / (c + 0.5).sum()
    assert dv.kl(BASE, CAND).statistic == pytest.approx(stats.entropy(sc, sb))
    assert dv.js_distance(BASE, CAND).statistic == pytest.approx(distance.jensenshannon(b / b.sum(), c / c.sum()))
    pb, pc = b / b.sum(), c / c.sum()
    assert dv.hellinger(BASE, CAND).statistic == pytest.approx(
        distance.euclidean(np.sqrt(pb), np.sqrt(pc)) / np.sqrt(2))
    disjoint = dv.js_distance(np.arange(10.0), np.full(5, 100.0), bins=2).statistic
    assert disjoint == pytest.approx(distance.jensenshannon([0.5, 0.5], [0, 1]))


def test_wasserstein_and_ks_agree_with_scipy():
    assert dv.wasserstein(BASE, CAND).statistic == pytest.approx(stats.wasserstein_distance(BASE, CAND))
    assert dv.wasserstein_normalised(BASE, CAND).statistic == pytest.approx(
        stats.wasserstein_distance(BASE, CAND) / np.std(BASE, ddof=1))
    assert dv.wasserstein([0, 1], [1, 2]).statistic == pytest.approx(1.0)
    ours, ref = dv.ks(BASE, CAND), stats.ks_2samp(BASE, CAND)
    assert ours.statistic == pytest.approx(ref.statistic) and ours.pvalue == pytest.approx(ref.pvalue)
    small = dv.ks([1, 2, 3, 4], [3, 4, 5, 6, 7])
    assert small.statistic == pytest.approx(stats.ks_2samp([1, 2, 3, 4], [3, 4, 5, 6, 7]).statistic)


def test_chi2_labels_agrees_with_scipy_and_stuart_maxwell_reduces_to_mcnemar():
    b = rng.integers(0, 4, 500)
    c = np.where(rng.random(500) < 0.2, rng.integers(0, 4, 500), b)
    table = np.stack([np.bincount(b, minlength=4), np.bincount(c, minlength=4)])
    ref = stats.chi2_contingency(table, correction=False)
    ours = dv.chi2_labels(b, c)
    assert ours.statistic == pytest.approx(ref.statistic) and ours.pvalue == pytest.approx(ref.pvalue)
    # K = 2: 10 pairs (0 -> 1), 4 pairs (1 -> 0): McNemar (10 - 4)^2 / 14
    bb = np.r_[np.zeros(10), np.ones(4), np.zeros(30)]
    cc = np.r_[np.ones(10), np.zeros(4), np.zeros(30)]
    sm = dv.stuart_maxwell(bb, cc)
    assert sm.statistic == pytest.approx(36 / 14) and sm.pvalue == pytest.approx(stats.chi2.sf(36 / 14, 1))
    assert dv.stuart_maxwell(b, b).statistic == 0.0


def test_describe_has_every_statistic():
    d = dv.describe(BASE, CAND)
    assert set(d) == {"psi", "kl", "js_distance", "hellinger", "wasserstein", "wasserstein_normalised", "ks"}
    assert all(np.isfinite(v) and v > 0 for v in d.values())


def test_table_forms_equal_the_label_forms():
    b = rng.integers(0, 5, 400)
    c = np.where(rng.random(400) < 0.25, rng.integers(0, 5, 400), b)
    counts = np.stack([np.bincount(b, minlength=7), np.bincount(c, minlength=7)])  # two all-zero classes
    assert dv.chi2_table(counts) == dv.chi2_labels(b, c)
    joint = np.zeros((7, 7), dtype=np.int64)
    np.add.at(joint, (b, c), 1)
    assert dv.stuart_maxwell_table(joint) == dv.stuart_maxwell(b, c)
    assert dv.chi2_table([[3, 0], [4, 0]]).pvalue == 1.0 and dv.stuart_maxwell_table([[5]]).pvalue == 1.0


def test_binned_wasserstein_and_ks_hand_fixtures():
    # all baseline mass in bin 0 (midpoint 0.125), all candidate mass in bin 3 (midpoint 0.875) of 4 bins
    assert dv.binned_wasserstein([4, 0, 0, 0], [0, 0, 0, 2]).statistic == pytest.approx(0.75)
    assert dv.binned_ks([4, 0, 0, 0], [0, 0, 0, 2]).statistic == pytest.approx(1.0)
    assert dv.binned_wasserstein([1, 2, 3], [2, 4, 6]).statistic == 0.0
    # same bin, different values: invisible to the bins (KS lower bound 0, raw KS 1 <= 0 + bin share 1)
    assert dv.binned_ks([2, 0], [3, 0]).statistic == 0.0
    with pytest.raises(ValueError):
        dv.binned_ks([1, 2], [1, 2, 3])


def test_from_counts_keys_and_guards():
    b, c = np.array([0, 5, 10, 5]), np.array([0, 2, 8, 10])
    got = dv.from_counts(b, c, baseline_std=0.2, label_counts=[[10, 10], [12, 8]], label_pairs=[[8, 2], [4, 6]])
    assert set(got) == set(dv.describe(BASE, CAND)) | {"chi2_labels_pvalue", "stuart_maxwell_pvalue"}
    assert got["wasserstein_normalised"] == pytest.approx(got["wasserstein"] / 0.2)
    assert "wasserstein_normalised" not in dv.from_counts(b, c)
    assert dv.from_counts([1, 0], [0, 5]) == {}  # one baseline value only
    # padding with bins empty in both changes nothing
    assert dv.from_counts(np.r_[0, 0, b[1:]], np.r_[0, 0, c[1:]])["psi"] == pytest.approx(got["psi"])
