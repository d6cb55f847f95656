"""Distribution divergence between baseline and candidate predictions over a window.

These compare *distributions* (what Evidently-style drift checks do); the judge itself uses the paired
per-request diffs, which are far more sensitive because both models answered the same input. They are
reported, not gating: on large windows any test rejects (evidently#50), so read the statistic.

Fixed, documented binning for the binned divergences (PSI, KL, JS, Hellinger):

* ``bins`` quantile bins of the *baseline* (edges at its 0, 1/bins, ..., 1 quantiles, duplicates from
  ties removed), outer edges opened to -inf / +inf so candidate values outside the baseline's range land
  in the end bins; a value equal to an edge goes to the bin on its right (numpy ``searchsorted`` right);
* zero-bin smoothing for PSI and KL (which divide by bin shares): ``smoothing`` = 0.5 pseudo-count added
  to every bin of both histograms before normalising (Jeffreys-style; Evidently instead fills empty bins
  with 1e-4). JS distance and Hellinger are finite with empty bins and use the raw shares.

Conventions: ``kl`` is KL(candidate || baseline) in nats (``scipy.stats.entropy(cand, base)``);
``js_distance`` is the square root of the JS divergence, natural log (``scipy.spatial.distance.jensenshannon``);
``hellinger`` is sqrt(1/2 sum (sqrt p - sqrt q)^2) in [0, 1]; ``psi`` = sum (c - b) ln(c / b).

From counts (``from_counts``, used by ``PairAccumulator.divergence()`` at window close, so no raw rows
are read back). The accumulator keeps top-class confidence in 50 equal-width bins over [0, 1], exact
fixed-point moments of it, predicted-label counts and the joint (baseline, candidate) label table; see
``scorers.histograms``. Same keys as ``describe`` plus ``chi2_labels_pvalue`` and ``stuart_maxwell_pvalue``:

* exact from counts: ``chi2_labels_pvalue`` and ``stuart_maxwell_pvalue`` (bit-for-bit the raw-data
  ``chi2_labels`` / ``stuart_maxwell``: same tables, same code), and ``psi``, ``kl``, ``js_distance``,
  ``hellinger`` *given the binning*. That binning is not ``describe``'s: fixed equal-width bins of [0, 1]
  instead of the baseline's 10 quantile bins (quantiles of a window are unknown until it closes), and
  bins empty in both samples are dropped before the 0.5 smoothing (most of [0, 1] is unreachable, e.g.
  below 1/K for K classes, and would otherwise dilute PSI / KL). Numbers are therefore comparable across
  windows of the new scheme, not with values computed by ``describe``. More bins also raise the
  no-drift floor of PSI (about (occupied bins - 1) * (1/n_b + 1/n_c); ~0.07 at 1,000 rows a side where
  10 quantile bins give ~0.02), so don't read it against the usual 0.1 / 0.25 PSI rules of thumb;
* approximate, from the binned CDFs: ``wasserstein`` puts each value at its bin's midpoint, so it is
  within one bin width (1/bins = 0.02) of the raw-data value (each sample moves by at most half a bin
  in W1, triangle inequality); ``ks`` is the largest CDF gap at bin edges, so it never exceeds the raw
  statistic and falls short of it by at most the largest single-bin share of either sample (within a
  bin each CDF rises by at most that bin's share); ``wasserstein_normalised`` divides the binned W1 by
  the baseline standard deviation from the fixed-point moments (within ~1e-6 of ``np.std(ddof=1)``), so
  its error is at most about 0.02 / std. Values outside [0, 1] are clipped first; the bounds are for
  values in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

DEFAULT_BINS = 10
DEFAULT_SMOOTHING = 0.5


@dataclass(frozen=True)
class DivergenceResult:
    """scipy.stats-like: ``statistic`` always, ``pvalue`` where there is a test, ``detail`` for humans."""

    statistic: float
    pvalue: float | None = None
    detail: str = ""


def quantile_edges(baseline, bins: int = DEFAULT_BINS) -> np.ndarray:
    """Inner bin edges (length <= bins - 1) at the baseline's quantiles, ties collapsed."""
    b = np.asarray(baseline, dtype=np.float64).ravel()
    b = b[np.isfinite(b)]
    if b.size == 0:
        raise ValueError("baseline has no finite values")
    inner = np.quantile(b, np.linspace(0, 1, bins + 1)[1:-1])
    return np.unique(inner)


