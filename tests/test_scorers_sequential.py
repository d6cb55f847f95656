"""Confidence sequences: time-uniform coverage by simulation, shape of the bounds, e-BH / BH fixtures."""

import numpy as np
import pytest

from scorers.sequential import (
    benjamini_hochberg, ebh, log_evalue_above, log_evalue_below, lower_bound, mean_cs, order_statistic_ranks,
    requests_to_cross, upper_bound,
)

ALPHA = 0.05
RUNS, STEPS = 1000, 2000
# binomial tolerance: 3 standard deviations of a rate alpha estimated from RUNS runs
TOL = 3 * np.sqrt(ALPHA * (1 - ALPHA) / RUNS)


def _paths(kind: str, mean: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "bernoulli":
        x = rng.random((RUNS, STEPS)) < mean
    else:  # bounded but not binary: Beta with the same mean
        x = rng.beta(mean * 5, (1 - mean) * 5, (RUNS, STEPS))
    return np.cumsum(x, axis=1, dtype=np.float64)


@pytest.mark.parametrize("kind,mean", [("bernoulli", 0.01), ("bernoulli", 0.05), ("bernoulli", 0.4),
                                       ("beta", 0.05), ("beta", 0.3)])
def test_time_uniform_type_one_error(kind, mean):
    """Checked at every n up to 300 and every 10th n to 2,000 (where successive looks barely differ):
    the chance the bound *ever* excludes the truth is <= alpha."""
    n = np.unique(np.concatenate([np.arange(1, 301), np.arange(310, STEPS + 1, 10)]))
    s = _paths(kind, mean, seed=int(mean * 1000))[:, n - 1]
    ever_below = (log_evalue_below(n, s, mean) >= np.log(1 / ALPHA)).any(axis=1).mean()
    ever_above = (log_evalue_above(n, s, mean) >= np.log(1 / ALPHA)).any(axis=1).mean()
    assert ever_below <= ALPHA + TOL
    assert ever_above <= ALPHA + TOL


def test_bounds_bracket_the_estimate_and_shrink():
    n = np.array([10, 100, 1_000, 10_000, 100_000])
    s = 0.04 * n
    est, lo, hi = mean_cs(n, s, 0.01, 0.01)
    assert (lo <= est).all() and (est <= hi).all() and (lo >= 0).all() and (hi <= 1).all()
    assert (np.diff(hi - lo) < 0).all()
    assert upper_bound(2000, 80, 0.025) < 0.06  # demo scale: flip 4% is well inside a 10% margin
    assert upper_bound(1000, 40, 0.001) > upper_bound(1000, 40, 0.05)
    assert upper_bound(0, 0, 0.05) == 1.0 and lower_bound(0, 0, 0.05) == 0.0


def test_bound_is_where_the_evalue_crosses():
    hi = upper_bound(500, 20, 0.05)
    assert log_evalue_below(500, 20, hi) >= np.log(20) > log_evalue_below(500, 20, hi - 1e-6)
    lo = lower_bound(500, 20, 0.05)
    assert log_evalue_above(500, 20, lo) >= np.log(20) > log_evalue_above(500, 20, lo + 1e-6)


def test_evalue_monotone_in_reference():
    p0 = np.linspace(0.05, 0.99, 200)
    e = log_evalue_below(300, 15, p0)
    assert (np.diff(e) >= -1e-9).all()
    assert log_evalue_below(0, 0, 0.3) == pytest.approx(0.0)


def test_quantile_ranks_cover_time_uniformly():
    q, a = 0.99, 0.025
    rng = np.random.default_rng(11)
    looks = np.arange(100, 5001, 100)
    below = np.cumsum(rng.random((RUNS, 5000)) < q, axis=1)[:, looks - 1]  # #{X_i <= xi_q}, continuous X
    ranks = np.array([order_statistic_ranks(int(n), q, a, a) for n in looks])
    violated = (below < ranks[:, 0]) | (below >= ranks[:, 1])
    assert violated.any(axis=1).mean() <= 2 * a + 3 * np.sqrt(2 * a / RUNS)
    r_lo, r_hi = order_statistic_ranks(2500, 0.99, 0.01, 0.01)
    assert 2400 < r_lo < 2475 < r_hi <= 2500


def test_requests_to_cross():
    assert upper_bound(50, 2, 0.025) > 0.10
    extra = requests_to_cross(50, 0.04, 0.10, 0.025, side="upper")
    assert extra is not None and 0 < extra < 2000
    assert upper_bound(50 + extra, 0.04 * (50 + extra), 0.025) < 0.10 + 1e-3
    assert requests_to_cross(200, 0.12, 0.10, 0.025, side="upper") is None


def test_ebh_and_bh_fixtures():
    assert ebh([100, 30, 2, 1], 0.1).tolist() == [True, True, False, False]
    assert ebh([1, 1, 1], 0.1).tolist() == [False, False, False]
    assert ebh([], 0.1).size == 0
    assert benjamini_hochberg([0.01, 0.02, 0.03, 0.5], 0.05).tolist() == [True, True, True, False]
    assert benjamini_hochberg([0.04, 0.01, 0.5], 0.05).tolist() == [False, True, False]


@pytest.mark.parametrize("n,s,p0", [(100, 3, 0.01), (2000, 80, 0.03), (5000, 15, 0.01), (300, 40, 0.2), (50, 0, 0.1)])
def test_gamma_mixture_matches_its_integral(n, s, p0):
    """The closed form against the definition, integrated numerically (an independent computation;
    confseq's C++ boundaries need Boost headers this machine lacks): the mixture over the rate ratio
    r of the Poisson likelihood ratio r^S exp(-n p0 (r - 1)), prior Gamma(a, rate a) truncated to
    r >= 1 (evidence above p0) or r <= 1 (below)."""
    from scipy import integrate, stats

    from scorers.sequential import PRIOR_SHAPE as a

    prior = stats.gamma(a, scale=1 / a)

    def log_lr(r):
        return s * np.log(r) - n * p0 * (r - 1)

    peak = max(log_lr(max(s / (n * p0), 1e-9)), 0.0)  # scale out the maximum for quad's accuracy
    above = integrate.quad(lambda r: np.exp(log_lr(r) - peak) * prior.pdf(r), 1, np.inf, limit=200)[0]
    below = integrate.quad(lambda r: np.exp(log_lr(r) - peak) * prior.pdf(r), 0, 1, limit=200)[0]
    assert float(log_evalue_above(n, s, p0)) == pytest.approx(np.log(above / prior.sf(1)) + peak, abs=1e-6)
    assert float(log_evalue_below(n, s, p0)) == pytest.approx(np.log(below / prior.cdf(1)) + peak, abs=1e-6)


def test_bounds_cover_the_running_mean_under_drift():
    """Time-varying means (a daily cycle, +-90 %): the bounds hold for the running average of the
    means at every n simultaneously (the construction's claim), checked at every 10th request."""
    rng = np.random.default_rng(21)
    t = np.arange(STEPS)
    p = 0.05 * (1 + 0.9 * np.sin(2 * np.pi * t / 700 + rng.uniform(0, 2 * np.pi, (RUNS, 1))))
    s = np.cumsum(rng.random((RUNS, STEPS)) < p, axis=1, dtype=np.float64)
    n = np.arange(10, STEPS + 1, 10)
    run_mean = (np.cumsum(p, axis=1) / (t + 1))[:, n - 1]
    s = s[:, n - 1]
    lo_miss = (log_evalue_above(n, s, run_mean) >= np.log(1 / ALPHA)).any(axis=1).mean()
    hi_miss = (log_evalue_below(n, s, run_mean) >= np.log(1 / ALPHA)).any(axis=1).mean()
    assert lo_miss <= ALPHA + TOL and hi_miss <= ALPHA + TOL
