"""The judge on realistic traffic, through the real path (cluster keys -> ClusterTracker ->
PairAccumulator -> judge(), the calls streams.judge.core.JudgeCore makes).

A quick version of ``bench/calibration.py`` (fixed seeds, few runs; the full table, 500 runs per
scenario, is in the README). Each run: 10,000 requests judged every 250 (slices: 14,000). Tolerances:
the issue's targets plus three binomial standard deviations of the smaller sample here. Each scenario
failed before this design (issue #21: the popular-input regression promoted in 20 of 20 runs, 100
users took the power of a +2 point regression to 0 of 12, a constant key silenced the judge; issue #10:
repeats at the margin rolled back 41 %, drift 32 %, the bad slice promoted before flagged 317 of 320).
"""

import dataclasses

import numpy as np
import pytest

from scorers.accumulate import PairAccumulator
from scorers.calibration import _diffs, calibrate
from scorers.clusters import request_keys, tracker_for
from scorers.judge import JudgeMemory, JudgePolicy, judge


def _tol(p: float, runs: int) -> float:
    return p + 3 * np.sqrt(p * (1 - p) / runs)


@pytest.mark.parametrize("scenario", ["repeats_margin", "zipf_margin", "users_het_margin", "nondet_margin"])
def test_at_the_margin_neither_rolled_back_nor_promoted(scenario):
    r = calibrate(scenario, runs=12, seed=11)
    assert r.ever("rollback") <= _tol(0.025, r.runs)
    assert r.ever("promote") <= _tol(0.025, r.runs)


@pytest.mark.parametrize("scenario", ["drift", "drift_5000"])
def test_diurnal_drift_with_the_minimum_span_set_to_the_cycle(scenario):
    r = calibrate(scenario, runs=16, seed=13)
    assert r.ever("rollback") <= _tol(0.025, r.runs)
    assert r.ever("promote") <= _tol(0.025, r.runs)


def test_a_regression_on_the_most_popular_input_is_rolled_back():
    r = calibrate("zipf_popular", runs=16, seed=17)
    assert r.first_within("rollback", 10_000) >= 0.9 and r.ever("promote") == 0.0


@pytest.mark.parametrize("scenario", ["users_power", "nondet_power", "constant_key_power"])
def test_two_points_over_the_margin_with_users_repeats_or_one_key_is_rolled_back_within_5000(scenario):
    r = calibrate(scenario, runs=12, seed=19)
    assert r.first_within("rollback", 5_000) >= 0.9


def test_bursts_of_repeats_at_half_the_margin_are_not_rolled_back():
    r = calibrate("repeats_half", runs=12, seed=12)
    assert r.ever("rollback") <= _tol(0.025, r.runs)
    assert r.flip_back() == 0.0  # a promote stands


def test_a_bad_slice_is_flagged_before_any_promote():
    r = calibrate("bad_slice", runs=10, seed=14)
    assert r.promoted_before_flagged() <= 0.05
    assert (r.flagged_at >= 0).mean() >= 0.8  # by 14,000 requests


def test_heavy_tailed_latency_two_times_slower_is_rolled_back_and_aa_is_promoted():
    slow = calibrate("latency_2x", runs=8, seed=15)
    assert slow.first_within("rollback", 10_000) >= 0.9
    same = calibrate("latency_aa", runs=8, seed=16)
    assert same.first_within("promote", 10_000) >= 0.9 and same.ever("rollback") == 0.0


def test_two_times_slower_under_per_execution_spikes_is_rolled_back_by_the_median():
    """x20 spikes drawn per execution: the p99's ratio alone rolled this back within 10,000 requests in
    13 % of 500 runs (README, no test of it can reach 90 % at its level); the median's ratio does."""
    slow = calibrate("latency_2x_exec", runs=12, seed=18)
    assert slow.first_within("rollback", 10_000) >= 0.9 and slow.ever("promote") == 0.0


def test_a_key_shared_by_most_traffic_is_named_in_the_verdict():
    """A producer that set one sample_key for everything: the verdict is still decided (the traffic is cut
    into cap-sized clusters) and says how many clusters it rests on and that one key carries it all."""
    policy = JudgePolicy()
    acc = PairAccumulator()
    rng = np.random.default_rng(3)
    n = 3000
    tr = tracker_for(policy)
    flips = rng.random(n) < 0.04
    sent = np.arange(n) * 1000
    acc.update(_diffs(flips, np.zeros(n)), baseline_latency_ms=np.ones(n), candidate_latency_ms=np.ones(n),
               request_ids=[str(i) for i in range(n)], sent_ms=sent, clustered=True)
    keys = request_keys(np.arange(1, n + 1, dtype=np.uint64), np.full(n, 42, dtype=np.uint64))
    acc.add_clusters(tr.update(keys, sent, ok=np.ones(n, bool), flips=flips, abs_delta=np.zeros(n)))
    acc.add_clusters(tr.close_idle(int(sent[-1]) + 61_000))
    m = judge(acc, policy).metric("label_flip_rate")
    assert "in 94 independent clusters" in m.detail and "one key carries >= 100%" in m.detail



