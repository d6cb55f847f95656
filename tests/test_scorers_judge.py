"""The judge: verdicts on realistic accumulators, data checks, noise floor, labels, slices, latency."""

import json
from datetime import UTC, datetime

import numpy as np
import pytest

from schemas.events import Verdict
from scorers.accumulate import PairAccumulator
from scorers.diffs import classification_diffs
from scorers.judge import JudgePolicy, judge
from scorers.simulate import synthetic_outputs

DEMO = JudgePolicy(label_flip_rate_margin=0.10)
# These tests have no replayed baseline: latency is compared with production's and gates only by opting in.
DEMO_LATENCY = JudgePolicy(label_flip_rate_margin=0.10, latency_gates_without_reference=True)


def feed(acc, rng, n, *, flip_rate, latency_factor=1.0, nan_rate=0.0, labels_rate=0.0, country=None,
         start=0, missing_latency=0.0):
    b, c = synthetic_outputs(rng, n, flip_rate=flip_rate)
    c[rng.random(n) < nan_rate] = np.nan
    d = classification_diffs(b, c)
    base_lat = rng.lognormal(2.0, 0.3, n)
    cand_lat = base_lat * latency_factor * rng.lognormal(0, 0.05, n)
    cand_lat[rng.random(n) < missing_latency] = np.nan
    labels = np.where(rng.random(n) < labels_rate, d.baseline_label, np.nan)  # baseline right when labelled
    attrs = [{"country": country or ("de", "fr", "us")[i % 3]} for i in range(n)]
    acc.update(d, baseline_latency_ms=base_lat, candidate_latency_ms=cand_lat,
               request_ids=[f"req-{start + i}" for i in range(n)], attributes=attrs, labels=labels)
    return acc


def run(flip_rate, windows=10, size=250, policy=DEMO, seed=0, **kw):
    rng = np.random.default_rng(seed)
    acc, verdicts = PairAccumulator(), []
    for w in range(windows):
        feed(acc, rng, size, flip_rate=flip_rate, start=w * size, **kw)
        verdicts.append(judge(acc, policy))
    return acc, verdicts


def test_good_candidate_promotes_broken_rolls_back_by_2500():
    _, good = run(0.04)
    assert [j.verdict for j in good][-1] == "promote"
    assert "rollback" not in [j.verdict for j in good]
    _, broken = run(0.85)
    assert broken[0].verdict == "rollback"  # 250 requests are plenty at 85% flips
    j = broken[-1]
    assert j.metric("label_flip_rate").decision == "fail" and j.metric("label_flip_rate").lower > 0.10
    assert j.example_request_ids and all(r.startswith("req-") for r in j.example_request_ids)
    assert any("label_flip_rate" in r and "margin 0.1" in r for r in j.reasons)


def test_min_samples_hold_with_estimate():
    acc, verdicts = run(0.0, windows=1, size=300)
    j = verdicts[0]
    assert j.verdict == "hold" and j.data_checks["min_samples"] is False
    assert j.requests_needed is not None and j.requests_needed >= 200
    assert any("Insufficient data" in r for r in j.reasons)


def test_critical_error_rate_rolls_back_even_with_sample_ratio_mismatch():
    acc, _ = run(0.0, windows=2, nan_rate=0.3)
    j = judge(acc, DEMO, expected_requests=10_000)
    assert j.verdict == "rollback" and j.metric("error_rate").critical
    assert j.data_checks["sample_ratio"] is False
    assert "critical" in j.reasons[0]


def test_sample_ratio_mismatch_holds_noncritical_rollback():
    acc, _ = run(0.85, windows=4)
    assert judge(acc, DEMO, expected_requests=1000).verdict == "rollback"
    j = judge(acc, DEMO, expected_requests=2000)
    assert j.verdict == "hold" and any("Sample-ratio mismatch" in r for r in j.reasons)
    ok, _ = run(0.04)
    assert judge(ok, DEMO, expected_requests=5000).verdict == "hold"  # never promote on half the traffic


