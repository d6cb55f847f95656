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

The bounds of the rates (errors, label flips, |confidence delta|) are confidence sequences
(scorers.ratio_cs) for the *running request-weighted* rate over independent clusters (scorers.clusters:
the sessions of one sample key, or the repeats of one input, within ``cluster_gap_s``), valid under any
dependence inside a cluster and under drift, simultaneously over all sample sizes, so judging the
cumulative accumulator at every window close keeps these guarantees. Each metric's detail says how many
requests and independent clusters it rests on. With ``min_span_s`` (one traffic cycle), a promote needs
the pass, and a non-critical rollback the failure, at every look over the last ``min_span_s``: the
running average equals the cycle's mean only at whole cycles (``JudgeMemory``).

Latency (two metrics, ``scorers.latency_metrics``: the tail quantile's ratio and the median's) is
judged against the baseline *replayed on the candidate's hardware* (a ``noise_reference`` candidate,
``paired_latency``): then it gates like any metric. Without one, the only baseline latency
is what production recorded, on another machine and another path (a loaded replay box against an
idle production host is a "regression" of 10x): the metrics are still computed and reported, marked
informational, but they neither roll back nor hold a promote (nor hold on missing latencies) unless
``latency_gates_without_reference``. Their shares of the rollback level stay reserved either way.

Verdict rules, in order: any critical metric fails -> rollback (always); data-quality problem
(sample-ratio mismatch, missing latencies, not comparable) -> hold; less than ``min_span_s`` of
event time observed -> hold (no non-critical rollback or promote before a whole traffic cycle);
any gating metric fails -> rollback; flagged slices -> ``slice_failure_verdict`` (hold by default);
a promote given earlier -> it stands (``JudgeMemory``); every gating metric passes, min_samples is
met and every slice over ``slice_min_share`` is under ``slice_promote_factor`` x margin (scorers.slices)
-> promote; otherwise hold, naming the blocking metric and the extra requests it needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from schemas.events import MetricJudgement, SliceJudgement, Verdict
from scorers.accumulate import PairAccumulator
from scorers.latency import PairedLatency
from scorers.latency_metrics import latency_judgements, missing_latency_reason
from scorers.metric_bounds import (  # noqa: F401 - the metric names are imported from here too
    ABS_DELTA, ACCURACY, ERROR, FLIP, RateSpec, accuracy_metric, describe_clusters, mean_metric, rate_metric,
    rate_metrics,
)  # fmt: skip
from scorers.policy import (  # noqa: F401 - the policy is imported from here too
    LATENCY_MEDIAN, JudgePolicy, policy_defaults, policy_defaults_table, toml_value,
)  # fmt: skip
from scorers.slices import judge_slices


