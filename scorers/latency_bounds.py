"""Order-statistic machinery of the latency quantile ratio (``scorers.latency``): the one-sample
quantile confidence sequences (their ranks depend on the sample size and the level only, so they are
cached), the unpaired four-order-statistic bounds, and ``requests_needed``: how many more requests an
inconclusive ratio needs (the projection of the order statistics, the 1/sqrt(n) extrapolation).
Split from ``scorers.latency`` to keep each module readable; the statistics are stated there.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from schemas.events import MetricJudgement
from scorers.sequential import bernoulli_log_evalue_above, bernoulli_log_evalue_below
from scorers.sketch import LatencySketch


def _quantile_cs(s: LatencySketch, q: float, alpha_lo: float, alpha_hi: float) -> tuple[float, float]:
    """(lo, hi) with lo <= xi_q <= hi for all n, except with prob alpha_lo + alpha_hi; widened by the
    sketch's relative accuracy. 0 / inf where the order statistic does not exist yet."""
    ra = s.relative_accuracy
    r_lo, r_hi = (int(r[0]) for r in _ranks_many(np.array([s.count]), q, alpha_lo, alpha_hi))
    lo = s.value_at_rank(r_lo - 1) / (1 + ra) if r_lo >= 1 else 0.0
    hi = s.value_at_rank(r_hi - 1) / (1 - ra) if r_hi <= s.count else math.inf
    return lo, hi


def _unpaired_bounds(c: LatencySketch, b: LatencySketch, q: float, a_r: float, a_p: float) -> tuple[float, float]:
    """Four order-statistic bounds, each at half the side's level (the judge's former construction)."""
    c_lo, c_hi = _quantile_cs(c, q, a_r / 2, a_p / 2)
    b_lo, b_hi = _quantile_cs(b, q, a_p / 2, a_r / 2)
    lo = c_lo / b_hi if b_hi > 0 and math.isfinite(b_hi) else 0.0
    hi = c_hi / b_lo if b_lo > 0 else math.inf
    return lo, hi


# -- requests needed --------------------------------------------------------------------------------

_PROJECTION_CAP = 10_000_000  # beyond this many requests no estimate is given
_PROJECTION_GRID = 64  # future sample sizes per round (geometric, then linear within the crossing step)


def _ranks_many(ns: np.ndarray, q: float, alpha_lo: float, alpha_hi: float) -> tuple[np.ndarray, np.ndarray]:
    """``order_statistic_ranks`` for many sample sizes at once (the same integer bisections, run
    elementwise). They depend on the sizes and the levels only, never on the data: cached (the judge
    looks at the same sizes again and again)."""
    return _ranks_cached(tuple(int(x) for x in np.asarray(ns).ravel()), float(q), float(alpha_lo), float(alpha_hi))


@functools.lru_cache(maxsize=4096)
def _ranks_cached(ns: tuple[int, ...], q: float, alpha_lo: float, alpha_hi: float) -> tuple[np.ndarray, np.ndarray]:
    n = np.asarray(ns, dtype=np.int64)
    thr_low, thr_high = math.log(1.0 / alpha_lo), math.log(1.0 / alpha_hi)
    # r_lo = s* + 1, s* the largest count the "below q" test rejects (-1: none)
    lo, hi = np.zeros_like(n), n + 1  # rejected(lo), not rejected(hi)
    any_low = bernoulli_log_evalue_below(n, np.zeros(n.shape), q) >= thr_low
    while True:
        open_ = any_low & (hi - lo > 1)
        if not open_.any():
            break
        mid = (lo + hi) // 2
        rej = (mid <= n) & (bernoulli_log_evalue_below(n, mid.astype(np.float64), q) >= thr_low)
        lo = np.where(open_ & rej, mid, lo)
        hi = np.where(open_ & ~rej, mid, hi)
    r_lo = np.where(any_low, lo, -1) + 1
    # r_hi = t*, the smallest count the "above q" test rejects (n + 1: none)
    lo, hi = -np.ones_like(n), n.copy()  # not rejected(lo), rejected(hi)
    any_high = bernoulli_log_evalue_above(n, n.astype(np.float64), q) >= thr_high
    while True:
        open_ = any_high & (hi - lo > 1)
        if not open_.any():
            break
        mid = (lo + hi) // 2
        rej = bernoulli_log_evalue_above(n, mid.astype(np.float64), q) >= thr_high
        lo = np.where(open_ & ~rej, mid, lo)
        hi = np.where(open_ & rej, mid, hi)
    r_hi = np.where(any_high, hi, n + 1)
    r_lo.flags.writeable = r_hi.flags.writeable = False  # shared by the cache
    return r_lo, r_hi


def _read_many(s: LatencySketch, levels: np.ndarray) -> np.ndarray:
    """The current sample's values at quantile ``levels`` (``value_at_rank(level * count - 1)``, vectorised):
    what the rank r of a future sample of N reads, at level r / N, if the distribution stays as it is."""
    rank = np.clip(np.asarray(levels, dtype=np.float64) * s.count - 1, 0.0, s.count - 1)
    out = np.zeros(rank.shape)
    nonzero = rank >= s.zero_count
    if s.counts.size and nonzero.any():
        cum = np.cumsum(s.counts)
        i = np.minimum(np.searchsorted(cum, rank[nonzero] - s.zero_count, side="right"), s.counts.size - 1)
        out[nonzero] = np.clip(2.0 * s.gamma ** (s.offset + i) / (1.0 + s.gamma), s.min, s.max)
    return out


