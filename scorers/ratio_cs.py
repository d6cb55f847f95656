"""Anytime-valid confidence sequences for a request-weighted rate over independent clusters.

**Estimand.** Traffic arrives in clusters c = 1, 2, ... (``scorers.clusters``: the requests of one
sample key, or of one input, within a session gap; at most ``CLUSTER_CAP`` requests each). Cluster c
has n_c requests and a total y_c in [0, n_c] (label flips, sum of |confidence delta|, errors). Let
G_c be everything known before cluster c's outcome *plus its size* n_c, and r_c = E[y_c | G_c] / n_c
its conditional rate. The bounds are for the running **request-weighted** rate

    theta_k = sum_{c<=k} n_c r_c / sum_{c<=k} n_c

(each request weighs the same: a popular input counts as often as it is asked, which is what users
see), whatever the dependence *inside* a cluster and whatever the drift of r_c over time. Clusters
are assumed independent of each other given the past (conditionally on fixed per-user or per-input
rates, requests of one user in different sessions are independent draws: their common rate is part
of theta, not a dependence). Not covered: dependence across clusters that no key reveals.

**Test supermartingales.** For a value m and a fixed eta > 0, each closed cluster contributes one of
two factors, chosen from its size alone (known in G_c):

* *F* (Fan et al. 2015, self-normalised, variance-adaptive), for clusters of 2+ requests while
  eta * scale <= 1/2: with W = y - m n (rollback side; W >= -m n, scale b = m * hi) or U = m n - y
  (promote side; U >= -(1 - m) n, b = (1 - m) * hi), where hi >= n is the top of the cluster's size
  bin, Fan's inequality exp(l xi - psi_E(l) xi^2) <= 1 + l xi for xi >= -1, l in [0, 1), with
  xi = W / b and l = eta b, gives E[exp(eta W - psi_E(eta b) W^2 / b^2) | G_c] <= exp(eta n_c (r_c - m)).
  Clusters whose requests flip independently have E[W^2] ~ n r: near-i.i.d. power; clusters that
  flip together have E[W^2] ~ n^2 r: honest width.
* *P* (Bernoulli/Poisson worst case, no cap on eta), for single requests and large eta: y in [0, n]
  and convexity give E[exp(eta y) | G_c] <= exp(r_c (e^(eta n) - 1)) and
  E[exp(-eta y) | G_c] <= exp(-r_c (1 - e^(-eta n))). For single requests this is the sub-Poisson
  bound of ``scorers.sequential`` (Howard et al. 2021).

The product of the factors, divided by exp of the summed compensators, is a non-negative
supermartingale in the cluster order. The compensators are *linear* in the r_c with coefficients
that depend only on eta and the sizes, so under the running null (sum n_c r_c <= m sum n_c for the
rollback side, >= for the promote side) their extreme value is a fractional knapsack over the size
bins, computed from the observed sizes: the rollback statistic subtracts the largest compensator any
null allocation of the flip mass m N could have (the biggest clusters first), the promote statistic
adds the smallest. The observed statistic is then below the supermartingale at every time the null
holds, so Ville's inequality bounds the chance that it ever reaches 1/alpha, uniformly over time,
for the running estimand (a drifting rate included: eta is fixed per mixture component, never
predictable, so only the running sum of the r_c enters).

The e-value is a discrete mixture of these statistics over ``ETA`` (log-spaced, a normal prior on
log eta) and over two rules for which clusters get the Fan factor (where allowed / never: the
Bernoulli factor suits clusters that flip all together), half the weight each: an e-process,
usable in e-BH across slices. For single requests both rules are the same factor. The bounds are the edges of {m : not rejected}.

**State** (``RatioTable``): per size bin (1, 2, 3-4, 5-8, ..., up to ``MAX_CAP``) six sums over the
closed clusters: count, sum n, sum n^2, sum y, sum y^2, sum n y. Exactly mergeable (sums), a few
hundred bytes as JSON. A cluster's factor uses its bin's top size hi as its scale (a looser lower
bound, still valid) and the bin's capacity sum n in the knapsack.
"""

from __future__ import annotations

import math

import numpy as np

