"""One ``MetricJudgement`` per metric, from the cumulative counts: the anytime-valid bounds behind
the verdict (the alpha split and the verdict rules are in ``scorers.judge``).

Every metric is "bigger is worse" and judged against its margin: ``fail`` when the lower bound is
above it, ``pass`` when the upper bound is below it. A metric made of two bounds (candidate and
noise run, the two discordant cells of McNemar's table) splits its level equally between them.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from schemas.events import MetricJudgement
from scorers.accumulate import PairAccumulator
from scorers.latency import latency_ratio_metric
from scorers.sequential import lower_bound, requests_to_cross, upper_bound
from scorers.sketch import LatencySketch

FLIP = "label_flip_rate"
ABS_DELTA = "abs_confidence_delta"
ERROR = "error_rate"
ACCURACY = "accuracy_drop"


def decide(lower, upper, margin) -> np.ndarray:
    """Vectorised per-metric decision shared by the judge and the simulation harness."""
    lower, upper = np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)
    return np.where(lower > margin, "fail", np.where(upper < margin, "pass", "inconclusive"))


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


def latency_metric(acc: PairAccumulator, policy, a_r, a_p, critical, noise, paired):
    """Candidate / baseline latency quantile ratio (scorers.latency). With a replayed baseline (noise
    run) and the paired state of the same requests, the comparison is on the same hardware and
    paired; production's reported latency is then informational (in the detail)."""
    kw = dict(name=policy.latency_metric, margin=policy.latency_p99_ratio_margin, q=policy.latency_quantile,
              alpha_rollback=a_r, alpha_promote=a_p, critical=critical)
    if paired is not None:  # fixed for the whole run by configuration, never switched by the data
        reference = noise.candidate_latency if noise is not None else LatencySketch()
        m, needed = latency_ratio_metric(acc.candidate_latency, reference,
                                         baseline_label="replayed baseline", paired_log_ratios=paired, **kw)
        b, c, q = acc.baseline_latency, acc.candidate_latency, policy.latency_quantile
        if b.count and c.count and b.quantile(q):
            m.detail += (f"; production p{q * 100:g} {b.quantile(q):.4g} ms, candidate / production "
                         f"{c.quantile(q) / b.quantile(q):.3g} (informational: other hardware and path)")
        return m, needed
    return latency_ratio_metric(acc.candidate_latency, acc.baseline_latency, baseline_label="production", **kw)


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