def _projected_unpaired(c: LatencySketch, b: LatencySketch, q: float, a_r: float, a_p: float, margin: float,
                        to_fail: bool) -> int | None:
    """Extra requests until the unpaired bound that must move crosses ``margin``, if both latency
    distributions stay as observed: at a future sample size N the order-statistic CS takes fixed ranks
    (they depend on N and the level only), i.e. fixed quantile levels r / N, which are read from the
    current sketches. None when it does not cross by ``_PROJECTION_CAP`` requests."""
    n = int(min(c.count, b.count))
    ra_c, ra_b = c.relative_accuracy, b.relative_accuracy

    def crosses(big: np.ndarray) -> np.ndarray:
        big_f = big.astype(np.float64)
        if to_fail:  # lower = c_lo / b_hi must rise above the margin
            r_c, _ = _ranks_many(big, q, a_r / 2, a_p / 2)
            _, r_b = _ranks_many(big, q, a_p / 2, a_r / 2)
            exists = (r_c >= 1) & (r_b <= big)
            b_hi = _read_many(b, r_b / big_f) / (1 - ra_b)
            c_lo = _read_many(c, r_c / big_f) / (1 + ra_c)
            return exists & (b_hi > 0) & (c_lo > margin * b_hi)
        _, r_c = _ranks_many(big, q, a_r / 2, a_p / 2)  # upper = c_hi / b_lo must come below it
        r_b, _ = _ranks_many(big, q, a_p / 2, a_r / 2)
        exists = (r_c <= big) & (r_b >= 1)
        b_lo = _read_many(b, r_b / big_f) / (1 + ra_b)
        c_hi = _read_many(c, r_c / big_f) / (1 - ra_c)
        return exists & (b_lo > 0) & (c_hi < margin * b_lo)

    grid = np.unique(np.geomspace(n + 1, max(_PROJECTION_CAP, n + 2), _PROJECTION_GRID).astype(np.int64))
    hit = crosses(grid)
    if not hit.any():
        return None
    k = int(np.argmax(hit))
    if k > 0:  # within the step where it first crosses, to about 1/64 of that step
        fine = np.unique(np.linspace(grid[k - 1] + 1, grid[k], _PROJECTION_GRID).astype(np.int64))
        hit_fine = crosses(fine)
        big = int(fine[np.argmax(hit_fine)]) if hit_fine.any() else int(grid[k])
    else:
        big = int(grid[0])
    return max(big - n, 1)


def _requests_needed(m: MetricJudgement, c: LatencySketch, b: LatencySketch, q: float, a_r_unpaired: float,
                     a_p_unpaired: float, paired: bool) -> int | None:
    """About how many more requests an inconclusive ratio needs to decide, or None: never a number
    the data cannot back (an interval still [0, inf] gets one only from the projection, which knows
    when the order statistics will exist and where they will read).

    The unpaired part's projection (``_projected_unpaired``) at its own level; with the paired
    construction also the 1/sqrt(n) extrapolation of the combined interval (when the bound that must
    move is finite); the smaller of the two, since either construction deciding decides.
    """
    if m.decision != "inconclusive":
        return None
    floor = (1 + c.relative_accuracy) / (1 - c.relative_accuracy)
    est, margin = m.estimate, m.margin
    if est is None or est <= 0 or max(est, margin) / min(est, margin) <= floor:
        return None  # no estimate, or within the sketch's accuracy of the margin: the bounds never separate
    guesses = []
    projected = _projected_unpaired(c, b, q, a_r_unpaired, a_p_unpaired, margin, to_fail=est > margin)
    if projected is not None:
        guesses.append(projected)
    if paired:
        extrapolated = latency_requests_needed(m, q, min(a_r_unpaired, a_p_unpaired) / 2, c.relative_accuracy)
        if extrapolated is not None:
            guesses.append(extrapolated)
    return min(guesses) if guesses else None


def latency_requests_needed(m: MetricJudgement, q: float, alpha: float, relative_accuracy: float) -> int | None:
    """Extra requests for an inconclusive quantile ratio to decide, if the ratio stayed where it is,
    from its interval alone (the 1/sqrt(n) extrapolation; ``_requests_needed`` adds the projection).

    Without any latency yet: the requests before the extreme order statistic can exist at this level
    (q**n <= alpha: ~440 for p99 at alpha 1.25 %), a lower limit. Otherwise the interval's half-width
    on the log scale shrinks like 1/sqrt(n) (order-statistic bounds are asymptotically normal in the
    rank). None when the ratio sits within the sketch's accuracy of the margin (the bounds can never
    separate), or when the bound that has to cross the margin does not exist yet (an interval open to
    0 or inf says nothing about how fast it will shrink; this once answered "about 1 more request").
    """
    if m.decision != "inconclusive":
        return None
    n = m.samples
    n_exist = math.ceil(math.log(alpha) / math.log(q)) if 0 < q < 1 else 1
    if m.estimate is None:
        return max(n_exist - n, 1)
    est, margin = m.estimate, m.margin
    if est <= 0:
        return None
    floor = (1 + relative_accuracy) / (1 - relative_accuracy)
    if max(est, margin) / min(est, margin) <= floor:
        return None
    if est < margin:  # heading to pass: the upper bound must come below the margin
        if m.upper is None:
            return None
        half, room = math.log(m.upper / est), math.log(margin / est)
    else:  # heading to fail: the lower bound must rise above it
        if m.lower is None or m.lower <= 0:
            return None
        half, room = math.log(est / m.lower), math.log(est / margin)
    if room <= 0 or half <= 0:
        return None
    total = n * (half / room) ** 2
    return max(math.ceil(max(total, n_exist) - n), 1)