MAX_CAP = 1024  # largest configurable cluster cap
BIN_HI = 2 ** np.arange(int(math.log2(MAX_CAP)) + 1)  # 1, 2, 4, ..., 1024: bin b holds sizes (hi[b-1], hi[b]]
N_BINS = BIN_HI.size
CLUSTERS, N, N2, Y, Y2, NY = range(6)
N_STATS = 6

ETA = np.geomspace(0.003, 40.0, 40)  # mixture components (log-spaced)
# Mixture weights: a normal prior on log eta around PRIOR_CENTER (sd PRIOR_SD), discretised. Tuned on
# the calibration table: eta ~ 0.7 is where a rate twice the margin is detected (log 2), the Fan
# factors of large clusters need eta ~ 0.02 - 0.4, an A/A promote of |delta| ~ 5.
PRIOR_CENTER, PRIOR_SD = 0.6, 1.6
_LW = -0.5 * ((np.log(ETA) - math.log(PRIOR_CENTER)) / PRIOR_SD) ** 2
_LW = _LW - (_LW.max() + math.log(np.exp(_LW - _LW.max()).sum()))
# Two families, half the weight each: the Fan factor for clusters of 2+ where allowed (variance-
# adaptive: clusters whose requests flip independently), and the Bernoulli/Poisson factor everywhere
# (clusters that flip all together: a deterministic candidate's repeated input). Identical for
# single requests, so independent traffic pays nothing for the second family.
_ETA2 = np.concatenate([ETA, ETA])
_LOG_W = np.concatenate([_LW, _LW]) - math.log(2.0)
_FAN_ALLOWED = np.r_[np.ones(ETA.size, dtype=bool), np.zeros(ETA.size, dtype=bool)][:, None]
F_LIMIT = 0.5  # Fan factor while eta * scale <= this (l = 1/2: psi_E within 40 % of l^2 / 2)
_EXP_CAP = 500.0


def size_bin(n) -> np.ndarray:
    """Bin index of cluster sizes n >= 1 (1 -> 0, 2 -> 1, 3..4 -> 2, 5..8 -> 3, ...)."""
    return np.searchsorted(BIN_HI, np.asarray(n, dtype=np.float64), side="left")


