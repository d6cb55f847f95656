"""The judge's latency metrics: the tail quantile's ratio (``latency_p99_ratio``, at
``policy.latency_quantile``) and the median's (``latency_p50_ratio``), each candidate / baseline at its
quantile and judged by the same constructions (``scorers.latency``: the exceedance test, the paired
sign test and the unpaired order-statistic bounds, intersected).

Why two. Under per-execution noise (GC pauses, queueing: spikes drawn independently in the baseline's
and the candidate's run) the p99 sits where the density is low, and no test of the p99 ratio at the
judge's rollback level rolls a 2x slower candidate back within 10,000 requests in 90 % of runs (README,
``bench/latency_power_bound.py``). A candidate slower over its whole distribution is slower at the
median too, where the density is high: the median's ratio decides it within a few hundred requests.
A candidate slower *only in its tail* (longer spikes, the same body) is left to the tail's metric.

Each metric takes its own share of the rollback level (``JudgePolicy.rollback_alpha``: Bonferroni over
the rollback-capable metrics) and follows the same rules: gating with a replayed baseline (a noise
run and ``PairedLatency``); without one, compared with production's recorded latency (other hardware
and path) and informational unless ``latency_gates_without_reference``, its share of the level still
reserved; missing latencies hold the verdict only while some latency metric can decide it.
"""

from __future__ import annotations

from schemas.events import MetricJudgement
from scorers.accumulate import PairAccumulator
from scorers.latency import PairedLatency, latency_ratio_metric
from scorers.sketch import LatencySketch

INFORMATIONAL = ("informational, not gating: compared with production's recorded latency (other hardware and "
                 "path); replay the baseline as a noise_reference candidate to judge it on the same hardware, or "
                 "set latency_gates_without_reference = true; ")


def latency_metric(acc: PairAccumulator, name: str, q: float, margin: float, a_r: float, a_p: float,
                   critical: bool, noise: PairAccumulator | None,
                   paired: PairedLatency | None) -> tuple[MetricJudgement, int | None]:
    """Candidate / baseline latency ratio at quantile ``q`` (scorers.latency). With a replayed baseline
    (noise run) and the paired state of the same requests, the comparison is on the same hardware and
    paired; production's reported latency is then informational (in the detail)."""
    kw = dict(name=name, margin=margin, q=q, alpha_rollback=a_r, alpha_promote=a_p, critical=critical)
    if paired is not None:  # fixed for the whole run by configuration, never switched by the data
        reference = noise.candidate_latency if noise is not None else LatencySketch()
        m, needed = latency_ratio_metric(acc.candidate_latency, reference,
                                         baseline_label="replayed baseline", paired_log_ratios=paired, **kw)
        b, c = acc.baseline_latency, acc.candidate_latency
        if b.count and c.count and b.quantile(q):
            m.detail += (f"; production p{q * 100:g} {b.quantile(q):.4g} ms, candidate / production "
                         f"{c.quantile(q) / b.quantile(q):.3g} (informational: other hardware and path)")
        return m, needed
    return latency_ratio_metric(acc.candidate_latency, acc.baseline_latency, baseline_label="production", **kw)


def latency_judgements(acc: PairAccumulator, policy, a_r: float, a_p: float, gating: set[str], critical: set[str],
                       noise: PairAccumulator | None, paired: PairedLatency | None
                       ) -> tuple[list[MetricJudgement], dict[str, int | None], set[str]]:
    """Every configured latency metric: (judgements, requests needed by name, informational names).

    Without a replayed baseline (``paired`` None) and unless ``latency_gates_without_reference``, the
    latency metrics are informational: taken out of ``gating`` and ``critical`` (in place). Their share
    of the rollback level stays in the Bonferroni split (fixed by configuration, never by what a run
    happens to have)."""
    informational = set()
    metrics, needed = [], {}
    for name, (q, margin) in policy.latency_metrics().items():
        if paired is None and not policy.latency_gates_without_reference:
            informational.add(name)
            gating.discard(name)
            critical.discard(name)
        m, needed[name] = latency_metric(acc, name, q, margin, a_r, a_p, name in critical, noise, paired)
        if name in informational:
            m.detail = INFORMATIONAL + m.detail
        metrics.append(m)
    return metrics, needed, informational


def missing_latency_reason(acc: PairAccumulator, policy, reference: PairAccumulator | None) -> str | None:
    """A data-quality reason when more than ``max_missing_fraction`` of the requests lack a latency the
    latency metrics are judged on: the candidate's and the replayed baseline's (``reference``) when
    there is one, else the candidate's and production's. The caller asks only while a latency metric
    can decide the verdict."""
    if not policy.latency_metrics() or not acc.requests:
        return None
    missing = acc.candidate_latency.missing / acc.requests
    if reference is not None:
        missing = max(missing, reference.candidate_latency.missing / max(reference.requests, 1))
    else:
        missing = max(missing, acc.baseline_latency.missing / acc.requests)
    if missing <= policy.max_missing_fraction:
        return None
    return f"Missing data: {missing:.1%} of requests lack a latency (tolerance {policy.max_missing_fraction:.0%})."