def histograms(baseline, candidate, bins: int = DEFAULT_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Counts of baseline and candidate in the baseline's quantile bins (non-finite values dropped
    here: the diff layer counts them as candidate errors)."""
    edges = quantile_edges(baseline, bins)
    out = []
    for x in (baseline, candidate):
        x = np.asarray(x, dtype=np.float64).ravel()
        x = x[np.isfinite(x)]
        out.append(np.bincount(np.searchsorted(edges, x, side="right"), minlength=edges.size + 1))
    return out[0].astype(np.float64), out[1].astype(np.float64)


def _shares(counts: np.ndarray, smoothing: float) -> np.ndarray:
    c = counts + smoothing
    return c / c.sum()


# Count-level cores: the raw-data functions bin and call these; ``from_counts`` calls them directly.
def _psi(b: np.ndarray, c: np.ndarray, smoothing: float) -> float:
    pb, pc = _shares(b, smoothing), _shares(c, smoothing)
    return float(np.sum((pc - pb) * np.log(pc / pb)))


def _kl(b: np.ndarray, c: np.ndarray, smoothing: float) -> float:
    pb, pc = _shares(b, smoothing), _shares(c, smoothing)
    return float(np.sum(pc * np.log(pc / pb)))


def _js(b: np.ndarray, c: np.ndarray) -> float:
    pb, pc = b / b.sum(), c / c.sum()
    m = 0.5 * (pb + pc)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(pb > 0, pb * np.log(pb / m), 0.0) + np.where(pc > 0, pc * np.log(pc / m), 0.0)
    return float(np.sqrt(max(0.5 * terms.sum(), 0.0)))


def _hellinger(b: np.ndarray, c: np.ndarray) -> float:
    pb, pc = b / b.sum(), c / c.sum()
    return float(np.sqrt(max(0.5 * np.sum((np.sqrt(pb) - np.sqrt(pc)) ** 2), 0.0)))


def psi(baseline, candidate, bins: int = DEFAULT_BINS, smoothing: float = DEFAULT_SMOOTHING) -> DivergenceResult:
    b, c = histograms(baseline, candidate, bins)
    return DivergenceResult(_psi(b, c, smoothing), detail=f"{b.size} quantile bins")


def kl(baseline, candidate, bins: int = DEFAULT_BINS, smoothing: float = DEFAULT_SMOOTHING) -> DivergenceResult:
    b, c = histograms(baseline, candidate, bins)
    return DivergenceResult(_kl(b, c, smoothing), detail="KL(candidate || baseline), nats")


def js_distance(baseline, candidate, bins: int = DEFAULT_BINS) -> DivergenceResult:
    return DivergenceResult(_js(*histograms(baseline, candidate, bins)), detail="natural log")


def hellinger(baseline, candidate, bins: int = DEFAULT_BINS) -> DivergenceResult:
    return DivergenceResult(_hellinger(*histograms(baseline, candidate, bins)))


def _finite(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).ravel()
    return x[np.isfinite(x)]


def wasserstein(baseline, candidate) -> DivergenceResult:
    """Wasserstein-1 between the empirical distributions (no binning): the integral of |F_b - F_c|."""
    b, c = np.sort(_finite(baseline)), np.sort(_finite(candidate))
    grid = np.sort(np.concatenate([b, c]))
    widths = np.diff(grid)
    fb = np.searchsorted(b, grid[:-1], side="right") / b.size
    fc = np.searchsorted(c, grid[:-1], side="right") / c.size
    return DivergenceResult(float(np.sum(np.abs(fb - fc) * widths)))


def wasserstein_normalised(baseline, candidate) -> DivergenceResult:
    """Wasserstein-1 divided by the baseline's standard deviation (ddof=1), as Evidently does, so the
    number reads in baseline standard deviations; infinite if the baseline is constant and they differ."""
    raw = wasserstein(baseline, candidate).statistic
    sd = float(np.std(_finite(baseline), ddof=1))
    value = raw / sd if sd > 0 else (0.0 if raw == 0 else float("inf"))
    return DivergenceResult(value, detail=f"raw {raw:.4g} / baseline std {sd:.4g}")


def ks(baseline, candidate) -> DivergenceResult:
    """Two-sample Kolmogorov-Smirnov; statistic computed here (vectorised), p-value from scipy's
    ``ks_2samp`` (exact for small samples, asymptotic otherwise), so both agree with scipy."""
    b, c = np.sort(_finite(baseline)), np.sort(_finite(candidate))
    grid = np.concatenate([b, c])
    d = np.max(np.abs(np.searchsorted(b, grid, side="right") / b.size - np.searchsorted(c, grid, side="right") / c.size))
    p = stats.ks_2samp(b, c).pvalue
    return DivergenceResult(float(d), float(p))


def chi2_labels(baseline_labels, candidate_labels) -> DivergenceResult:
    """Chi-squared homogeneity test of the two predicted-label distributions (2 x K contingency table,
    classes absent from both dropped; no Yates correction). It treats the two samples as independent,
    which they are not in shadow replay (same inputs); see ``stuart_maxwell`` for the paired test."""
    b = np.asarray(baseline_labels).ravel()
    c = np.asarray(candidate_labels).ravel()
    classes = np.union1d(b, c)
    return chi2_table(np.stack([(b[:, None] == classes).sum(0), (c[:, None] == classes).sum(0)]))


def chi2_table(table) -> DivergenceResult:
    """``chi2_labels`` from its 2 x K table of label counts (row 0 baseline, row 1 candidate); classes
    absent from both are dropped, so a table padded with zero columns gives the same answer."""
    table = np.asarray(table, dtype=np.int64)
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        return DivergenceResult(0.0, 1.0, "one class only")
    res = stats.chi2_contingency(table, correction=False)
    return DivergenceResult(float(res.statistic), float(res.pvalue), f"dof {res.dof}")


def stuart_maxwell(baseline_labels, candidate_labels) -> DivergenceResult:
    """Paired marginal-homogeneity test (Stuart-Maxwell) on the K x K table of (baseline, candidate)
    labels; reduces to McNemar's (b - c)^2 / (b + c) for K = 2."""
    b = np.asarray(baseline_labels).ravel()
    c = np.asarray(candidate_labels).ravel()
    classes, inv = np.unique(np.concatenate([b, c]), return_inverse=True)
    table = np.zeros((classes.size, classes.size))
    np.add.at(table, (inv[: b.size], inv[b.size:]), 1)
    return stuart_maxwell_table(table)