@dataclass
class JudgeMemory:
    """What a pair's verdict remembers between looks (kept beside its cumulative evidence).

    ``promoted_at``: scored requests judged when the promote was first given. A promote *stands* until
    rollback evidence appears (a critical or gating metric confidently worse, a flagged slice) or a
    data-quality check fails: the confidence sequences were valid when it was given, so more data
    can only add evidence against it, not take the old evidence back. ``flagged_slices``: sticky.
    ``last_verdict``: the decision of the previous look, so a transition into rollback is told once
    (``Judgement.rollback_started``), not at every look, also across a judge restart.
    ``passing_since_ms``: event time (the latest ``sent_at``) of the first look of the current run of
    looks at which every gating metric and every big slice passed; with ``min_span_s`` set, a promote
    needs that run to cover one whole ``min_span_s`` (see ``judge``: drift). ``failing_since_ms``: the
    same for looks at which a gating metric failed, for a non-critical rollback.
    """

    promoted_at: int | None = None
    flagged_slices: dict[str, float] = field(default_factory=dict)
    last_verdict: str | None = None
    passing_since_ms: int | None = None
    failing_since_ms: int | None = None

    def to_dict(self) -> dict:
        return {"promoted_at": self.promoted_at, "flagged_slices": dict(self.flagged_slices),
                "last_verdict": self.last_verdict, "passing_since_ms": self.passing_since_ms,
                "failing_since_ms": self.failing_since_ms}

    @classmethod
    def from_dict(cls, d: dict | None) -> JudgeMemory:
        d = d or {}
        return cls(d.get("promoted_at"), dict(d.get("flagged_slices", {})), d.get("last_verdict"),
                   d.get("passing_since_ms"), d.get("failing_since_ms"))


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
    rollback_started: bool = False  # a rollback now, and the previous look was not one

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
    (``scorers.latency.PairedLatency``); with a noise run it makes the latency metric paired. Without
    it the latency is compared with production's recorded latency (another machine and path): that
    metric is reported but gates nothing unless ``policy.latency_gates_without_reference``.
    """
    policy = policy or JudgePolicy()
    memory = memory or JudgeMemory()
    acc, cl = cumulative, cumulative.clusters
    a_r, a_p = policy.rollback_alpha(), policy.promote_alpha()
    margins, gating, critical = policy.margins(), set(policy.gating_metrics()), set(policy.critical)
    noise_ok = noise is not None and noise.clusters.flips.requests > 0
    ncl = noise.clusters if noise_ok else None
    metrics: list[MetricJudgement] = []
    needed: dict[str, int | None] = {}
    # Request-weighted rates over closed clusters (scorers.clusters, scorers.ratio_cs); the requests of
    # clusters still open (their session may go on) are counted once it ends.
    about = describe_clusters(cl.flips, cl, max(int(acc.scored - cl.flips.requests), 0), "scored requests")
    specs = []
    if ERROR in margins:
        specs.append(RateSpec(ERROR, cl.errors, margins[ERROR], None, ERROR in critical,
                              describe_clusters(cl.errors, None, max(int(acc.requests - cl.errors.requests), 0))))
    if FLIP in margins:
        specs.append(RateSpec(FLIP, cl.flips, margins[FLIP], ncl.flips if ncl else None, FLIP in critical, about))
    if ABS_DELTA in margins:
        specs.append(RateSpec(ABS_DELTA, cl.abs_delta, margins[ABS_DELTA], ncl.abs_delta if ncl else None,
                              ABS_DELTA in critical, about))
    for m, need in rate_metrics(specs, a_r, a_p):
        needed[m.name] = need
        metrics.append(m)
    # Latency (scorers.latency_metrics): the tail quantile's ratio and the median's; informational
    # (out of gating and critical) without a replayed baseline on the candidate's hardware.
    lat_metrics, lat_needed, informational = latency_judgements(acc, policy, a_r, a_p, gating, critical, noise,
                                                                paired_latency)
    metrics.extend(lat_metrics)
    needed.update(lat_needed)
    if ACCURACY in margins:
        metrics.append(accuracy_metric(acc, margins[ACCURACY], a_r, a_p, ACCURACY in critical))
        if acc.labelled < policy.min_labelled:
            gating.discard(ACCURACY)  # labels too few (or absent): reported, not gating yet

    reasons = [_metric_reason(m, gating, informational) for m in metrics]
    lat_decides = any(m.name in gating or m.name in critical for m in lat_metrics)
    checks, quality_reasons = _data_checks(acc, policy, margins, expected_requests, unscorable, reasons,
                                           lat_decides, noise if paired_latency is not None else None)
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
    # Drift: the bounds are for the running average since the first request. Between whole traffic
    # cycles it can dip under (or rise over) the cycle's mean; at a whole number of cycles it equals
    # it. Every stretch of one cycle holds such a point, so with min_span_s set a promote needs the pass,
    # and a non-critical rollback the failure, at *every* look over the last min_span_s (one cycle),
    # whatever the cycle's phase and its length relative to the traffic.
    passing = all_pass and sl.blocking is None
    now_ms = acc.last_sent_ms

    def streak(on: bool, since: int | None) -> tuple[int | None, float]:
        if not on or now_ms is None:
            return None, 0.0
        since = now_ms if since is None else since
        return since, (now_ms - since) / 1000

    new_memory.passing_since_ms, passed_for_s = streak(passing, memory.passing_since_ms)
    new_memory.failing_since_ms, failed_for_s = streak(bool(failed_gating), memory.failing_since_ms)
    cycle_ok = policy.min_span_s <= 0 or passed_for_s >= policy.min_span_s
    fail_cycle_ok = policy.min_span_s <= 0 or failed_for_s >= policy.min_span_s
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
    elif failed_gating and not fail_cycle_ok:
        verdict, blocking = "hold", "min_span"
        reasons.insert(0, f"Hold: {', '.join(sorted(failed_gating))} confidently worse than margin for "
                          f"{failed_for_s / 3600:.3g} h of event time; a rollback on gating metrics needs that at every "
                          f"look over one whole min_span_s ({policy.min_span_s / 3600:.3g} h, a traffic cycle), so "
                          f"that a running average between two whole cycles, above the cycle's mean, cannot roll back "
                          f"(critical metrics roll back at once).")
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
        reasons.insert(0, f"Promote stands: given at {memory.promoted_at} scored requests; no rollback "
                          f"evidence since (a promote is withdrawn only by a failing metric or slice).")
    elif passing and checks["min_samples"] and not cycle_ok:
        verdict, blocking = "hold", "min_span"
        reasons.insert(0, f"Hold: every gating metric has been confidently within its margin for {passed_for_s / 3600:.3g} "
                          f"h of event time; a promote needs that at every look over one whole min_span_s "
                          f"({policy.min_span_s / 3600:.3g} h, a traffic cycle), so that a running average between "
                          f"two whole cycles, below the cycle's mean, cannot promote.")
    elif passing and checks["min_samples"]:
        verdict = "promote"
        new_memory.promoted_at = int(cl.flips.requests)
        reasons.insert(0, "Promote: every gating metric is confidently within its margin, and every slice "
                          f"over {policy.slice_min_share:.0%} of the traffic too.")
    else:
        verdict = "hold"
        blocking, requests_needed, why = _blocking(gating, by_name, needed, sl, checks, acc, policy)
        tail = "" if requests_needed is None else f"; about {requests_needed} more requests may decide it"
        reasons.insert(0, f"Hold: waiting for {why}{tail}.")
    if verdict != "promote":
        new_memory.promoted_at = None
    new_memory.last_verdict = verdict
    return Judgement(verdict=verdict, reasons=reasons, metrics=metrics, samples=acc.scored,
                     requests_needed=requests_needed, worst_slices=worst,
                     example_request_ids=acc.example_request_ids, data_checks=checks,
                     blocking_metric=blocking, failed_slices=failed_slices, memory=new_memory,
                     rollback_started=verdict == "rollback" and memory.last_verdict != "rollback")


def _metric_reason(m: MetricJudgement, gating, informational=frozenset()) -> str:
    if m.estimate is None:
        return f"{m.name}: no data yet ({m.detail})."
    hi = "inf" if m.upper is None else f"{m.upper:.4g}"
    word = {"fail": "confidently worse than", "pass": "confidently within",
            "inconclusive": "not yet distinguishable from"}[m.decision]
    role = "critical" if m.critical else ("gating" if m.name in gating else "reported only")
    if m.name in informational:
        role = ("informational: compared with production's recorded latency, not gating without a replayed "
                "baseline")
    return (f"{m.name} = {m.estimate:.4g} [{m.lower:.4g}, {hi}] is {word} margin {m.margin:g} "
            f"(n={m.samples}{_rests_on(m)}, {role}).")


def _data_checks(acc, policy, margins, expected_requests, unscorable, reasons, lat_decides=True, reference=None):
    """Data sufficiency and quality: (checks, quality reasons); appends sufficiency notes to reasons.

    Missing latencies hold the verdict only while a latency metric can decide it (``lat_decides``), and
    only the latencies they are judged on (``scorers.latency_metrics.missing_latency_reason``)."""
    judged = int(acc.clusters.flips.requests)
    checks = {"min_samples": judged >= policy.min_samples, "sample_ratio": True,
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
        reasons.append(f"Insufficient data: {judged} scored requests in closed clusters of the "
                       f"{policy.min_samples} required.")
    if expected_requests is not None and expected_requests > 0 and checks["comparable"]:
        ratio = (acc.requests + lost) / expected_requests
        if abs(1 - ratio) > policy.max_missing_fraction:
            checks["sample_ratio"] = False
            quality_reasons.append(f"Sample-ratio mismatch: {acc.requests} requests replayed of {expected_requests} "
                                   f"expected ({ratio:.1%}; tolerance ±{policy.max_missing_fraction:.0%}).")
    missing_latency = missing_latency_reason(acc, policy, reference) if lat_decides else None
    if missing_latency:
        checks["latency_present"] = False
        quality_reasons.append(missing_latency)
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
    short = max(policy.min_samples - int(acc.clusters.flips.requests), 0)
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
            f"slice {b.attribute}={b.value} ({b.samples} scored requests, flip rate {b.estimate:.3g}, upper "
            f"bound {b.upper:.3g}) to show it is below {policy.slice_promote_factor:g} x margin "
            f"{policy.label_flip_rate_margin:g}: slices over {policy.slice_min_share:.0%} of the traffic must, "
            f"before a promote")
    if not checks["min_samples"]:
        return "min_samples", short, (f"min_samples: {int(acc.clusters.flips.requests)} scored requests judged of "
                                      f"{policy.min_samples} required")
    return None, None, "a gating metric (none configured)"


def _phrase(m: MetricJudgement, verb: str) -> str:
    if m.estimate is None:
        return f"{m.name} (no data yet: {m.detail})"
    hi = "inf" if m.upper is None else f"{m.upper:.4g}"
    lo = "0" if m.lower is None else f"{m.lower:.4g}"
    return f"{m.name} = {m.estimate:.4g} [{lo}, {hi}] {verb} margin {m.margin:g} (n={m.samples}{_rests_on(m)})"


def _rests_on(m: MetricJudgement) -> str:
    """", in C independent clusters" (and the busiest key's share) from a rate metric's detail."""
    found = re.search(r" in (\d+) independent clusters", m.detail or "")
    if not found or int(found.group(1)) == m.samples:
        return ""
    key = re.search(r"one key carries >= (\d+%)", m.detail)
    return f" in {found.group(1)} independent clusters" + (f", one key carries {key.group(1)} of them" if key else "")
