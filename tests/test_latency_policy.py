"""Latency in the verdict: judged against the baseline replayed on the candidate's hardware, reported
only against production's recorded latency (unless the policy opts in); a 16x faster candidate on a
loaded machine promotes; requests_needed is a number only when the data back it; a rollback is
logged once at WARNING; the policy's defaults are one table.

Traffic (``shadow_run``: PairAccumulator -> judge() after every window, the judge stage's calls, every
request its own cluster, which does not touch latency; the per-execution spike cases run
``scorers.calibration``'s real path, cluster keys included):
A/A answers (0.3 % near-tie flips, a noise run beside it), judged every 250 requests. Latencies:

* ``HEAVY``: the request's cost lognormal(0, 1) ms, x20 for 1 % (long inputs), hardware noise
  lognormal(0, 0.1) per run (scorers.latency's model);
* ``LOADED``: a sub-millisecond model on a loaded replay box: cost 0.15 ms x lognormal(0, 0.3),
  and in 0.5 % of runs a pause of mean 0.3 ms that has nothing to do with the request (scheduler,
  interrupts, other processes), independent between the two models' runs;
* ``LIGHT``: lognormal(0, 0.3) ms, no spikes;
* production's recorded latency: the same requests on production's idle machine, 10x faster than
  the replay box (the measured case: 0.016 ms recorded, 0.153 ms replayed).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tomllib

import numpy as np
import pytest

from scorers import latency as latency_module
from scorers.accumulate import PairAccumulator
from scorers.calibration import _aa, _diffs
from scorers.judge import LATENCY_MEDIAN, JudgeMemory, JudgePolicy, judge, policy_defaults, policy_defaults_table
from scorers.latency import PairedLatency
from scorers.latency_simulate import simulate_latencies, simulate_latency

POLICY = JudgePolicy()
LAT = POLICY.latency_metric
MEDIAN = LATENCY_MEDIAN  # "latency_p50_ratio": the median's ratio, judged beside the tail's
HEAVY: dict = {}
LOADED = dict(scale_ms=0.15, sigma=0.3, spike_p=0.0, jitter_p=0.005, jitter_ms=0.3)
LIGHT = dict(sigma=0.3, spike_p=0.0)  # a light tail: the unpaired bounds decide within a few thousand
A_R, A_P = 0.05 / 2 / 6, 0.025  # the judge's default levels of a latency metric (6 rollback-capable metrics)


def latencies(rng, n, k, model, production_speedup=10.0):
    """(3, n): production recorded, replayed baseline, candidate (= k x the replayed baseline's cost)."""
    b, c = simulate_latencies(rng, n, k, **model)
    production = b / production_speedup * rng.lognormal(0.0, 0.1, n)
    return np.stack([production, b, c])


def shadow_run(lat, *, policy=POLICY, replayed=True, window=250, seed=0):
    """Judge after every window, as the judge stage does; returns [(requests, Judgement)]."""
    n = lat.shape[1]
    tr = _aa(np.random.default_rng(seed), n)
    cum, noise = PairAccumulator(), PairAccumulator()
    paired = PairedLatency() if replayed else None
    memory, out = JudgeMemory(), []
    for end in range(window, n + 1, window):
        sl = slice(end - window, end)
        ids, part = [str(i) for i in range(end - window, end)], lat[:, sl]
        cum.update(_diffs(tr.flip[sl], tr.abs_delta[sl]), baseline_latency_ms=part[0], candidate_latency_ms=part[2],
                   request_ids=ids)
        if replayed:
            noise.update(_diffs(tr.noise_flip[sl], tr.abs_delta[sl] * 0), baseline_latency_ms=part[0],
                         candidate_latency_ms=part[1], request_ids=ids)
            paired.update(part[1], part[2])
        j = judge(cum, policy, noise=noise if replayed else None, memory=memory, paired_latency=paired)
        memory = j.memory
        out.append((end, j))
    return out


def first(run, verdict):
    return next((n for n, j in run if j.verdict == verdict), None)


# -- without a replayed baseline: informational ------------------------------------------------------

def test_latency_against_production_is_reported_but_does_not_gate():
    """Production recorded 10x less than the replay box measures for an equally fast candidate: the
    ratio is reported (it shows 'fail'), but the candidate is neither rolled back nor held on it."""
    for seed in range(3):
        lat = latencies(np.random.default_rng(seed), 4000, 1.0, LOADED)
        run = shadow_run(lat, replayed=False, seed=seed)
        assert first(run, "rollback") is None
        assert all(j.blocking_metric not in (LAT, MEDIAN) for _, j in run)
        assert first(run, "promote") is not None and first(run, "promote") <= 1500
        for name in (LAT, MEDIAN):  # the tail's ratio and the median's alike
            m = run[-1][1].metric(name)
            assert m.decision == "fail" and m.lower > m.margin and not m.critical
            assert m.detail.startswith("informational, not gating: compared with production's recorded latency")
            assert any(r.startswith(f"{name} = ") and "informational" in r for r in run[-1][1].reasons)


def test_opting_in_gates_latency_against_production():
    lat = latencies(np.random.default_rng(0), 4000, 1.0, LOADED)
    run = shadow_run(lat, replayed=False, policy=JudgePolicy(latency_gates_without_reference=True))
    assert first(run, "promote") is None and first(run, "rollback") is not None
    j = next(j for _, j in run if j.verdict == "rollback")
    assert j.reasons[0].startswith("Rollback: ") and j.reasons[0].endswith(" confidently worse than margin.")
    assert {n for n in (LAT, MEDIAN) if n in j.reasons[0]}, j.reasons[0]
    # Before the rollback the hold waits for latency, the metrics that head for failure.
    assert all(j.blocking_metric in (LAT, MEDIAN, "min_samples", "error_rate", None)
               for n, j in run if j.verdict == "hold")


def test_missing_production_latency_holds_nothing_unless_latency_gates():
    lat = latencies(np.random.default_rng(1), 1500, 1.0, LOADED)
    lat[0, ::4] = np.nan  # production did not report 25 % of its latencies
    assert shadow_run(lat, replayed=False)[-1][1].verdict == "promote"
    gated = shadow_run(lat, replayed=False, policy=JudgePolicy(latency_gates_without_reference=True))[-1][1]
    assert gated.verdict == "hold" and gated.blocking_metric == "latency_present"
    # With a replayed baseline, production's missing latencies are not what latency is judged on.
    assert shadow_run(lat, replayed=True)[-1][1].data_checks["latency_present"]
    lat[2, ::4] = np.nan  # but the candidate's own missing latencies hold it
    held = shadow_run(lat, replayed=True)[-1][1]
    assert held.verdict == "hold" and held.blocking_metric == "latency_present"


# -- with a replayed baseline: gating, paired -----------------------------------------------------------

def test_with_a_replayed_baseline_a_2x_slower_candidate_rolls_back_whatever_production_recorded():
    for seed in range(4):
        lat = latencies(np.random.default_rng(100 + seed), 10_000, 2.0, HEAVY)
        run = shadow_run(lat, seed=seed)
        assert first(run, "promote") is None
        at = first(run, "rollback")
        assert at is not None, [j.reasons[0] for _, j in run[-1:]]
        j = dict(run)[at]
        # the median's ratio decides first (the density is high there); the tail's is paired too
        assert MEDIAN in j.reasons[0] and at <= 1000, (at, j.reasons[0])
        assert "paired sign test" in j.metric(LAT).detail and "paired sign test" in j.metric(MEDIAN).detail


def test_with_a_replayed_baseline_production_latency_does_not_block_an_equal_candidate():
    lat = latencies(np.random.default_rng(7), 10_000, 1.0, HEAVY, production_speedup=10.0)
    run = shadow_run(lat, seed=7)
    assert first(run, "rollback") is None and first(run, "promote") is not None
    assert "informational: other hardware and path" in run[-1][1].metric(LAT).detail


def test_a_16x_faster_candidate_on_a_loaded_machine_promotes_within_4000_requests():
    """The measured case: the sign test alone held such a candidate on latency past 4,000 requests
    (the machine's pauses, not the request, make both tails; see scorers.latency)."""
    promoted, last = [], []
    for seed in range(8):
        lat = latencies(np.random.default_rng(200 + seed), 4000, 1 / 16, LOADED)
        run = shadow_run(lat, seed=seed)
        assert first(run, "rollback") is None
        promoted.append(first(run, "promote"))
        last.append(run[-1][1].metric(LAT))
    # The sign test alone: promoted at 2,500-3,500 in 6 of these 8 runs, not by 4,000 in 2.
    assert all(p is not None and p <= 4000 for p in promoted), promoted
    assert np.median(promoted) <= 2000, promoted  # observed 1,375
    for m in last:  # and the interval has shrunk around the truth (1/16)
        assert m.decision == "pass" and m.upper < 0.5 and m.lower <= 1 / 16 <= m.upper * 1.1, m


def test_the_sign_test_alone_is_what_missed_it_and_the_intersection_stays_valid():
    """Many runs of the metric alone (scorers.latency_simulate, the same decisions as the judge's).
    Cause: with the sign test alone (unpaired_share=0, exceedance_share=0) the loaded-machine 16x case is not passed
    within 4,000 requests in many runs; with the intersection it is. Validity under the same model:
    at the margin (ratio 1.5) neither side decides beyond its level (+3 SD)."""
    runs = 100
    alone = simulate_latency(1 / 16, runs=runs, seed=21, requests=4000, unpaired_share=0.0, exceedance_share=0.0,
                             **LOADED)
    both = simulate_latency(1 / 16, runs=runs, seed=21, requests=4000, **LOADED)
    assert alone["ever_pass"] <= 0.75, alone  # observed 0.56 at this seed
    assert both["ever_pass"] >= 0.98 and both["ever_fail"] == 0.0, both
    limit = lambda p: p + 3 * math.sqrt(p * (1 - p) / runs)  # noqa: E731
    margin = simulate_latency(1.5, runs=runs, seed=22, requests=6000, **LOADED)
    assert margin["ever_fail"] <= limit(A_R) and margin["ever_pass"] <= limit(A_P), margin
    slow = simulate_latency(2.0, runs=runs, seed=23, requests=6000, **LOADED)
    assert slow["ever_fail"] >= 0.95 and slow["ever_pass"] == 0.0, slow


# -- requests_needed --------------------------------------------------------------------------------------

@pytest.mark.parametrize("replayed", [False, True], ids=["production", "replayed"])
def test_requests_needed_is_never_a_guess_on_an_open_interval_and_holds_up(replayed):
    """While the latency interval is still [0, inf] a hold once said "about 1 more requests may decide
    it". Now a number is given only from the projection of the order statistics (or the interval's
    own extrapolation once finite), and the metric decides by the first look past 3x of it."""
    policy = JudgePolicy(latency_gates_without_reference=True, label_flip_rate_margin=None,
                         abs_confidence_delta_margin=None, accuracy_drop_margin=None, min_samples=100,
                         latency_p50_ratio_margin=None)  # the tail's ratio alone: its estimate is tested
    looked = 0
    for seed in range(3):
        lat = latencies(np.random.default_rng(seed), 4000, 1.0, LIGHT, production_speedup=1.0)
        run = shadow_run(lat, policy=policy, replayed=replayed, seed=seed)
        decided = next(n for n, j in run if j.metric(LAT).decision != "inconclusive")
        for n, j in run:
            if n >= decided:
                break
            m = j.metric(LAT)
            assert j.blocking_metric == LAT
            if m.upper is None:
                looked += 1
                assert j.requests_needed is None or j.requests_needed > 10, (n, j.reasons[0])
                assert "about 1 more requests" not in j.reasons[0]
            if j.requests_needed is not None:
                # decided at the latest by the first look (every 250) past 3x the estimate
                assert decided <= n + 3 * j.requests_needed + 250, (seed, n, j.requests_needed, decided)
    assert looked >= 6  # the open-interval looks were exercised


def test_requests_needed_is_none_when_the_bound_is_open_and_nothing_projects():
    m = latency_module.MetricJudgement(name=LAT, estimate=1.2, lower=0.0, upper=None, margin=1.5,
                                       decision="inconclusive", samples=900, critical=False)
    assert latency_module.latency_requests_needed(m, 0.99, 0.0025, 0.005) is None  # was 1


# -- rollback log ----------------------------------------------------------------------------------------------

def test_judgement_tells_a_rollback_once_per_transition():
    lat = latencies(np.random.default_rng(3), 3000, 3.0, HEAVY)
    run = shadow_run(lat, seed=3)
    started = [n for n, j in run if j.rollback_started]
    assert len(started) == 1 and started[0] == first(run, "rollback")
    assert all(j.memory.last_verdict == j.verdict for _, j in run)
    # A rollback, a hold, a rollback again: two transitions.
    rollback = dict(run)[started[0]]
    again = judge(PairAccumulator(), POLICY, memory=dataclasses.replace(rollback.memory, last_verdict="hold"))
    assert again.verdict == "hold" and not again.rollback_started


def test_a_rollback_is_logged_once_at_warning_by_the_judge(tmp_path, caplog):
    """Real models, chDB and the embedded pipeline: a candidate whose every answer is another class
    rolls back at its first window; that is logged at WARNING once, not again at every window after,
    nor after the judge restores the pair's state (a restart)."""
    from streams.demo import TrafficGenerator, demo_settings
    from harness import window_aligned_start
    from streams.models import build_digits_models
    from streams.pipeline import Pipeline
    from streams.sink import ClickHouseSink

    models = build_digits_models(tmp_path / "models")
    settings = demo_settings(tmp_path, models, window_s=10)
    good, _, replay = settings.candidates
    broken = good.model_copy(update={"name": "digits-v2-broken", "path": models["broken"]})
    settings.candidates = [good, broken, replay]
    start = window_aligned_start(2500, rate_per_s=50, window_s=10)
    traffic = TrafficGenerator(models["baseline"], rate_per_s=50).messages(2500, start=start)  # 5 windows
    sink = ClickHouseSink(settings.clickhouse.dsn, settings.clickhouse.database)
    decisions = []
    try:
        pipeline = Pipeline(settings, sink)
        with caplog.at_level(logging.INFO, "shadowlens.judge"):
            for lo in range(0, 2000, 250):
                pipeline.process(traffic[lo:lo + 250])
                decisions += [v.verdict for v in pipeline.close_due() if v.candidate == broken.name]
            key = f"digits/{broken.name}"
            pipeline.judge.restore(key, pipeline.judge.serialized(key))  # what a restarted judge does
            pipeline.process(traffic[2000:])
            decisions += [v.verdict for v in pipeline.close_due(force=True) if v.candidate == broken.name]
    finally:
        sink.close()
    assert len(decisions) >= 4 and set(decisions) == {"rollback"}, decisions
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "rollback" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert message.startswith(f"verdict digits/{broken.name}: rollback (") and "label_flip_rate" in message


# -- policy defaults ----------------------------------------------------------------------------------------------

def test_policy_defaults_table_lists_every_field_with_its_default():
    table = policy_defaults_table()
    rows = table.strip().splitlines()[2:]
    names = [f.name for f in dataclasses.fields(JudgePolicy)]
    assert [r.split("|")[1].strip().strip("`") for r in rows] == names
    defaults = JudgePolicy()
    for name, default, doc, example in policy_defaults():
        value = getattr(defaults, name)
        if value is None:
            assert default is None and example is not None and "unset" in doc
        else:
            assert tomllib.loads(f"v = {default}")["v"] == (list(value) if isinstance(value, tuple) else value)
        assert doc and "\n" not in doc
    assert "| `latency_gates_without_reference` | `false` |" in table


# -- spikes per execution (issue #21, item 5) ------------------------------------------------------------

def test_spikes_per_execution_through_the_real_path():
    """x20 spikes hit each run independently (GC pauses, queueing): an A/A candidate is not held on
    latency for good and never rolled back; a 2x slower one is never promoted, and the median's ratio
    rolls it back (the p99's alone did in 13 % of runs by 10,000: README). Quick version of the README's
    rows (bench/calibration.py: 500 runs each); seeded, 6 runs each."""
    from scorers.calibration import calibrate
    aa = calibrate("latency_aa_exec", runs=6, seed=3)
    assert aa.ever("rollback") == 0.0
    assert aa.ever("promote") >= 0.5, aa.ever("promote")  # before the exceedance test: 15.5 % of 200
    slow = calibrate("latency_2x_exec", runs=6, seed=4)
    assert slow.ever("promote") == 0.0 and slow.first_within("rollback", 10_000) == 1.0


def test_the_median_metric_is_configured_like_the_tail_one():
    """Its own margin (None switches it off), its own share of the rollback level, the same
    informational rule; a latency_quantile of 0.5 would judge the median twice under one name."""
    assert POLICY.latency_metrics() == {LAT: (0.99, 1.5), MEDIAN: (0.5, 1.5)}
    assert POLICY.rollback_alpha() == pytest.approx(A_R)
    off = JudgePolicy(latency_p50_ratio_margin=None)
    assert MEDIAN not in off.margins() and off.rollback_alpha() == pytest.approx(0.05 / 2 / 5)
    assert list(JudgePolicy(latency_quantile=0.95).latency_metrics()) == ["latency_p95_ratio", MEDIAN]
    with pytest.raises(ValueError, match="latency_quantile = 0.5 is the median") as refused:
        JudgePolicy(latency_quantile=0.5)
    assert "\n" not in str(refused.value)
    assert list(JudgePolicy(latency_quantile=0.5, latency_p50_ratio_margin=None).latency_metrics()) == [MEDIAN]
    # gating = [the median] alone: the tail's ratio is reported, its missing latencies hold nothing more
    lat = latencies(np.random.default_rng(5), 1500, 1.0, LIGHT)
    j = shadow_run(lat, policy=JudgePolicy(gating=("error_rate", MEDIAN)))[-1][1]
    assert j.verdict == "promote" and j.metric(MEDIAN).decision == "pass"
    assert any(r.startswith(f"{LAT} = ") and "reported only" in r for r in j.reasons)
