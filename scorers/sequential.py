"""Anytime-valid confidence sequences for means of [0, 1]-bounded observations, and for quantiles.

The judge looks at the cumulative statistics after every window, as often as it likes, and stops at
the first confident answer. A fixed-sample test re-run at each look (Kayenta) inflates false alarms;
a confidence sequence (CS) holds *simultaneously for every n*, so looking often is free.

Construction (a Robbins / beta-binomial mixture martingale, one-sided):

For observations X_i in [0, 1] with mean mu, and a reference value p0, the likelihood ratio of a
Bernoulli(p') against Bernoulli(p0),  L_n(p') = (p'/p0)^S (1-p')^F / (1-p0)^F  with S = sum X_i and
F = n - S, is a non-negative supermartingale whenever mu >= p0 and p' < p0 (and symmetrically for
mu <= p0, p' > p0): the factor is convex in x, so a bounded X is dominated by a Bernoulli with the same
mean. Mixing p' uniformly over [0, p0] (resp. [p0, 1]) keeps the supermartingale property and has the
closed form

    M_up(p0)  = B(S+1, F+1) I_p0(S+1, F+1)       / (p0^S (1-p0)^F p0)        [evidence mu < p0]
    M_low(p0) = B(S+1, F+1) (1 - I_p0(S+1, F+1)) / (p0^S (1-p0)^F (1-p0))    [evidence mu > p0]

(I = regularised incomplete beta). By Ville's inequality P(exists n: M_n >= 1/alpha) <= alpha, so
rejecting at M >= 1/alpha is valid under continuous monitoring. M_up is increasing in p0 (substitute
p' = p0 u: each integrand ((1 - p0 u) / (1 - p0))^F grows with p0), so the rejected p0 form an upper
ray and the CS bound is  upper_n = inf{p0 : M_up(p0) >= 1/alpha}, found by bisection (we return the
conservative end of the bracket). The bound adapts to the variance (it is KL-shaped): at p_hat = 0.04,
n = 2,000, alpha = 0.025 the upper bound is about 0.055, where a Hoeffding-style CS would give ~0.09.

``M`` evaluated at the margin is also an e-value (an e-process), which is what e-BH uses across slices.
"""

from __future__ import annotations

import numpy as np
from scipy import special

_EPS = 1e-12
_BISECT_STEPS = 60


def _prep(n, s):
    n = np.asarray(n, dtype=np.float64)
    s = np.clip(np.asarray(s, dtype=np.float64), 0.0, n)
    return n, s, n - s


def log_evalue_below(n, s, p0):
    """log M_up: evidence that the mean is *below* p0 (tests H0: mean >= p0). Vectorised."""
    n, s, f = _prep(n, s)
    p0 = np.clip(np.asarray(p0, dtype=np.float64), _EPS, 1 - _EPS)
    with np.errstate(divide="ignore"):
        mass = np.log(special.betainc(s + 1, f + 1, p0))
    return special.betaln(s + 1, f + 1) + mass - s * np.log(p0) - f * np.log1p(-p0) - np.log(p0)


def log_evalue_above(n, s, p0):
    """log M_low: evidence that the mean is *above* p0 (tests H0: mean <= p0). Vectorised."""
    n, s, f = _prep(n, s)
    p0 = np.clip(np.asarray(p0, dtype=np.float64), _EPS, 1 - _EPS)
    with np.errstate(divide="ignore"):
        mass = np.log(special.betaincc(s + 1, f + 1, p0))
    return special.betaln(s + 1, f + 1) + mass - s * np.log(p0) - f * np.log1p(-p0) - np.log1p(-p0)


def _bisect(lo: np.ndarray, hi: np.ndarray, rejected, rejected_above: bool) -> tuple[np.ndarray, np.ndarray]:
    """Narrow [lo, hi] elementwise to the edge of the rejected region, which lies above the edge
    (upper bound) or below it (lower bound)."""
    lo, hi = (a.copy() for a in np.broadcast_arrays(lo, hi))
    for _ in range(_BISECT_STEPS):
        mid = 0.5 * (lo + hi)
        rej = rejected(mid)
        if rejected_above:
            hi, lo = np.where(rej, mid, hi), np.where(rej, lo, mid)
        else:
            lo, hi = np.where(rej, mid, lo), np.where(rej, hi, mid)
    return lo, hi


def upper_bound(n, s, alpha):
    """Anytime-valid upper confidence bound for the mean (P(ever mean > bound) <= alpha). 1 when n = 0."""
    n, s, _ = _prep(n, s)
    thr = np.log(1.0 / np.asarray(alpha, dtype=np.float64))
    p_hat = np.where(n > 0, s / np.maximum(n, 1), 0.0)
    _, hi = _bisect(p_hat, np.ones_like(p_hat), lambda m: log_evalue_below(n, s, m) >= thr, rejected_above=True)
    return np.where(n > 0, hi, 1.0)


