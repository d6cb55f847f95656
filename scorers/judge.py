"""The verdict: promote, hold or rollback, from anytime-valid one-sided bounds per metric.

Hypotheses are one-sided non-inferiority per metric m with a pre-registered margin (metrics are
"bigger is worse"): with delta_m = candidate metric - noise floor (the same metric measured by
replaying the baseline against itself; 0 without a noise run),

* ``fail``  (rollback evidence): the anytime-valid *lower* bound of delta_m is above the margin;
* ``pass``  (promote evidence):  the anytime-valid *upper* bound of delta_m is below the margin;
* ``inconclusive`` otherwise.

Alpha split (``alpha`` = policy.alpha, default 0.05):

* rollback side alpha/2, Bonferroni over the K rollback-capable metrics (gating or critical ones that
  are configured, fixed in advance whether or not data for them ever arrives): each lower bound at
  alpha/(2K). A false rollback needs at least one lower bound wrong at some time: P <= alpha/2.
* promote side alpha/2, *not* divided: promote needs every gating metric to pass (an
  intersection-union test), so a false promote needs the one truly-bad metric's upper bound to be
  wrong at some time: P <= alpha/2.
* a metric made of two bounds (candidate and noise run, candidate and baseline quantile, the two
  discordant cells of McNemar's table) splits its level equally between them (union bound).
* slices: e-BH at ``slice_alpha`` (default alpha/2) on the e-processes "slice flip rate above margin".

The bounds are confidence sequences (scorers.sequential), valid simultaneously over all sample
sizes, so judging the cumulative accumulator at every window close keeps these guarantees.

Verdict rules, in order: any critical metric fails -> rollback (always); data-quality problem
(sample-ratio mismatch, missing latencies) -> hold; any gating metric fails -> rollback; failed slices
-> ``slice_failure_verdict`` (hold by default); every gating metric passes and min_samples is met ->
promote; otherwise hold, with an estimate of the extra requests a decision needs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

import numpy as np
from scipy import stats

from schemas.events import MetricJudgement, SliceJudgement, Verdict
from scorers.accumulate import PairAccumulator
from scorers.sequential import (
    ebh, log_evalue_above, lower_bound, order_statistic_ranks, requests_to_cross, upper_bound,
)

FLIP = "label_flip_rate"
ABS_DELTA = "abs_confidence_delta"
ERROR = "error_rate"
ACCURACY = "accuracy_drop"


@dataclass(frozen=True)
class JudgePolicy:
    """Pre-registered margins and levels. A margin of None switches that metric off."""

    label_flip_rate_margin: float | None = 0.02  # share of scored requests whose top class changes
    abs_confidence_delta_margin: float | None = 0.05  # mean |candidate - baseline prob of baseline's class|
    latency_p99_ratio_margin: float | None = 1.5  # candidate / baseline latency quantile
    latency_quantile: float = 0.99
    accuracy_drop_margin: float | None = 0.01  # baseline accuracy - candidate accuracy (labelled rows)
    min_labelled: int = 200  # accuracy joins the gating metrics from this many labelled rows
    max_error_rate: float = 0.01  # candidate errors / requests (margin of the error_rate metric)
    min_samples: int = 500  # scored requests needed before any promote
    max_missing_fraction: float = 0.05  # tolerated share of missing traffic / missing latencies
    alpha: float = 0.05
    critical: tuple[str, ...] = (ERROR,)
    gating: tuple[str, ...] | None = None  # None: every configured metric gates
    slice_min_samples: int = 100
    slice_alpha: float | None = None  # None: alpha / 2
    slice_failure_verdict: Literal["hold", "rollback"] = "hold"
    max_worst_slices: int = 5

    @classmethod
    def from_dict(cls, d: dict) -> JudgePolicy:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown judge policy keys: {unknown}; known: {sorted(known)}")
        d = dict(d)
        for k in ("critical", "gating"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def latency_metric(self) -> str:
        return f"latency_p{self.latency_quantile * 100:g}_ratio".replace(".", "")

    def margins(self) -> dict[str, float]:
        m = {ERROR: self.max_error_rate, FLIP: self.label_flip_rate_margin, ABS_DELTA: self.abs_confidence_delta_margin,
             self.latency_metric: self.latency_p99_ratio_margin, ACCURACY: self.accuracy_drop_margin}
        return {k: v for k, v in m.items() if v is not None}

    def gating_metrics(self) -> tuple[str, ...]:
        return tuple(self.margins()) if self.gating is None else tuple(g for g in self.gating if g in self.margins())

    def rollback_alpha(self) -> float:
        """Per-metric level of each lower bound: alpha / 2 over the K rollback-capable metrics."""
        k = len(set(self.gating_metrics()) | (set(self.critical) & set(self.margins())))
        return self.alpha / 2 / max(k, 1)

    def promote_alpha(self) -> float:
        return self.alpha / 2


@dataclass
class Judgement:
    verdict: Literal["promote", "hold", "rollback"]
    reasons: list[str]
    metrics: list[MetricJudgement]
    samples: int
    requests_needed: int | None = None
    worst_slices: list[SliceJudgement] = field(default_factory=list)
    example_request_ids: list[str] = field(default_factory=list)
    data_checks: dict[str, bool] = field(default_factory=dict)
    blocking_metric: str | None = None  # hold: the metric (or data check) the decision waits for
    failed_slices: int = 0

    def metric(self, name: str) -> MetricJudgement:
        return next(m for m in self.metrics if m.name == name)

    def to_verdict(self, *, model: str, candidate: str, window_start, window_end, updated_at) -> Verdict:
        return Verdict(model=model, candidate=candidate, verdict=self.verdict, reasons=self.reasons,
                       metrics=self.metrics, samples=self.samples, window_start=window_start,
                       window_end=window_end, updated_at=updated_at, requests_needed=self.requests_needed,
                       worst_slices=self.worst_slices, example_request_ids=self.example_request_ids,
                       blocking_metric=self.blocking_metric, failed_slices=self.failed_slices)


def decide(lower, upper, margin) -> np.ndarray:
    """Vectorised per-metric decision shared by the judge and the simulation harness."""
    lower, upper = np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)
    return np.where(lower > margin, "fail", np.where(upper < margin, "pass", "inconclusive"))


def _finite(x) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def _mean_metric(name, n, s, margin, a_r, a_p, noise_n=0, noise_s=0.0, critical=False, unit=""):
    """A bounded-mean metric, minus the noise floor when a noise run is given."""
    if n == 0:
        return MetricJudgement(name=name, estimate=None, lower=None, upper=None, margin=margin,
                               decision="inconclusive", samples=0, critical=critical, detail="no data"), None
    if noise_n > 0:  # candidate and noise bounds each at half the level (union bound)
        lo = lower_bound(n, s, a_r / 2) - upper_bound(noise_n, noise_s, a_r / 2)
        hi = upper_bound(n, s, a_p / 2) - lower_bound(noise_n, noise_s, a_p / 2)
        noise_est = noise_s / noise_n
        detail = f"noise floor {noise_est:.4g} from {noise_n} baseline-vs-baseline replays subtracted"
    else:
        lo, hi, noise_est, detail = lower_bound(n, s, a_r), upper_bound(n, s, a_p), 0.0, ""
    est = s / n - noise_est
    dec = str(decide(lo, hi, margin))
    side, a = ("lower", a_r) if est > margin else ("upper", a_p)
    needed = None if dec != "inconclusive" else requests_to_cross(n, s / n, margin + noise_est,
                                                                  a / (2 if noise_n else 1), side=side)
    return MetricJudgement(name=name, estimate=est, lower=float(lo), upper=float(hi), margin=margin,
                           decision=dec, samples=int(n), critical=critical, detail=detail), needed


def _latency_metric(acc: PairAccumulator, policy: JudgePolicy, a_r, a_p, critical):
    name, margin, q = policy.latency_metric, policy.latency_p99_ratio_margin, policy.latency_quantile
    b, c = acc.baseline_latency, acc.candidate_latency
    if b.count == 0 or c.count == 0:
        m = MetricJudgement(name=name, estimate=None, lower=None, upper=None, margin=margin,
                            decision="inconclusive", samples=min(b.count, c.count), critical=critical,
                            detail="no latency data")
        return m, _latency_requests_needed(m, q, min(a_r, a_p) / 2, c.relative_accuracy)
    # Ratio bounds from four order-statistic bounds, each at half the side's level; the sketch's
    # relative accuracy a widens each one (a returned value v has the true order statistic in
    # [v / (1 + a), v / (1 - a)]).
    ra = c.relative_accuracy
    c_lo_r, c_hi_r = order_statistic_ranks(c.count, q, a_r / 2, a_p / 2)
    b_lo_r, b_hi_r = order_statistic_ranks(b.count, q, a_p / 2, a_r / 2)
    c_lo = c.value_at_rank(c_lo_r - 1) / (1 + ra) if c_lo_r >= 1 else 0.0
    c_hi = c.value_at_rank(c_hi_r - 1) / (1 - ra) if c_hi_r <= c.count else math.inf
    b_lo = b.value_at_rank(b_lo_r - 1) / (1 + ra) if b_lo_r >= 1 else 0.0
    b_hi = b.value_at_rank(b_hi_r - 1) / (1 - ra) if b_hi_r <= b.count else math.inf
    lo = c_lo / b_hi if b_hi > 0 and math.isfinite(b_hi) else 0.0
    hi = c_hi / b_lo if b_lo > 0 else math.inf
    bq, cq = b.quantile(q), c.quantile(q)
    est = cq / bq if bq else None
    m = MetricJudgement(
        name=name, estimate=est, lower=_finite(lo), upper=_finite(hi), margin=margin,
        decision=str(decide(lo, hi, margin)), samples=int(min(b.count, c.count)), critical=critical,
        detail=f"p{q * 100:g} baseline {bq:.4g} ms, candidate {cq:.4g} ms")
    return m, _latency_requests_needed(m, q, min(a_r, a_p) / 2, ra)


def _latency_requests_needed(m: MetricJudgement, q: float, alpha: float, relative_accuracy: float) -> int | None:
    """Extra requests for an inconclusive quantile ratio to decide, if the ratio stayed where it is.

    Two parts: the sample must first be large enough for the extreme order statistic to exist at
    this level (q**n <= alpha: ~440 requests for p99 at alpha 1.25 %); then the interval's
    half-width on the log scale shrinks like 1/sqrt(n) (order-statistic bounds are asymptotically
    normal in the rank). None when the ratio sits within the sketch's accuracy of the margin (the
    bounds can never separate) or when there is no estimate yet and no sample at all.
    """
    if m.decision != "inconclusive":
        return None
    n = m.samples
    n_exist = math.ceil(math.log(alpha) / math.log(q)) if 0 < q < 1 else 1
    if m.estimate is None or m.lower is None or m.upper is None or m.estimate <= 0:
        return max(n_exist - n, 1)
    est, margin = m.estimate, m.margin
    floor = (1 + relative_accuracy) / (1 - relative_accuracy)
    if max(est, margin) / min(est, margin) <= floor:
        return None
    if est < margin:  # heading to pass: the upper bound must come below the margin
        half, room = math.log(m.upper / est), math.log(margin / est)
    else:  # heading to fail: the lower bound must rise above it
        half, room = math.log(est / max(m.lower, 1e-12)), math.log(est / margin)
    total = n * (half / room) ** 2
    return max(math.ceil(max(total, n_exist) - n), 1)


def _accuracy_metric(acc: PairAccumulator, margin, a_r, a_p, critical):
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


def _slices(acc: PairAccumulator, policy: JudgePolicy, noise: PairAccumulator | None):
    margin = policy.label_flip_rate_margin
    if margin is None:
        return [], 0
    s_alpha = policy.slice_alpha if policy.slice_alpha is not None else policy.alpha / 2
    shift = shift_low = 0.0
    if noise is not None and noise.scored:
        # A slice fails only above margin + the noise floor's *upper* bound; it passes only when its
        # upper bound minus the floor's *lower* bound is below the margin (each side conservative).
        shift = float(upper_bound(noise.scored, noise.label_flips, s_alpha / 2))
        shift_low = float(lower_bound(noise.scored, noise.label_flips, s_alpha / 2))
        s_alpha /= 2
    rows = [(k, v, st) for k, t in acc.slices.items() for v, st in t.items()
            if st.scored >= policy.slice_min_samples]
    if not rows:
        return [], 0
    n = np.array([st.scored for _, _, st in rows], dtype=np.float64)
    s = np.array([st.label_flips for _, _, st in rows], dtype=np.float64)
    log_e = log_evalue_above(n, s, margin + shift)
    rejected = ebh(np.exp(np.minimum(log_e, 700)), s_alpha)
    a_disp = s_alpha / len(rows)  # display interval: Bonferroni over the slices shown
    lo, hi = lower_bound(n, s, a_disp) - shift, upper_bound(n, s, a_disp) - shift_low
    out = []
    for i in np.lexsort((-(s / n), -log_e)):
        k, v, st = rows[i]
        dec = "fail" if rejected[i] else ("pass" if hi[i] < margin else "inconclusive")
        noise_est = noise.label_flips / noise.scored if shift else 0.0
        out.append(SliceJudgement(attribute=k, value=v, metric=FLIP, estimate=s[i] / n[i] - noise_est,
                                  lower=float(lo[i]), upper=float(hi[i]), samples=int(n[i]), decision=dec))
    return out, int(rejected.sum())


def judge(cumulative: PairAccumulator, policy: JudgePolicy | None = None, noise: PairAccumulator | None = None,
          expected_requests: int | None = None, unscorable: dict[str, int] | None = None) -> Judgement:
    """Judge the cumulative statistics of one pair (see module doc for the exact semantics).

    ``expected_requests``: requests routed to the candidate (for the sample-ratio check).
    ``unscorable``: requests that could not be compared, by reason ("baseline_mismatch",
    "adapter", ...): the producer's payload or the configuration, never the candidate's fault.
    Over ``max_missing_fraction`` of the traffic they hold the verdict with a data-sufficiency
    reason that names them; they are never counted as candidate errors.
    """
    policy = policy or JudgePolicy()
    acc = cumulative
    a_r, a_p = policy.rollback_alpha(), policy.promote_alpha()
    margins, gating, critical = policy.margins(), set(policy.gating_metrics()), set(policy.critical)
    noise_ok = noise is not None and noise.scored > 0
    nn = (lambda attr: getattr(noise, attr)) if noise_ok else (lambda attr: 0)
    metrics: list[MetricJudgement] = []
    needed: dict[str, int | None] = {}
    if ERROR in margins:
        m, needed[ERROR] = _mean_metric(ERROR, acc.requests, acc.errors, margins[ERROR], a_r, a_p,
                                        critical=ERROR in critical)
        metrics.append(m)
    if FLIP in margins:
        m, needed[FLIP] = _mean_metric(FLIP, acc.scored, acc.label_flips, margins[FLIP], a_r, a_p,
                                       nn("scored"), nn("label_flips"), FLIP in critical)
        metrics.append(m)
    if ABS_DELTA in margins:
        m, needed[ABS_DELTA] = _mean_metric(
            ABS_DELTA, acc.scored, acc.sums["abs_confidence_delta"], margins[ABS_DELTA], a_r, a_p, nn("scored"),
            noise.sums["abs_confidence_delta"] if noise_ok else 0.0, ABS_DELTA in critical)
        metrics.append(m)
    if policy.latency_metric in margins:
        m, needed[policy.latency_metric] = _latency_metric(acc, policy, a_r, a_p, policy.latency_metric in critical)
        metrics.append(m)
    if ACCURACY in margins:
        metrics.append(_accuracy_metric(acc, margins[ACCURACY], a_r, a_p, ACCURACY in critical))
        if acc.labelled < policy.min_labelled:
            gating.discard(ACCURACY)  # labels too few (or absent): reported, not gating yet

    reasons: list[str] = []
    for m in metrics:
        if m.estimate is None:
            reasons.append(f"{m.name}: no data yet ({m.detail}).")
            continue
        hi = "inf" if m.upper is None else f"{m.upper:.4g}"
        word = {"fail": "confidently worse than", "pass": "confidently within",
                "inconclusive": "not yet distinguishable from"}[m.decision]
        role = "critical" if m.critical else ("gating" if m.name in gating else "reported only")
        reasons.append(f"{m.name} = {m.estimate:.4g} [{m.lower:.4g}, {hi}] is {word} margin {m.margin:g} "
                       f"(n={m.samples}, {role}).")

    # data sufficiency and quality
    checks = {"min_samples": acc.scored >= policy.min_samples, "sample_ratio": True, "latency_present": True,
              "comparable": True}
    quality_reasons = []
    lost = sum((unscorable or {}).values())
    if lost and (acc.requests + lost) and lost / (acc.requests + lost) > policy.max_missing_fraction:
        checks["comparable"] = False
        top = max(unscorable, key=unscorable.get)
        quality_reasons.append(
            f"Not comparable: {lost} of {acc.requests + lost} requests ({lost / (acc.requests + lost):.1%}) could "
            f"not be compared ({', '.join(f'{k} {v}' for k, v in sorted(unscorable.items()))}); mostly {top}: the "
            f"producer's payload or this candidate's config, not the candidate. They are on the dead-letter topic "
            f"with their reason (tolerance {policy.max_missing_fraction:.0%}).")
    if not checks["min_samples"]:
        reasons.append(f"Insufficient data: {acc.scored} scored requests of the {policy.min_samples} required.")
    if expected_requests is not None and expected_requests > 0 and checks["comparable"]:
        ratio = (acc.requests + lost) / expected_requests
        if abs(1 - ratio) > policy.max_missing_fraction:
            checks["sample_ratio"] = False
            quality_reasons.append(f"Sample-ratio mismatch: {acc.requests} requests replayed of {expected_requests} "
                                   f"expected ({ratio:.1%}; tolerance ±{policy.max_missing_fraction:.0%}).")
    if policy.latency_metric in margins and acc.requests:
        missing = max(acc.candidate_latency.missing, acc.baseline_latency.missing) / acc.requests
        if missing > policy.max_missing_fraction:
            checks["latency_present"] = False
            quality_reasons.append(f"Missing data: {missing:.1%} of requests lack a latency "
                                   f"(tolerance {policy.max_missing_fraction:.0%}).")
    if acc.error_rate is not None and acc.error_rate > policy.max_error_rate:
        reasons.append(f"Candidate error rate {acc.error_rate:.2%} exceeds {policy.max_error_rate:.2%} "
                       f"({acc.errors} of {acc.requests}; top reason: "
                       f"{max(acc.error_reasons, key=acc.error_reasons.get) if acc.error_reasons else 'n/a'}).")
    if noise is not None and not noise_ok:
        reasons.append("Noise run given but empty: judged without a noise floor.")
    reasons.extend(quality_reasons)
    quality_ok = checks["sample_ratio"] and checks["latency_present"] and checks["comparable"]

    worst, failed_slices = _slices(acc, policy, noise if noise_ok else None)
    worst = worst[: policy.max_worst_slices]
    if failed_slices:
        reasons.append(f"{failed_slices} slice(s) have a flip rate confidently above margin "
                       f"(e-BH, FDR {policy.slice_alpha or policy.alpha / 2:g}); worst: "
                       f"{worst[0].attribute}={worst[0].value} at {worst[0].estimate:.3g}.")

    by_name = {m.name: m for m in metrics}
    failed_critical = [m.name for m in metrics if m.critical and m.decision == "fail"]
    failed_gating = [n for n in gating if by_name[n].decision == "fail"]
    all_pass = bool(gating) and all(by_name[n].decision == "pass" for n in gating)
    requests_needed, blocking = None, None
    if failed_critical:
        verdict = "rollback"
        reasons.insert(0, f"Rollback: critical metric(s) {', '.join(failed_critical)} confidently worse than margin.")
    elif not quality_ok:
        verdict = "hold"
        blocking = next(k for k in ("comparable", "sample_ratio", "latency_present") if not checks[k])
        reasons.insert(0, f"Hold on data quality ({blocking}): {quality_reasons[0]}")
    elif failed_gating:
        verdict = "rollback"
        reasons.insert(0, f"Rollback: {', '.join(sorted(failed_gating))} confidently worse than margin.")
    elif failed_slices and policy.slice_failure_verdict == "rollback":
        verdict = "rollback"
        reasons.insert(0, "Rollback: some slices are confidently worse than margin.")
    elif all_pass and checks["min_samples"] and not failed_slices:
        verdict = "promote"
        reasons.insert(0, "Promote: every gating metric is confidently within its margin.")
    else:
        verdict = "hold"
        blocking, requests_needed, why = _blocking(gating, by_name, needed, failed_slices, checks, acc, policy)
        tail = "" if requests_needed is None else f"; about {requests_needed} more requests may decide it"
        reasons.insert(0, f"Hold: waiting for {why}{tail}.")
    return Judgement(verdict=verdict, reasons=reasons, metrics=metrics, samples=acc.scored,
                     requests_needed=requests_needed, worst_slices=worst,
                     example_request_ids=acc.example_request_ids, data_checks=checks,
                     blocking_metric=blocking, failed_slices=failed_slices)


def _blocking(gating, by_name, needed, failed_slices, checks, acc, policy):
    """(blocking metric, requests_needed, phrase) of a hold.

    A metric heading for failure decides first (the fewest requests among those); otherwise every
    pending gating metric must pass, so the slowest one blocks. Metrics without an estimate of
    the requests they need (a ratio within the sketch's accuracy of its margin) block last.
    """
    pending = [n for n in gating if by_name[n].decision == "inconclusive"]
    heading_bad = [n for n in pending if by_name[n].estimate is not None and by_name[n].estimate > by_name[n].margin
                   and needed.get(n) is not None]
    short = max(policy.min_samples - acc.scored, 0)
    if heading_bad:
        name = min(heading_bad, key=lambda n: needed[n])
        return name, int(needed[name]), _phrase(by_name[name], "to confirm it is worse than")
    if pending:
        unknown = [n for n in pending if needed.get(n) is None]
        name = unknown[0] if unknown else max(pending, key=lambda n: needed[n])
        n_needed = None if unknown else max(int(needed[name]), short)
        return name, n_needed, _phrase(by_name[name], "to settle against")
    if failed_slices:
        return "slices", None, f"{failed_slices} slice(s) confidently above margin (slice_failure_verdict = hold)"
    if not checks["min_samples"]:
        return "min_samples", short, f"min_samples: {acc.scored} scored of {policy.min_samples} required"
    return None, None, "a gating metric (none configured)"


def _phrase(m: MetricJudgement, verb: str) -> str:
    if m.estimate is None:
        return f"{m.name} (no data yet: {m.detail})"
    hi = "inf" if m.upper is None else f"{m.upper:.4g}"
    lo = "0" if m.lower is None else f"{m.lower:.4g}"
    return f"{m.name} = {m.estimate:.4g} [{lo}, {hi}] {verb} margin {m.margin:g} (n={m.samples})"