def test_missing_latency_holds():
    acc, verdicts = run(0.04, missing_latency=0.2, policy=DEMO_LATENCY)
    assert verdicts[-1].verdict == "hold" and verdicts[-1].data_checks["latency_present"] is False
    # Latency compared with production's is informational by default: missing ones hold nothing.
    j = judge(acc, DEMO)
    assert j.verdict == "promote" and j.data_checks["latency_present"] is True


def test_slow_candidate_rolls_back_on_latency_ratio():
    acc, verdicts = run(0.0, latency_factor=3.0, windows=8, policy=DEMO_LATENCY)
    j = verdicts[-1]
    m = j.metric("latency_p99_ratio")
    assert j.verdict == "rollback" and m.decision == "fail" and m.lower > 1.5
    assert m.estimate == pytest.approx(3.0, rel=0.1)
    same = run(0.0, policy=DEMO_LATENCY)[1][-1].metric("latency_p99_ratio")
    assert same.lower < 1.0 < same.upper < 1.5 and same.decision == "pass"
    # Without opting in, the same comparison with production's latency is reported, not gating.
    j = judge(acc, DEMO)
    m = j.metric("latency_p99_ratio")
    assert j.verdict == "promote" and m.decision == "fail" and m.detail.startswith("informational, not gating")


def test_noise_floor_is_subtracted():
    # slice_min_share=1: no slice gates the promote here (their bounds minus the noise floor's are
    # wider than the margin at 3,300 requests each; the slice gate has tests of its own)
    policy = JudgePolicy(label_flip_rate_margin=0.03, abs_confidence_delta_margin=0.2, slice_min_share=1.0)
    rng = np.random.default_rng(5)
    cand = feed(PairAccumulator(), rng, 10_000, flip_rate=0.05)
    noise = feed(PairAccumulator(), rng, 10_000, flip_rate=0.045)
    assert judge(cand, policy).verdict == "rollback"
    j = judge(cand, policy, noise=noise)
    flip = j.metric("label_flip_rate")
    assert j.verdict == "promote", j.reasons
    assert flip.estimate == pytest.approx(cand.flip_rate - noise.flip_rate)
    assert "noise floor" in flip.detail
    assert any(r.startswith("Noise run given but empty") for r in judge(cand, policy, noise=PairAccumulator()).reasons)


def test_paired_accuracy_joins_gating_when_labels_arrive():
    policy = JudgePolicy(label_flip_rate_margin=0.5, abs_confidence_delta_margin=0.5, accuracy_drop_margin=0.01)
    acc, verdicts = run(0.08, labels_rate=0.5, policy=policy)
    j = verdicts[-1]
    m = j.metric("accuracy_drop")
    assert j.verdict == "rollback" and m.decision == "fail" and m.lower > 0.01
    assert "McNemar" in m.detail
    few, v2 = run(0.08, labels_rate=0.02, policy=policy)  # ~50 labelled rows < min_labelled
    assert v2[-1].verdict == "promote" and v2[-1].metric("accuracy_drop").decision != "fail"


def test_bad_slice_blocks_promotion_and_is_reported_first():
    rng = np.random.default_rng(9)
    acc = PairAccumulator()
    for w in range(8):
        feed(acc, rng, 400, flip_rate=0.01, start=w * 1000)
        feed(acc, rng, 60, flip_rate=0.5, country="br", start=w * 1000 + 500)
    policy = JudgePolicy(label_flip_rate_margin=0.10)
    j = judge(acc, policy)
    assert j.metric("label_flip_rate").decision == "pass"
    assert j.worst_slices[0].attribute == "country" and j.worst_slices[0].value == "br"
    assert j.worst_slices[0].decision == "fail"
    assert all(s.decision != "fail" for s in j.worst_slices[1:])
    assert j.verdict == "hold"
    strict = JudgePolicy(label_flip_rate_margin=0.10, slice_failure_verdict="rollback")
    assert judge(acc, strict).verdict == "rollback"


def test_policy_rejects_unknown_keys_and_round_trips():
    with pytest.raises(ValueError, match="unknown judge policy keys"):
        JudgePolicy.from_dict({"flip_margin": 0.1})
    p = JudgePolicy.from_dict({"label_flip_rate_margin": 0.1, "critical": ["error_rate", "label_flip_rate"]})
    assert p.critical == ("error_rate", "label_flip_rate")
    assert JudgePolicy.from_dict(p.to_dict()) == p
    assert p.rollback_alpha() == pytest.approx(0.05 / 2 / 6)  # error, flip, |delta|, two latency ratios, accuracy


