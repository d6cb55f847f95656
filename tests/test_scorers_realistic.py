"""The judge on realistic traffic, through the real path (SeenFilter -> PairAccumulator -> judge()).

A quick version of ``bench/calibration.py`` (fixed seeds; the full table, 500 runs per scenario, is in
the README). Each run: 10,000 requests judged every 250. Tolerances: the issue's targets plus three
binomial standard deviations of the smaller sample here; each scenario failed before this design
(repeats at the margin: 41 % rollback / 56 % promote; drift: 32 % / 54 %; the bad slice promoted
before flagged in 317 of 320 runs; latency 2x rolled back in 1 %).
"""

import dataclasses

import numpy as np
import pytest

from scorers.accumulate import PairAccumulator
from scorers.calibration import _diffs, calibrate
from scorers.evidence import SeenFilter
from scorers.judge import JudgeMemory, JudgePolicy, judge


def _tol(p: float, runs: int) -> float:
    return p + 3 * np.sqrt(p * (1 - p) / runs)


def test_bursts_of_repeats_at_the_margin_are_neither_rolled_back_nor_promoted():
    r = calibrate("repeats_margin", runs=100, seed=11)
    assert r.ever("rollback") <= _tol(0.025, r.runs)
    assert r.ever("promote") <= _tol(0.025, r.runs)


def test_bursts_of_repeats_at_half_the_margin_are_not_rolled_back():
    r = calibrate("repeats_half", runs=100, seed=12)
    assert r.ever("rollback") <= _tol(0.025, r.runs)
    assert r.flip_back() == 0.0  # a promote stands


def test_diurnal_drift_with_the_minimum_span_set_to_the_cycle():
    r = calibrate("drift", runs=100, seed=13)
    assert r.ever("rollback") <= _tol(0.025, r.runs)
    assert r.ever("promote") <= _tol(0.025, r.runs)


def test_a_bad_slice_is_flagged_before_any_promote():
    r = calibrate("bad_slice", runs=40, seed=14)
    assert r.promoted_before_flagged() <= 0.05
    assert (r.flagged_at >= 0).mean() >= 0.8  # 97 % in the full table; 40 runs here


def test_heavy_tailed_latency_two_times_slower_is_rolled_back_and_aa_is_promoted():
    slow = calibrate("latency_2x", runs=30, seed=15)
    assert slow.first_within("rollback", 10_000) >= 0.9
    same = calibrate("latency_aa", runs=30, seed=16)
    assert same.first_within("promote", 10_000) >= 0.9 and same.ever("rollback") == 0.0


def test_seen_filter_marks_first_of_each_input_and_sample_key():
    f = SeenFilter(capacity=1000, bits=1 << 16)
    inp = np.array([1, 2, 1, 3, 4, 5], dtype=np.uint64)
    smp = np.array([0, 0, 0, 9, 9, 0], dtype=np.uint64)  # request 5 shares request 4's user
    assert f.first_seen(inp, smp).tolist() == [True, True, False, True, False, True]
    assert f.first_seen(np.array([2, 6], dtype=np.uint64)).tolist() == [False, True]  # across calls
    for _ in range(3):  # rotation keeps the horizon at >= capacity keys
        f.first_seen(np.arange(1000, 1000 + 600, dtype=np.uint64) + np.uint64(_ * 600))
    assert f.first_seen(np.array([2], dtype=np.uint64)).tolist() == [True]  # long forgotten


def test_repeats_count_once_in_the_evidence_and_the_estimate_says_so():
    acc = PairAccumulator()
    flips = np.array([True] * 10 + [False] * 990)
    keys = np.concatenate([np.full(10, 7), np.arange(100, 1090)]).astype(np.uint64)  # one input, 10x
    acc.update(_diffs(flips, np.zeros(1000)), baseline_latency_ms=np.ones(1000), candidate_latency_ms=np.ones(1000),
               request_ids=[str(i) for i in range(1000)], evidence=SeenFilter().first_seen(keys))
    assert acc.evidence["scored"] == 991 and acc.evidence["label_flips"] == 1 and acc.label_flips == 10
    m = judge(acc, JudgePolicy()).metric("label_flip_rate")
    assert m.samples == 991 and m.estimate == pytest.approx(1 / 991)
    assert "991 independent of 1000 requests" in m.detail


def _acc(flip_rate: float, n: int, seed: int, start_ms: int = 0, segments: bool = False) -> PairAccumulator:
    rng = np.random.default_rng(seed)
    acc = PairAccumulator()
    attrs = [{"segment": f"s{i % 4}"} for i in range(n)] if segments else None
    acc.update(_diffs(rng.random(n) < flip_rate, np.full(n, 0.001)), baseline_latency_ms=np.ones(n),
               candidate_latency_ms=np.ones(n), request_ids=[str(i) for i in range(n)], attributes=attrs,
               sent_ms=start_ms + np.arange(n) * 1000)
    return acc


def test_minimum_span_holds_until_a_cycle_is_seen():
    policy = dataclasses.replace(JudgePolicy(), min_span_s=86_400)
    acc = _acc(0.0, 3000, 1)  # 3,000 s of traffic
    j = judge(acc, policy)
    assert j.verdict == "hold" and j.blocking_metric == "min_span" and "minimum observation span" in j.reasons[0]
    acc.merge(_acc(0.0, 10, 2, start_ms=86_400_000))
    assert judge(acc, policy).verdict == "promote"


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