def _acc(flip_rate: float, n: int, seed: int, start_ms: int = 0, segments: bool = False) -> PairAccumulator:
    rng = np.random.default_rng(seed)
    acc = PairAccumulator()
    attrs = [{"segment": f"s{i % 4}"} for i in range(n)] if segments else None
    acc.update(_diffs(rng.random(n) < flip_rate, np.full(n, 0.001)), baseline_latency_ms=np.ones(n),
               candidate_latency_ms=np.ones(n), request_ids=[str(i) for i in range(n)], attributes=attrs,
               sent_ms=start_ms + np.arange(n) * 1000)
    return acc


def test_minimum_span_holds_until_a_cycle_is_seen():
    """With min_span_s = one cycle: no verdict before a cycle is seen, and a promote only once every
    look over a whole cycle has passed (the running average at a whole number of cycles is the
    cycle's mean; between them it may dip under it)."""
    policy = dataclasses.replace(JudgePolicy(), min_span_s=86_400)
    acc = _acc(0.0, 3000, 1)  # 3,000 s of traffic
    j = judge(acc, policy)
    assert j.verdict == "hold" and j.blocking_metric == "min_span" and "minimum observation span" in j.reasons[0]
    assert j.memory.passing_since_ms == 2_999_000
    acc.merge(_acc(0.0, 10, 2, start_ms=86_400_000))
    j = judge(acc, policy, memory=j.memory)  # a cycle observed, but passing only for 83,410 s of it
    assert j.verdict == "hold" and j.blocking_metric == "min_span" and "every look" in j.reasons[0]
    acc.merge(_acc(0.0, 10, 3, start_ms=90_000_000))
    j = judge(acc, policy, memory=j.memory)
    assert j.verdict == "promote"
    worse = _acc(0.0, 3000, 1)
    worse.merge(_acc(0.3, 3000, 4, start_ms=86_400_000))
    j = judge(worse, policy, memory=JudgeMemory(passing_since_ms=0))  # a failing look ends the streak
    assert j.memory.passing_since_ms is None and j.memory.failing_since_ms is not None and j.verdict == "hold"


def test_a_promote_stands_until_rollback_evidence_and_slice_flags_are_sticky():
    policy = JudgePolicy()
    good = _acc(0.0, 3000, 3, segments=True)
    first = judge(good, policy)
    assert first.verdict == "promote" and first.memory.promoted_at == 3000
    # The same evidence with a standing promote keeps it; a failing metric withdraws it.
    assert judge(good, policy, memory=first.memory).verdict == "promote"
    worse = good.copy()
    worse.merge(_acc(0.2, 3000, 4, segments=True))
    j = judge(worse, policy, memory=first.memory)
    assert j.verdict == "rollback" and j.memory.promoted_at is None
    # A flagged slice stays flagged when its e-value later falls back.
    flagged = JudgeMemory(flagged_slices={"segment=s1": 9.0})
    j = judge(good, policy, memory=flagged)
    assert j.failed_slices == 1 and j.verdict == "hold" and j.blocking_metric == "slices"
    assert next(s for s in j.worst_slices if s.value == "s1").decision == "fail"


def test_a_big_slice_not_yet_shown_holds_the_promote():
    rng = np.random.default_rng(5)
    n = 2000
    seg = np.where(rng.random(n) < 0.05, "bad", "ok")
    flips = rng.random(n) < np.where(seg == "bad", 0.06, 0.002)
    acc = PairAccumulator()
    acc.update(_diffs(flips, np.full(n, 0.001)), baseline_latency_ms=np.ones(n), candidate_latency_ms=np.ones(n),
               request_ids=[str(i) for i in range(n)], attributes=[{"segment": s} for s in seg])
    j = judge(acc, JudgePolicy())
    assert j.metric("label_flip_rate").decision == "pass"  # overall fine ...
    assert j.verdict == "hold" and j.blocking_metric == "slices" and "segment=bad" in j.reasons[0]


def test_requests_needed_counts_the_noise_runs_uncertainty():
    policy = JudgePolicy(label_flip_rate_margin=0.02)
    cand, small_noise, big_noise = _acc(0.03, 1000, 6), _acc(0.02, 300, 7), _acc(0.02, 30_000, 8)
    a = judge(cand, policy, noise=small_noise).metric("label_flip_rate")
    b = judge(cand, policy, noise=big_noise).metric("label_flip_rate")
    assert a.decision == b.decision == "inconclusive"
    na = judge(cand, policy, noise=small_noise).requests_needed
    nb = judge(cand, policy, noise=big_noise).requests_needed
    assert nb is not None and (na is None or na > nb)
