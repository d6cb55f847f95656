"""Calibration of the whole decision rule under repeated looks (seeded simulations, >= 1,000 runs each).

Every run is judged after every window of 250 requests, up to 5,000 requests (20 looks), and a run
counts as a false rollback / false promote if that verdict appears at *any* look. Tolerances are the
issue's: <= 1 % false rollback (A/A), <= 1 % false promote of a worse-than-margin candidate, >= 95 %
power. The guarantees behind them are alpha/2 per side (see scorers.judge); observed rates are lower
because mixture confidence sequences are conservative.
"""

import numpy as np
import pytest

from scorers.accumulate import PairAccumulator
from scorers.diffs import ClassificationDiffs
from scorers.judge import JudgePolicy, judge
from scorers.simulate import draw_runs, judge_runs, simulate

RUNS = 2000
POLICY = JudgePolicy(label_flip_rate_margin=0.02, abs_confidence_delta_margin=0.05)


def test_aa_identical_candidate_is_never_rolled_back():
    """A/A: candidate = baseline up to numeric noise (0.3 % near-tie flips, tiny |delta|), with the same
    noise measured by a baseline-vs-baseline replay of 2,000 requests."""
    r = simulate(runs=RUNS, flip_rate=0.003, abs_delta_mean=1e-4, noise_requests=2000, noise_flip_rate=0.003,
                 noise_abs_delta_mean=1e-4, policy=POLICY, seed=1)
    assert r.ever_rollback_rate <= 0.01
    assert r.first_rate("promote", within=5000) >= 0.99  # and it does get promoted


def test_aa_without_noise_run():
    r = simulate(runs=RUNS, flip_rate=0.0, abs_delta_mean=1e-4, policy=POLICY, seed=2)
    assert r.ever_rollback_rate <= 0.01


def test_candidate_at_the_margin_is_rarely_rolled_back_or_promoted():
    """The hardest case for both sides: the true flip rate equals the margin."""
    r = simulate(runs=RUNS, flip_rate=0.02, policy=POLICY, seed=3)
    assert r.ever_rollback_rate <= 0.01
    assert r.ever_promote_rate <= POLICY.promote_alpha()  # the guarantee; observed ~0.5 %


@pytest.mark.parametrize("kind", ["flip", "abs_delta"])
def test_worse_than_margin_is_not_promoted(kind):
    settings = {"flip": dict(flip_rate=0.023, abs_delta_mean=0.01),
                "abs_delta": dict(flip_rate=0.005, abs_delta_mean=0.052)}[kind]
    r = simulate(runs=RUNS, policy=POLICY, seed=4, **settings)
    assert r.ever_promote_rate <= 0.01


def test_power_two_points_over_margin_rolls_back_within_5000():
    r = simulate(runs=RUNS, flip_rate=0.04, policy=POLICY, seed=5)
    assert r.first_rate("rollback", within=5000) >= 0.95


def test_demo_scale_good_promotes_and_broken_rolls_back_by_2500():
    demo = JudgePolicy(label_flip_rate_margin=0.10)
    good = simulate(runs=1000, requests=2500, flip_rate=0.05, abs_delta_mean=0.03, policy=demo, seed=6)
    assert good.first_rate("promote", within=2500) >= 0.95
    broken = simulate(runs=1000, requests=2500, flip_rate=0.8, abs_delta_mean=0.4, policy=demo, seed=7)
    assert broken.first_rate("rollback", within=500) >= 0.99


@pytest.mark.parametrize("noise", [0, 800])
def test_harness_matches_the_judge(noise):
    """The vectorised harness and judge() on real accumulators give the same verdict at every look."""
    policy = JudgePolicy(label_flip_rate_margin=0.03, abs_confidence_delta_margin=0.05,
                         latency_p99_ratio_margin=None, accuracy_drop_margin=None)
    draws = draw_runs(runs=6, requests=3000, flip_rate=0.035, abs_delta_mean=0.03, error_rate=0.004,
                      noise_requests=noise, noise_flip_rate=0.01, noise_abs_delta_mean=0.01, seed=8)
    fast = judge_runs(draws, window=250, policy=policy)
    for run in range(6):
        noise_acc = None
        if noise:
            noise_acc = PairAccumulator()
            noise_acc.update(_diffs(np.zeros(noise, bool), draws.noise_flip[run], draws.noise_abs_delta[run]),
                             baseline_latency_ms=np.ones(noise), candidate_latency_ms=np.ones(noise),
                             request_ids=[str(i) for i in range(noise)])
        acc = PairAccumulator()
        for look, end in enumerate(fast.looks):
            sl = slice(end - 250, end)
            acc.update(_diffs(draws.error[run, sl], draws.flip[run, sl], draws.abs_delta[run, sl]),
                       baseline_latency_ms=np.ones(250), candidate_latency_ms=np.ones(250),
                       request_ids=[f"{run}-{i}" for i in range(end - 250, end)])
            assert judge(acc, policy, noise=noise_acc).verdict == fast.verdicts[run, look], (run, look)


def _diffs(error, flip, abs_delta) -> ClassificationDiffs:
    n = len(error)
    d = ClassificationDiffs.empty(n)
    d.error[error] = "candidate output has NaN"
    d.label_flip[:] = flip & ~error
    d.confidence_delta[~error] = -abs_delta[~error]
    for f in ("l1", "linf", "hellinger"):
        getattr(d, f)[~error] = abs_delta[~error]
    d.topk_overlap[~error] = 1.0
    d.baseline_label[:] = 0
    d.candidate_label[~error] = np.where(flip[~error], 1, 0)
    return d