def stuart_maxwell_table(table) -> DivergenceResult:
    """``stuart_maxwell`` from its K x K table (rows baseline label, columns candidate label, same class
    order); classes absent from both margins are dropped."""
    table = np.asarray(table, dtype=np.float64)
    used = (table.sum(0) + table.sum(1)) > 0
    table = table[np.ix_(used, used)]
    k = table.shape[0]
    if k < 2:
        return DivergenceResult(0.0, 1.0, "one class only")
    d = (table.sum(1) - table.sum(0))[:-1]
    s = -(table + table.T)
    np.fill_diagonal(s, table.sum(1) + table.sum(0) - 2 * np.diag(table))
    s = s[:-1, :-1]
    if not d.any():
        return DivergenceResult(0.0, 1.0, f"dof {k - 1}")
    stat = float(d @ np.linalg.pinv(s) @ d)
    dof = int(np.linalg.matrix_rank(s))
    return DivergenceResult(stat, float(stats.chi2.sf(stat, dof)), f"dof {dof}")


def describe(baseline, candidate, bins: int = DEFAULT_BINS) -> dict[str, float]:
    """All distribution statistics of one numeric prediction column, for window reports."""
    return {
        "psi": psi(baseline, candidate, bins).statistic, "kl": kl(baseline, candidate, bins).statistic,
        "js_distance": js_distance(baseline, candidate, bins).statistic,
        "hellinger": hellinger(baseline, candidate, bins).statistic,
        "wasserstein": wasserstein(baseline, candidate).statistic,
        "wasserstein_normalised": wasserstein_normalised(baseline, candidate).statistic,
        "ks": ks(baseline, candidate).statistic,
    }