class RatioTable:
    """Per size bin sums of closed clusters (``add`` / ``merge`` / ``to_list`` / ``from_list``)."""

    __slots__ = ("t",)

    def __init__(self, t: np.ndarray | None = None) -> None:
        self.t = np.zeros((N_BINS, N_STATS)) if t is None else np.asarray(t, dtype=np.float64)

    def add(self, n, y) -> None:
        """Closed clusters with sizes ``n`` (> 0, <= MAX_CAP; 0 is skipped) and totals ``y`` in [0, n]."""
        n = np.asarray(n, dtype=np.float64).reshape(-1)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        keep = n > 0
        if not keep.any():
            return
        n, y = n[keep], np.clip(y[keep], 0.0, n[keep])
        if n.max() > MAX_CAP:
            raise ValueError(f"cluster of {int(n.max())} requests: the cap is at most {MAX_CAP}")
        b = size_bin(n)
        for k, v in ((CLUSTERS, np.ones_like(n)), (N, n), (N2, n * n), (Y, y), (Y2, y * y), (NY, n * y)):
            self.t[:, k] += np.bincount(b, weights=v, minlength=N_BINS)

    def add_singletons(self, count: float, total: float, total_sq: float | None = None) -> None:
        """``count`` clusters of one request each, with these totals (sum y, sum y^2; y^2 <= y when None)."""
        if count <= 0:
            return
        sq = total if total_sq is None else total_sq
        self.t[0] += [count, count, count, total, sq, total]

    def merge(self, other: RatioTable) -> None:
        self.t += other.t

    def copy(self) -> RatioTable:
        return RatioTable(self.t.copy())

    def scaled(self, factor: float) -> RatioTable:
        """The same cluster mix, ``factor`` times as much of it (for requests-needed projections)."""
        return RatioTable(self.t * factor)

    @property
    def requests(self) -> float:
        return float(self.t[:, N].sum())

    @property
    def clusters(self) -> float:
        return float(self.t[:, CLUSTERS].sum())

    @property
    def total(self) -> float:
        return float(self.t[:, Y].sum())

    @property
    def estimate(self) -> float | None:
        n = self.requests
        return self.total / n if n > 0 else None

    @property
    def largest(self) -> int:
        """Top of the largest non-empty size bin (an upper bound of the largest cluster)."""
        nz = np.flatnonzero(self.t[:, CLUSTERS] > 0)
        return int(BIN_HI[nz[-1]]) if nz.size else 0

    def kish(self) -> float:
        """Kish's effective number of clusters (sum n)^2 / sum n^2: as many equal clusters as this."""
        n2 = self.t[:, N2].sum()
        return float(self.t[:, N].sum() ** 2 / n2) if n2 > 0 else 0.0

    def design_effect(self) -> float | None:
        """Observed variance of the cluster totals around the pooled rate, over what independent
        requests with the same mean would give (1: no dependence; up to the cluster size when a
        cluster's requests move together). None without variation."""
        n = self.requests
        if n <= 0:
            return None
        p = self.total / n
        w2 = (self.t[:, Y2] - 2 * p * self.t[:, NY] + p * p * self.t[:, N2]).sum()
        iid = n * p * (1 - p)  # 0/1 outcomes; for values in [0, 1] an upper bound of their variance
        return float(max(w2, 0.0) / iid) if iid > 0 else None

    def to_list(self) -> list:
        """Sparse: [bin, count, sum n, sum n^2, sum y, sum y^2, sum n y] for each non-empty bin."""
        return [[int(b), *(round(float(v), 9) for v in self.t[b])] for b in np.flatnonzero(self.t[:, CLUSTERS] > 0)]

    @classmethod
    def from_list(cls, rows: list) -> RatioTable:
        t = cls()
        for row in rows:
            t.t[int(row[0])] = row[1:]
        return t

    def __repr__(self) -> str:
        return f"RatioTable(requests={self.requests:g}, clusters={self.clusters:g}, estimate={self.estimate})"


def _stack(tables) -> np.ndarray:
    """(..., N_BINS, 6) array from a RatioTable, an array, or a list of tables."""
    if isinstance(tables, RatioTable):
        return tables.t
    if isinstance(tables, np.ndarray):
        return tables
    return np.stack([_stack(t) for t in tables]) if len(tables) else np.zeros((0, N_BINS, N_STATS))


