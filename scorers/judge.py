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

The bounds are confidence sequences (scorers.sequential) for the *running average* of the
per-request means (valid under drift), simultaneously over all sample sizes, so judging the
cumulative accumulator at every window close keeps these guarantees. They are computed on the
*independent evidence* (scorers.evidence: the first request of each input and sample key), so
repeats and bursts do not count as independent observations; the request-weighted rate is reported.

Verdict rules, in order: any critical metric fails -> rollback (always); data-quality problem
(sample-ratio mismatch, missing latencies, not comparable) -> hold; less than ``min_span_s`` of
event time observed -> hold (no non-critical rollback or promote before a whole traffic cycle);
any gating metric fails -> rollback; flagged slices -> ``slice_failure_verdict`` (hold by default);
a promote given earlier -> it stands (``JudgeMemory``); every gating metric passes, min_samples is
met and every slice over ``slice_min_share`` is under ``slice_promote_factor`` x margin (scorers.slices)
-> promote; otherwise hold, naming the blocking metric and the extra requests it needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Literal

from schemas.events import MetricJudgement, SliceJudgement, Verdict
from scorers.accumulate import PairAccumulator
from scorers.latency import PairedLatency
from scorers.metric_bounds import (  # noqa: F401 - the metric names are imported from here too
    ABS_DELTA, ACCURACY, ERROR, FLIP, accuracy_metric, latency_metric, mean_metric,
)  # fmt: skip
from scorers.slices import judge_slices


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
    slice_min_share: float = 0.02  # slices with this share of the evidence hold a promote until ...
    slice_promote_factor: float = 2.0  # ... their upper bound is below this many times the margin
    min_span_s: float = 0.0  # event time to observe before a promote or a non-critical rollback (drift)

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
class JudgeMemory:
    """What a pair's verdict remembers between looks (kept beside its cumulative evidence).

    ``promoted_at``: evidence requests when the promote was first given. A promote *stands* until
    rollback evidence appears (a critical or gating metric confidently worse, a flagged slice) or a
    data-quality check fails: the confidence sequences were valid when it was given, so more data
    can only add evidence against it, not take the old evidence back. ``flagged_slices``: sticky.
    """

    promoted_at: int | None = None
    flagged_slices: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"promoted_at": self.promoted_at, "flagged_slices": dict(self.flagged_slices)}

    @classmethod
    def from_dict(cls, d: dict | None) -> JudgeMemory:
        d = d or {}
        return cls(d.get("promoted_at"), dict(d.get("flagged_slices", {})))


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
    memory: JudgeMemory = field(default_factory=JudgeMemory)

    def metric(self, name: str) -> MetricJudgement:
        return next(m for m in self.metrics if m.name == name)

    def to_verdict(self, *, model: str, candidate: str, window_start, window_end, updated_at) -> Verdict:
        return Verdict(model=model, candidate=candidate, verdict=self.verdict, reasons=self.reasons,
                       metrics=self.metrics, samples=self.samples, window_start=window_start,
                       window_end=window_end, updated_at=updated_at, requests_needed=self.requests_needed,
                       worst_slices=self.worst_slices, example_request_ids=self.example_request_ids,
                       blocking_metric=self.blocking_metric, failed_slices=self.failed_slices)