def lower_bound(n, s, alpha):
    """Anytime-valid lower confidence bound for the mean (P(ever mean < bound) <= alpha). 0 when n = 0."""
    n, s, _ = _prep(n, s)
    thr = np.log(1.0 / np.asarray(alpha, dtype=np.float64))
    p_hat = np.where(n > 0, s / np.maximum(n, 1), 1.0)
    lo, _ = _bisect(np.zeros_like(p_hat), p_hat, lambda m: log_evalue_above(n, s, m) >= thr, rejected_above=False)
    return np.where(n > 0, lo, 0.0)


def mean_cs(n, s, alpha_lower, alpha_upper):
    """(estimate, lower, upper) with one-sided levels; estimate NaN when n = 0."""
    n_arr = np.asarray(n, dtype=np.float64)
    est = np.where(n_arr > 0, np.asarray(s, dtype=np.float64) / np.maximum(n_arr, 1), np.nan)
    return est, lower_bound(n, s, alpha_lower), upper_bound(n, s, alpha_upper)


def requests_to_cross(n, p_hat, margin, alpha, *, side: str, horizon: float = 1e8):
    """Extra observations needed, if the mean stayed at ``p_hat``, for the one-sided bound to cross
    ``margin`` ("upper": upper bound below margin; "lower": lower bound above). None if never."""
    if p_hat is None or not np.isfinite(p_hat):
        return None
    if (side == "upper" and p_hat >= margin) or (side == "lower" and p_hat <= margin):
        return None
    grid = np.unique(np.geomspace(max(n, 1), horizon, 400).astype(np.int64))
    thr = np.log(1.0 / alpha)
    if side == "upper":
        ok = log_evalue_below(grid, p_hat * grid, margin) >= thr
    else:
        ok = log_evalue_above(grid, p_hat * grid, margin) >= thr
    if not ok.any():
        return None
    return int(max(grid[np.argmax(ok)] - n, 0))


def order_statistic_ranks(n: int, q: float, alpha_lower: float, alpha_upper: float) -> tuple[int, int]:
    """1-based ranks (r_lo, r_hi) with x_(r_lo) <= xi_q <= x_(r_hi) for all n simultaneously.

    #{X_i <= xi_q} is a Binomial(n, >= q) process: while the ``below`` test of mean >= q has not
    rejected at s, at least s + 1 of the sample lies at or below xi_q, so xi_q >= x_(s*+1) where s* is the
    largest rejected count. Symmetrically #{X_i < xi_q} has mean <= q, giving xi_q <= x_(t*) with t* the
    smallest count the ``above`` test rejects. r_lo = 0 means no lower bound, r_hi = n + 1 no upper bound.
    """
    if n <= 0:
        return 0, 1
    # Both e-values are monotone in the count (fewer successes = more evidence of a lower mean), so the
    # boundary counts are found by bisection instead of evaluating all n + 1 counts.
    thr_low, thr_high = np.log(1.0 / alpha_lower), np.log(1.0 / alpha_upper)
    if log_evalue_below(n, 0.0, q) < thr_low:
        s_star = -1
    else:  # largest integer s with rejection: invariant rej(lo), not rej(hi)
        lo, hi = 0, n + 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if mid <= n and log_evalue_below(n, float(mid), q) >= thr_low else (lo, mid)
        s_star = lo
    if log_evalue_above(n, float(n), q) < thr_high:
        t_star = n + 1
    else:  # smallest integer t with rejection: invariant not rej(lo), rej(hi)
        lo, hi = -1, n
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if log_evalue_above(n, float(mid), q) >= thr_high else (mid, hi)
        t_star = hi
    return s_star + 1, t_star


def ebh(evalues, alpha: float) -> np.ndarray:
    """e-BH (Wang & Ramdas 2022): reject the k* largest e-values, k* = max{k : e_(k) >= K / (alpha k)}.
    Controls the false discovery rate at alpha under arbitrary dependence between the e-values."""
    e = np.asarray(evalues, dtype=np.float64)
    k_all = e.size
    reject = np.zeros(k_all, dtype=bool)
    if k_all == 0:
        return reject
    order = np.argsort(-e)
    ks = np.arange(1, k_all + 1)
    ok = e[order] >= k_all / (alpha * ks)
    if ok.any():
        k_star = int(ks[ok].max())
        reject[order[:k_star]] = True
    return reject


def benjamini_hochberg(pvalues, alpha: float) -> np.ndarray:
    """Classical BH step-up (independent or PRDS p-values); kept for fixed-sample reports."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = p.size
    reject = np.zeros(m, dtype=bool)
    if m == 0:
        return reject
    order = np.argsort(p)
    ok = p[order] <= alpha * np.arange(1, m + 1) / m
    if ok.any():
        reject[order[: int(np.flatnonzero(ok)[-1]) + 1]] = True
    return reject