def _cdfs(baseline_counts, candidate_counts) -> tuple[np.ndarray, np.ndarray]:
    b = np.asarray(baseline_counts, dtype=np.float64)
    c = np.asarray(candidate_counts, dtype=np.float64)
    if b.shape != c.shape or b.ndim != 1:
        raise ValueError(f"histograms of shapes {b.shape} and {c.shape}")
    return np.cumsum(b) / b.sum(), np.cumsum(c) / c.sum()


def binned_wasserstein(baseline_counts, candidate_counts, lo: float = 0.0, hi: float = 1.0) -> DivergenceResult:
    """W1 between two histograms on the same equal-width bins of [lo, hi], mass at bin midpoints: the
    integral of |F_b - F_c| with the CDFs stepping at midpoints. Within one bin width of the W1 of the
    underlying values (each sample is moved by at most half a bin)."""
    fb, fc = _cdfs(baseline_counts, candidate_counts)
    width = (hi - lo) / fb.size
    return DivergenceResult(float(width * np.abs(fb[:-1] - fc[:-1]).sum()), detail=f"bin width {width:.4g}")


def binned_ks(baseline_counts, candidate_counts) -> DivergenceResult:
    """Largest CDF gap at the bin edges: a lower bound of the raw two-sample KS statistic that falls
    short of it by at most the largest single-bin share of either sample. No p-value (the binned
    statistic is not KS-distributed under ties)."""
    fb, fc = _cdfs(baseline_counts, candidate_counts)
    b = np.asarray(baseline_counts, dtype=np.float64)
    c = np.asarray(candidate_counts, dtype=np.float64)
    slack = max(float((b / b.sum()).max()), float((c / c.sum()).max()))
    return DivergenceResult(float(np.abs(fb - fc).max()), detail=f"raw KS <= this + {slack:.4g}")


def from_counts(baseline_bins=None, candidate_bins=None, *, baseline_std: float | None = None,
                label_counts=None, label_pairs=None, smoothing: float = DEFAULT_SMOOTHING) -> dict[str, float]:
    """The window statistics of ``describe`` + ``chi2_labels_pvalue`` + ``stuart_maxwell_pvalue`` from
    mergeable counts (exactness and error bounds: module docstring).

    ``baseline_bins`` / ``candidate_bins``: counts of top-class confidence in equal-width bins of [0, 1]
    (same length), giving psi, kl, js_distance, hellinger, wasserstein, ks, and wasserstein_normalised
    when ``baseline_std`` (standard deviation of the baseline values, ddof=1) is given; each histogram
    needs at least 2 values. ``label_counts``: 2 x K predicted-label counts (row 0 baseline, row 1
    candidate) -> chi2_labels_pvalue. ``label_pairs``: K x K joint table (rows baseline, columns
    candidate) -> stuart_maxwell_pvalue. A part that is missing or has fewer than 2 rows contributes no
    keys; only finite values are returned.
    """
    out: dict[str, float] = {}
    if baseline_bins is not None and candidate_bins is not None:
        b = np.asarray(baseline_bins, dtype=np.float64)
        c = np.asarray(candidate_bins, dtype=np.float64)
        if b.shape != c.shape:
            raise ValueError(f"histograms of shapes {b.shape} and {c.shape}")
        if b.sum() >= 2 and c.sum() >= 2:
            used = (b + c) > 0  # bins empty in both carry no information; don't let smoothing see them
            bu, cu = b[used], c[used]
            out.update(psi=_psi(bu, cu, smoothing), kl=_kl(bu, cu, smoothing), js_distance=_js(bu, cu),
                       hellinger=_hellinger(bu, cu), wasserstein=binned_wasserstein(b, c).statistic,
                       ks=binned_ks(b, c).statistic)
            if baseline_std is not None:
                raw = out["wasserstein"]
                out["wasserstein_normalised"] = raw / baseline_std if baseline_std > 0 else (
                    0.0 if raw == 0 else float("inf"))
    if label_counts is not None:
        t = np.asarray(label_counts, dtype=np.int64)
        if t.ndim == 2 and t.shape[0] == 2 and t.sum(1).min() >= 2:
            out["chi2_labels_pvalue"] = chi2_table(t).pvalue
    if label_pairs is not None:
        t = np.asarray(label_pairs, dtype=np.int64)
        if t.sum() >= 2:
            out["stuart_maxwell_pvalue"] = stuart_maxwell_table(t).pvalue
    return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}