def judge(cumulative: PairAccumulator, policy: JudgePolicy | None = None, noise: PairAccumulator | None = None,
          expected_requests: int | None = None, unscorable: dict[str, int] | None = None,
          memory: JudgeMemory | None = None, paired_latency: PairedLatency | None = None) -> Judgement:
    """Judge the cumulative statistics of one pair (see module doc for the exact semantics).

    ``expected_requests``: requests routed to the candidate (for the sample-ratio check).
    ``unscorable``: requests that could not be compared, by reason ("baseline_mismatch",
    "adapter", ...): the producer's payload or the configuration, never the candidate's fault.
    Over ``max_missing_fraction`` of the traffic they hold the verdict with a data-sufficiency
    reason that names them; they are never counted as candidate errors.
    ``memory``: what the previous look left (``Judgement.memory``): a standing promote, sticky
    slice flags. Pass it back at the next look.
    ``paired_latency``: (replayed baseline, candidate) latencies of the same requests
    (``scorers.latency.PairedLatency``); with a noise run it makes the latency metric paired.
    """
    policy = policy or JudgePolicy()
    memory = memory or JudgeMemory()
    acc, ev = cumulative, cumulative.evidence
    a_r, a_p = policy.rollback_alpha(), policy.promote_alpha()
    margins, gating, critical = policy.margins(), set(policy.gating_metrics()), set(policy.critical)
    noise_ok = noise is not None and noise.evidence["scored"] > 0
    nev = (lambda k: noise.evidence[k]) if noise_ok else (lambda k: 0)
    metrics: list[MetricJudgement] = []
    needed: dict[str, int | None] = {}
    if ERROR in margins:
        m, needed[ERROR] = mean_metric(ERROR, ev["requests"], ev["errors"], margins[ERROR], a_r, a_p,
                                        critical=ERROR in critical, weighted=(acc.requests, acc.errors))
        metrics.append(m)
    if FLIP in margins:
        m, needed[FLIP] = mean_metric(FLIP, ev["scored"], ev["label_flips"], margins[FLIP], a_r, a_p,
                                       nev("scored"), nev("label_flips"), FLIP in critical,
                                       weighted=(acc.scored, acc.label_flips))
        metrics.append(m)
    if ABS_DELTA in margins:
        m, needed[ABS_DELTA] = mean_metric(
            ABS_DELTA, ev["scored"], ev["abs_confidence_delta"], margins[ABS_DELTA], a_r, a_p, nev("scored"),
            nev("abs_confidence_delta"), ABS_DELTA in critical,
            weighted=(acc.scored, acc.sums["abs_confidence_delta"]))
        metrics.append(m)
    if policy.latency_metric in margins:
        m, needed[policy.latency_metric] = latency_metric(acc, policy, a_r, a_p, policy.latency_metric in critical,
                                                           noise, paired_latency)
        metrics.append(m)
    if ACCURACY in margins:
        metrics.append(accuracy_metric(acc, margins[ACCURACY], a_r, a_p, ACCURACY in critical))
        if acc.labelled < policy.min_labelled:
            gating.discard(ACCURACY)  # labels too few (or absent): reported, not gating yet

    reasons = [_metric_reason(m, gating) for m in metrics]
    checks, quality_reasons = _data_checks(acc, policy, margins, expected_requests, unscorable, reasons)
    if noise is not None and not noise_ok:
        reasons.append("Noise run given but empty: judged without a noise floor.")
    reasons.extend(quality_reasons)
    quality_ok = checks["sample_ratio"] and checks["latency_present"] and checks["comparable"]

    sl = judge_slices(acc, margin=policy.label_flip_rate_margin,
                      alpha=policy.slice_alpha if policy.slice_alpha is not None else policy.alpha / 2,
                      promote_alpha=a_p, min_samples=policy.slice_min_samples, min_share=policy.slice_min_share,
                      promote_factor=policy.slice_promote_factor,
                      noise=noise if noise_ok else None, flagged_before=memory.flagged_slices)
    worst = sl.judgements[: policy.max_worst_slices]
    failed_slices = sl.failed
    if failed_slices:
        w = next(j for j in sl.judgements if j.decision == "fail")
        reasons.append(f"{failed_slices} slice(s) have had a flip rate confidently above margin (e-BH, FDR "
                       f"{policy.slice_alpha or policy.alpha / 2:g}; a flag is never withdrawn); worst: "
                       f"{w.attribute}={w.value} at {w.estimate:.3g}.")

    by_name = {m.name: m for m in metrics}
    failed_critical = [m.name for m in metrics if m.critical and m.decision == "fail"]
    failed_gating = [n for n in gating if by_name[n].decision == "fail"]
    all_pass = bool(gating) and all(by_name[n].decision == "pass" for n in gating)
    checks["min_span"] = acc.span_s >= policy.min_span_s
    new_memory = JudgeMemory(memory.promoted_at, sl.flagged)
    requests_needed, blocking = None, None
    standing = memory.promoted_at is not None
    if failed_critical:
        verdict = "rollback"
        reasons.insert(0, f"Rollback: critical metric(s) {', '.join(failed_critical)} confidently worse than margin.")
    elif not quality_ok:
        verdict = "hold"
        blocking = next(k for k in ("comparable", "sample_ratio", "latency_present") if not checks[k])
        reasons.insert(0, f"Hold on data quality ({blocking}): {quality_reasons[0]}")
    elif not checks["min_span"] and not standing:
        verdict, blocking = "hold", "min_span"
        reasons.insert(0, f"Hold: waiting for the minimum observation span: {acc.span_s / 3600:.3g} h of event time "
                          f"observed of the {policy.min_span_s / 3600:.3g} h required before a promote or a "
                          f"rollback on gating metrics (min_span_s: one traffic cycle, so drift is averaged).")
    elif failed_gating:
        verdict = "rollback"
        reasons.insert(0, f"Rollback: {', '.join(sorted(failed_gating))} confidently worse than margin.")
    elif failed_slices and policy.slice_failure_verdict == "rollback":
        verdict = "rollback"
        reasons.insert(0, "Rollback: some slices are confidently worse than margin.")
    elif failed_slices:
        verdict, blocking = "hold", "slices"
        reasons.insert(0, f"Hold: {failed_slices} slice(s) confidently above margin (slice_failure_verdict = hold).")
    elif standing:
        verdict = "promote"
        reasons.insert(0, f"Promote stands: given at {memory.promoted_at} independent requests; no rollback "
                          f"evidence since (a promote is withdrawn only by a failing metric or slice).")
    elif all_pass and checks["min_samples"] and sl.blocking is None:
        verdict = "promote"
        new_memory.promoted_at = int(ev["scored"])
        reasons.insert(0, "Promote: every gating metric is confidently within its margin, and every slice "
                          f"over {policy.slice_min_share:.0%} of the traffic too.")
    else:
        verdict = "hold"
        blocking, requests_needed, why = _blocking(gating, by_name, needed, sl, checks, acc, policy)
        tail = "" if requests_needed is None else f"; about {requests_needed} more requests may decide it"
        reasons.insert(0, f"Hold: waiting for {why}{tail}.")
    if verdict != "promote":
        new_memory.promoted_at = None
    return Judgement(verdict=verdict, reasons=reasons, metrics=metrics, samples=acc.scored,
                     requests_needed=requests_needed, worst_slices=worst,
                     example_request_ids=acc.example_request_ids, data_checks=checks,
                     blocking_metric=blocking, failed_slices=failed_slices, memory=new_memory)


