"""One ``MetricJudgement`` per metric, from the cumulative counts: the anytime-valid bounds behind
the verdict (the alpha split and the verdict rules are in ``scorers.judge``).

Every metric is "bigger is worse" and judged against its margin: ``fail`` when the lower bound is
above it, ``pass`` when the upper bound is below it. A metric made of two bounds (candidate and
noise run, the two discordant cells of McNemar's table) splits its level equally between them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from schemas.events import MetricJudgement
from scorers import ratio_cs as rc
from scorers.accumulate import PairAccumulator
from scorers.clusters import ClusterStats
from scorers.sequential import lower_bound, requests_to_cross, upper_bound

FLIP = "label_flip_rate"
ABS_DELTA = "abs_confidence_delta"
ERROR = "error_rate"
ACCURACY = "accuracy_drop"


def decide(lower, upper, margin) -> np.ndarray:
    """Vectorised per-metric decision shared by the judge and the simulation harness."""
    lower, upper = np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)
    return np.where(lower > margin, "fail", np.where(upper < margin, "pass", "inconclusive"))


def describe_clusters(table: rc.RatioTable, stats: ClusterStats | None = None, pending: int = 0,
                      unit: str = "requests") -> str:
    """What the bounds rest on: requests, independent clusters, the largest, Kish's effective number,
    the design effect, the busiest key, and the requests still in open clusters."""
    n, c = int(table.requests), int(table.clusters)
    parts = [f"request-weighted over {n} {unit} in {c} independent clusters"]
    if c and c < n:
        deff = table.design_effect()
        parts.append(f"largest cluster <= {table.largest}, effective {table.kish():.0f} equal clusters"
                     + ("" if deff is None else f", design effect {deff:.2g} (1 = no dependence)"))
    if stats is not None:
        busiest = stats.busiest_key()
        if busiest is not None and busiest[1] >= 0.2:
            parts.append(f"one key carries >= {busiest[1]:.0%} of the requests (cut into sessions of at most the "
                         f"cluster cap: is the sample_key a user id?)")
    if pending:
        parts.append(f"{pending} more in open clusters, counted when their session ends")
    return "; ".join(parts)


def rate_metric(name: str, table: rc.RatioTable, margin: float, a_r: float, a_p: float,
                noise: rc.RatioTable | None = None, critical: bool = False, about: str = ""):
    """A request-weighted rate (sum y / sum n over closed clusters, ``scorers.ratio_cs``) minus the
    noise floor when a noise run is given. Returns (judgement, requests needed or None)."""
    return rate_metrics([RateSpec(name, table, margin, noise, critical, about)], a_r, a_p)[0]


@dataclass
class RateSpec:
    name: str
    table: rc.RatioTable
    margin: float
    noise: rc.RatioTable | None = None
    critical: bool = False
    about: str = ""


def rate_metrics(specs: list[RateSpec], a_r: float, a_p: float) -> list[tuple[MetricJudgement, int | None]]:
    """``rate_metric`` for several metrics at once (the bounds of all of them in one vectorised search).

    Without a noise run: the rollback-side bound at ``a_r``, the promote-side one at ``a_p``. With one,
    candidate and noise bounds each at half of that (union bound): lower = candidate's lower - noise's
    upper, upper = candidate's upper - noise's lower. The decision is the test at the margin (plus the
    noise run's bound) itself, exactly valid; the bounds shown are the edges of the confidence
    sequence, equal to it up to the search's resolution (kept consistent with the decision)."""
    out: list = [None] * len(specs)
    live = [i for i, sp in enumerate(specs) if sp.table.requests > 0]
    for i, sp in enumerate(specs):
        if i not in live:
            out[i] = (MetricJudgement(name=sp.name, estimate=None, lower=None, upper=None, margin=sp.margin,
                                      decision="inconclusive", samples=0, critical=sp.critical,
                                      detail=sp.about or "no data"), None)
    if not live:
        return out
    noisy = [i for i in live if specs[i].noise is not None and specs[i].noise.requests > 0]
    noise_hi = dict.fromkeys(live, 0.0)
    noise_lo = dict.fromkeys(live, 0.0)
    if noisy:
        stack = [specs[i].noise for i in noisy]
        noise_hi.update(zip(noisy, rc.upper_bound(stack, a_r / 2).tolist(), strict=True))
        noise_lo.update(zip(noisy, rc.lower_bound(stack, a_p / 2).tolist(), strict=True))
    k = np.array([2.0 if i in noisy else 1.0 for i in live])
    stack = [specs[i].table for i in live]
    lows = rc.lower_bound(stack, a_r / k)
    highs = rc.upper_bound(stack, a_p / k)
    margins = np.array([specs[i].margin for i in live])
    hi_shift = np.array([noise_hi[i] for i in live])
    lo_shift = np.array([noise_lo[i] for i in live])
    fails = rc.rejects_above(stack, margins + hi_shift, a_r / k)
    passes = rc.rejects_below(stack, margins + lo_shift, a_p / k)
    for j, i in enumerate(live):
        sp = specs[i]
        margin, table = sp.margin, sp.table
        details = [sp.about] if sp.about else []
        noise_est = 0.0
        if i in noisy:
            noise_est = sp.noise.estimate
            details.append(f"noise floor {noise_est:.4g} from {int(sp.noise.requests)} baseline-vs-baseline replays "
                           f"in {int(sp.noise.clusters)} clusters subtracted")
        lo, hi = float(lows[j]) - noise_hi[i], float(highs[j]) - noise_lo[i]
        fail, ok = bool(fails[j]), bool(passes[j])
        dec = "fail" if fail else ("pass" if ok else "inconclusive")
        lo = max(lo, float(np.nextafter(margin, np.inf))) if fail else min(lo, margin)
        hi = min(hi, float(np.nextafter(margin, -np.inf))) if ok else max(hi, margin)
        est = table.estimate - noise_est
        needed = None
        if dec == "inconclusive":  # the noise run's uncertainty counts: its bound, not its estimate
            heading_bad = est > margin
            side, a = ("lower", a_r) if heading_bad else ("upper", a_p)
            target = margin + (noise_hi[i] if heading_bad else noise_lo[i])
            needed = rc.requests_to_cross(table, target, a / k[j], side=side)
        out[i] = (MetricJudgement(name=sp.name, estimate=float(est), lower=lo, upper=hi, margin=margin,
                                  decision=dec, samples=int(table.requests), critical=sp.critical,
                                  detail="; ".join(details)), needed)
    return out


def mean_metric(name, n, s, margin, a_r, a_p, noise_n=0, noise_s=0.0, critical=False, weighted=None):
    """A bounded running-mean metric on the evidence requests, minus the noise floor when a noise run
    is given. ``weighted``: (requests, sum) of every request, reported beside the evidence."""
    if n == 0:
        return MetricJudgement(name=name, estimate=None, lower=None, upper=None, margin=margin,
                               decision="inconclusive", samples=0, critical=critical, detail="no data"), None
    details = []
    if weighted is not None and weighted[0] != n:
        details.append(f"{int(n)} independent of {int(weighted[0])} requests (repeats of an input or sample key "
                       f"count once); request-weighted {weighted[1] / max(weighted[0], 1):.4g}")
    if noise_n > 0:  # candidate and noise bounds each at half the level (union bound)
        noise_hi, noise_lo = upper_bound(noise_n, noise_s, a_r / 2), lower_bound(noise_n, noise_s, a_p / 2)
        lo = lower_bound(n, s, a_r / 2) - noise_hi
        hi = upper_bound(n, s, a_p / 2) - noise_lo
        noise_est = noise_s / noise_n
        details.append(f"noise floor {noise_est:.4g} from {int(noise_n)} baseline-vs-baseline replays subtracted")
    else:
        lo, hi, noise_est, noise_hi, noise_lo = lower_bound(n, s, a_r), upper_bound(n, s, a_p), 0.0, 0.0, 0.0
    est = s / n - noise_est
    dec = str(decide(lo, hi, margin))
    needed = None
    if dec == "inconclusive":  # the noise run's uncertainty counts: its bound, not its estimate
        heading_bad = est > margin
        side, a = ("lower", a_r) if heading_bad else ("upper", a_p)
        target = margin + float(noise_hi if heading_bad else noise_lo)
        needed = requests_to_cross(n, s / n, target, a / (2 if noise_n else 1), side=side)
    return MetricJudgement(name=name, estimate=est, lower=float(lo), upper=float(hi), margin=margin,
                           decision=dec, samples=int(n), critical=critical, detail="; ".join(details)), needed


def accuracy_metric(acc: PairAccumulator, margin, a_r, a_p, critical):
    n, b, c = acc.labelled, acc.baseline_right_candidate_wrong, acc.baseline_wrong_candidate_right
    if n == 0:
        return MetricJudgement(name=ACCURACY, estimate=None, lower=None, upper=None, margin=margin,
                               decision="inconclusive", samples=0, critical=critical, detail="no labels")
    # delta = P(baseline right, candidate wrong) - P(baseline wrong, candidate right): McNemar's
    # discordant cells, each bounded by its own confidence sequence (variance-adaptive, since both
    # are usually rare), at half the level each.
    lo = lower_bound(n, b, a_r / 2) - upper_bound(n, c, a_r / 2)
    hi = upper_bound(n, b, a_p / 2) - lower_bound(n, c, a_p / 2)
    p_exact = stats.binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    return MetricJudgement(
        name=ACCURACY, estimate=(b - c) / n, lower=float(lo), upper=float(hi), margin=margin,
        decision=str(decide(lo, hi, margin)), samples=int(n), critical=critical,
        detail=f"discordant pairs: {b} baseline-only right, {c} candidate-only right "
               f"(fixed-sample McNemar exact p={p_exact:.3g}, for reference only)")