def _trim(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop size bins empty in every table (the cost is per bin)."""
    bins = t.shape[-2]
    used = np.flatnonzero((t[..., CLUSTERS] > 0).reshape(-1, bins).any(axis=0))
    last = int(used[-1]) + 1 if used.size else 1
    return t[..., :last, :], BIN_HI[:last].astype(np.float64)


def _g(x: np.ndarray) -> np.ndarray:
    """An upper bound of psi_E(x) / x^2 = sum_{k>=2} x^(k-2) / k (psi_E(x) = -log(1 - x) - x) for x in
    [0, 1/2]: five terms and the geometric bound x^5 / (7 (1 - x)) of the rest (relative excess < 1e-3).
    A larger penalty than Fan's keeps the factor a supermartingale."""
    x = np.asarray(x, dtype=np.float64)
    return 0.5 + x * (1 / 3 + x * (1 / 4 + x * (1 / 5 + x * (1 / 6 + x / (7 * (1 - x))))))


_BELOW_CACHE: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _below_terms(hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Fan mask, eta^2 g(eta hi), P coefficient) for the promote side, (J, B): they do not depend on m
    (the Fan scale is hi >= (1 - m) n, a valid looser bound)."""
    key = hi.size
    if key not in _BELOW_CACHE:
        eta = _ETA2[:, None]
        fan = (eta * hi <= F_LIMIT) & (hi >= 2) & _FAN_ALLOWED
        pen = np.where(fan, eta * eta * _g(np.minimum(eta * hi, F_LIMIT)), 0.0)
        _BELOW_CACHE[key] = (fan, pen, -np.expm1(-eta * hi) / hi)
    return _BELOW_CACHE[key]


def _log_e(t: np.ndarray, hi: np.ndarray, m: np.ndarray, above: bool) -> np.ndarray:
    """log mixture e-value; t: X + (B, 6), m: X (broadcast), returns X."""
    m = np.clip(np.asarray(m, dtype=np.float64), 0.0, 1.0)
    t, m = np.broadcast_arrays(t, m[..., None, None])
    m = m[..., :1, :1]  # X + (1, 1)
    s = t[..., None, :, :]  # X + (1, B, 6)
    n, y = s[..., N], s[..., Y]  # X + (1, B)
    w2 = s[..., Y2] - 2 * m * s[..., NY] + m * m * s[..., N2]
    eta = _ETA2[:, None]  # (2 J, 1)
    mass = m * n.sum(axis=-1, keepdims=True)  # X + (1, 1): the null's flip mass m N
    if above:
        x = eta * (m * hi)
        fan = (x <= F_LIMIT) & (hi >= 2) & _FAN_ALLOWED
        coef = np.expm1(np.minimum(eta * hi, _EXP_CAP)) / hi  # P: per unit mass, biggest first
        pen = (np.where(fan, eta * eta * _g(np.minimum(x, F_LIMIT)), 0.0) * np.maximum(w2, 0.0)).sum(axis=-1)
    else:
        fan, pen_coef, coef = _below_terms(hi)  # P: per unit mass, smallest first = biggest clusters first
        pen = (pen_coef * np.maximum(w2, 0.0)).sum(axis=-1)
    cap = np.where(fan, 0.0, n)[..., ::-1]  # P bins' capacities, biggest clusters first
    before = np.cumsum(cap, axis=-1) - cap
    fill = np.clip(mass - before, 0.0, cap)
    coef = np.broadcast_to(coef, fill.shape)[..., ::-1]
    alloc = (fill * np.minimum(coef, 1e250)).sum(axis=-1) + eta[:, 0] * (mass[..., 0] - fill.sum(axis=-1))
    total = y.sum(axis=-1)
    log_l = eta[:, 0] * total - pen - alloc if above else -eta[:, 0] * total - pen + alloc
    log_l = log_l + _LOG_W
    top = log_l.max(axis=-1)
    return top + np.log(np.exp(log_l - top[..., None]).sum(axis=-1))


def log_evalue_above(tables, m) -> np.ndarray:
    """log e-value against H0: the running request-weighted rate <= m (rollback-side evidence)."""
    t, hi = _trim(_stack(tables))
    return _log_e(t, hi, np.asarray(m, dtype=np.float64), above=True)


def log_evalue_below(tables, m) -> np.ndarray:
    """log e-value against H0: the running request-weighted rate >= m (promote-side evidence)."""
    t, hi = _trim(_stack(tables))
    return _log_e(t, hi, np.asarray(m, dtype=np.float64), above=False)


_GRID = 24
_ROUNDS = 3
_CHUNK_CELLS = 4_000_000  # elements per vectorised block (memory)


def _edge(t: np.ndarray, hi: np.ndarray, lo: np.ndarray, up: np.ndarray, thr: np.ndarray, above: bool,
          rounds: int = _ROUNDS) -> np.ndarray:
    """Grid refinement of the edge of the rejected region within [lo, up], elementwise; returns the
    conservative end of the final bracket (the lower bound's low end, the upper bound's high end)."""
    frac = np.arange(1, _GRID + 1) / (_GRID + 1)
    for _ in range(rounds):
        grid = lo[..., None] + (up - lo)[..., None] * frac
        rej = _log_e(t[..., None, :, :], hi, grid, above) >= thr[..., None]
        if above:  # lower bound: rejected below the edge; last rejected point -> new lo
            any_rej = rej.any(axis=-1)
            j = _GRID - 1 - np.argmax(rej[..., ::-1], axis=-1)
            new_lo = np.where(any_rej, np.take_along_axis(grid, j[..., None], -1)[..., 0], lo)
            nxt = np.take_along_axis(grid, np.minimum(j + 1, _GRID - 1)[..., None], -1)[..., 0]
            new_up = np.where(any_rej, np.where(j < _GRID - 1, nxt, up), grid[..., 0])
        else:  # upper bound: rejected above the edge; first rejected point -> new up
            any_rej = rej.any(axis=-1)
            j = np.argmax(rej, axis=-1)
            new_up = np.where(any_rej, np.take_along_axis(grid, j[..., None], -1)[..., 0], up)
            prev = np.take_along_axis(grid, np.maximum(j - 1, 0)[..., None], -1)[..., 0]
            new_lo = np.where(any_rej, np.where(j > 0, prev, lo), grid[..., -1])
        lo, up = new_lo, new_up
    return lo if above else up


def _bound(tables, alpha, above: bool, rounds: int = _ROUNDS) -> np.ndarray:
    t, hi = _trim(_stack(tables))
    lead = t.shape[:-2]
    flat = t.reshape(-1, *t.shape[-2:])
    a = np.broadcast_to(np.asarray(alpha, dtype=np.float64), lead).reshape(-1)
    n = flat[:, :, N].sum(axis=-1)
    est = np.where(n > 0, flat[:, :, Y].sum(axis=-1) / np.maximum(n, 1e-300), 0.0)
    out = np.where(n > 0, 0.0, 0.0 if above else 1.0)
    live = np.flatnonzero(n > 0)
    step = max(1, _CHUNK_CELLS // (_GRID * ETA.size * hi.size))
    for i in range(0, live.size, step):
        idx = live[i:i + step]
        thr = np.log(1.0 / a[idx])
        if above:
            out[idx] = _edge(flat[idx], hi, np.zeros(idx.size), est[idx], thr, True, rounds)
        else:
            up = _edge(flat[idx], hi, est[idx], np.ones(idx.size), thr, False, rounds)
            out[idx] = up
    return out.reshape(lead)


def lower_bound(tables, alpha, rounds: int = _ROUNDS) -> np.ndarray:
    """Anytime-valid lower bound of the running request-weighted rate (P(ever above it... ) <= alpha):
    the edge of {m : log_evalue_above(m) >= log 1/alpha}; 0 without data."""
    return _bound(tables, alpha, above=True, rounds=rounds)


def upper_bound(tables, alpha, rounds: int = _ROUNDS) -> np.ndarray:
    """Anytime-valid upper bound of the running request-weighted rate; 1 without data."""
    return _bound(tables, alpha, above=False, rounds=rounds)


def rejects_above(tables, m, alpha) -> np.ndarray:
    """The rollback-side test at m: True when the rate is confidently above m."""
    return log_evalue_above(tables, m) >= np.log(1.0 / np.asarray(alpha, dtype=np.float64))


def rejects_below(tables, m, alpha) -> np.ndarray:
    """The promote-side test at m: True when the rate is confidently below m."""
    return log_evalue_below(tables, m) >= np.log(1.0 / np.asarray(alpha, dtype=np.float64))


def requests_to_cross(table: RatioTable, target: float, alpha: float, *, side: str, horizon: float = 1e8) -> int | None:
    """Extra requests needed, if the cluster mix and the rate stayed as observed, for the test at
    ``target`` to decide ("upper": the rate shown below target; "lower": above). None if never
    within ``horizon`` requests or without data; a projection, not a promise."""
    n = table.requests
    est = table.estimate
    if est is None or not np.isfinite(target):
        return None
    if (side == "upper" and est >= target) or (side == "lower" and est <= target):
        return None
    thr = math.log(1.0 / alpha)

    def crosses(factors: np.ndarray) -> np.ndarray:
        scaled = table.t[None] * factors[:, None, None]
        e = log_evalue_below(scaled, target) if side == "upper" else log_evalue_above(scaled, target)
        return e >= thr

    factors = np.geomspace(1.0, max(horizon / n, 1.0), 40)
    ok = crosses(factors)
    if not ok.any():
        return None
    k = int(np.argmax(ok))
    f = factors[k]
    if k > 0:  # within the step where it first crosses
        fine = np.linspace(factors[k - 1], factors[k], 17)[1:]
        f = fine[int(np.argmax(crosses(fine)))]
    return int(max(math.ceil(f * n - n), 0))