def test_to_verdict_is_valid_json():
    acc, verdicts = run(0.04, windows=3)
    now = datetime.now(UTC)
    v = verdicts[-1].to_verdict(model="digits", candidate="v2", window_start=now, window_end=now, updated_at=now)
    assert isinstance(v, Verdict)
    data = json.loads(v.model_dump_json())
    assert data["verdict"] in {"promote", "hold", "rollback"} and data["metrics"]


def test_empty_accumulator_holds():
    j = judge(PairAccumulator(), DEMO)
    assert j.verdict == "hold" and j.samples == 0
    json.dumps([m.model_dump() for m in j.metrics])


def test_a_hold_names_the_metric_it_waits_for_first():
    acc, verdicts = run(0.08, windows=2)  # flip rate 8 % against a 10 % margin: not yet separable
    j = verdicts[-1]
    assert j.verdict == "hold" and j.blocking_metric in {m.name for m in j.metrics}
    assert j.reasons[0].startswith(f"Hold: waiting for {j.blocking_metric} = ")
    assert j.requests_needed is not None and f"about {j.requests_needed} more requests" in j.reasons[0]


def test_latency_quantile_hold_estimates_the_requests_it_needs():
    """Only the p99 latency ratio gates; its estimate is checked by feeding that many more requests
    at the same rates (tolerance: the decision within 2x the estimate; seed fixed)."""
    policy = JudgePolicy(label_flip_rate_margin=None, abs_confidence_delta_margin=None, accuracy_drop_margin=None,
                         latency_p99_ratio_margin=1.5, min_samples=100, max_error_rate=0.5,
                         latency_gates_without_reference=True)  # fmt: skip
    rng = np.random.default_rng(4)
    acc = feed(PairAccumulator(), rng, 300, flip_rate=0.0)  # too few for a finite p99 upper bound
    j = judge(acc, policy)
    assert j.verdict == "hold" and j.blocking_metric == policy.latency_metric
    assert j.requests_needed is not None and j.requests_needed > 0
    feed(acc, rng, 2 * j.requests_needed, flip_rate=0.0, start=300)
    assert judge(acc, policy).verdict == "promote"


def test_unscorable_requests_hold_with_their_reason_and_never_count_as_errors():
    acc, _ = run(0.04)  # 2,500 scored requests that would promote
    j = judge(acc, DEMO, expected_requests=5000, unscorable={"baseline_mismatch": 2500})
    assert j.verdict == "hold" and j.blocking_metric == "comparable" and not j.data_checks["comparable"]
    assert "baseline_mismatch" in j.reasons[0] and "not the candidate" in j.reasons[0]
    assert j.metric("error_rate").estimate == 0.0  # the candidate made no error
    # Within tolerance (2 %, under max_missing_fraction 5 %) the verdict stands, and the sample ratio
    # counts them as received.
    j = judge(acc, DEMO, expected_requests=2550, unscorable={"adapter": 50})
    assert j.verdict == "promote" and j.data_checks["sample_ratio"]


def test_slice_under_a_noise_floor_subtracts_the_lower_noise_bound_from_its_upper_bound():
    """A 6 % slice against a 4 % noise floor with margin 2 %: its excess (about 2 %) is not
    confidently within the margin, so it must not show "pass" (it did when the noise floor's
    upper bound was subtracted from the slice's upper bound)."""
    policy = JudgePolicy(label_flip_rate_margin=0.02, slice_min_samples=100)
    rng = np.random.default_rng(7)
    acc = feed(PairAccumulator(), rng, 3000, flip_rate=0.06, country="de")
    noise = feed(PairAccumulator(), rng, 3000, flip_rate=0.04)
    j = judge(acc, policy, noise=noise)
    (de,) = [s for s in j.worst_slices if s.value == "de"]
    assert de.decision != "pass" and de.upper > policy.label_flip_rate_margin
    assert de.estimate == pytest.approx(0.06 - noise.label_flips / noise.scored, abs=0.02)
    assert de.lower <= de.estimate <= de.upper