def _metric_reason(m: MetricJudgement, gating) -> str:
    if m.estimate is None:
        return f"{m.name}: no data yet ({m.detail})."
    hi = "inf" if m.upper is None else f"{m.upper:.4g}"
    word = {"fail": "confidently worse than", "pass": "confidently within",
            "inconclusive": "not yet distinguishable from"}[m.decision]
    role = "critical" if m.critical else ("gating" if m.name in gating else "reported only")
    return (f"{m.name} = {m.estimate:.4g} [{m.lower:.4g}, {hi}] is {word} margin {m.margin:g} "
            f"(n={m.samples}, {role}).")


def _data_checks(acc, policy, margins, expected_requests, unscorable, reasons):
    """Data sufficiency and quality: (checks, quality reasons); appends sufficiency notes to reasons."""
    checks = {"min_samples": acc.evidence["scored"] >= policy.min_samples, "sample_ratio": True,
              "latency_present": True, "comparable": True}
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
        reasons.append(f"Insufficient data: {int(acc.evidence['scored'])} independent scored requests of the "
                       f"{policy.min_samples} required.")
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
    return checks, quality_reasons


def _blocking(gating, by_name, needed, sl, checks, acc, policy):
    """(blocking metric, requests_needed, phrase) of a hold.

    A metric heading for failure decides first (the fewest requests among those); otherwise every
    pending gating metric must pass, so the slowest one blocks. Metrics without an estimate of
    the requests they need (a ratio within the sketch's accuracy of its margin) block last. Then a
    big slice not yet shown within its margin, then min_samples.
    """
    pending = [n for n in gating if by_name[n].decision == "inconclusive"]
    heading_bad = [n for n in pending if by_name[n].estimate is not None and by_name[n].estimate > by_name[n].margin
                   and needed.get(n) is not None]
    short = max(policy.min_samples - int(acc.evidence["scored"]), 0)
    if heading_bad:
        name = min(heading_bad, key=lambda n: needed[n])
        return name, int(needed[name]), _phrase(by_name[name], "to confirm it is worse than")
    if pending:
        unknown = [n for n in pending if needed.get(n) is None]
        name = unknown[0] if unknown else max(pending, key=lambda n: needed[n])
        n_needed = None if unknown else max(int(needed[name]), short)
        return name, n_needed, _phrase(by_name[name], "to settle against")
    if sl.blocking is not None:
        b = sl.blocking
        return "slices", sl.requests_needed, (
            f"slice {b.attribute}={b.value} ({b.samples} independent requests, flip rate {b.estimate:.3g}, upper "
            f"bound {b.upper:.3g}) to show it is below {policy.slice_promote_factor:g} x margin "
            f"{policy.label_flip_rate_margin:g}: slices over {policy.slice_min_share:.0%} of the traffic must, "
            f"before a promote")
    if not checks["min_samples"]:
        return "min_samples", short, (f"min_samples: {int(acc.evidence['scored'])} independent scored of "
                                      f"{policy.min_samples} required")
    return None, None, "a gating metric (none configured)"


def _phrase(m: MetricJudgement, verb: str) -> str:
    if m.estimate is None:
        return f"{m.name} (no data yet: {m.detail})"
    hi = "inf" if m.upper is None else f"{m.upper:.4g}"
    lo = "0" if m.lower is None else f"{m.lower:.4g}"
    return f"{m.name} = {m.estimate:.4g} [{lo}, {hi}] {verb} margin {m.margin:g} (n={m.samples})"
