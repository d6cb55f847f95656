"""Every output kind measures the disagreement and severity planted by its calibration scenario
(scorers.kinds.simulate): row by row, so the measured rate is a Binomial(n, planted rate) draw inside
its 99.9 % interval; and an identical candidate measures 0."""

import numpy as np
import pytest
from scipy import stats

from scorers.kinds import KIND_NAMES
from scorers.kinds.simulate import scenario

N = 20_000
RATES = (0.0, 0.02, 0.06)  # none, about a default margin, three margins
VARIANTS = [  # (kind, params, generator shape): the defaults, then other settings of each kind
    *[(name, {}, {}) for name in KIND_NAMES],
    ("classification", {"from_logits": True, "top_k": 2}, {"classes": 3}),
    ("classification", {}, {"classes": 2}),
    ("regression", {"abs_tolerance": 0.5, "rel_tolerance": 0.0}, {"outputs": 3}),
    ("regression", {"abs_tolerance": 0.2, "rel_tolerance": 0.05}, {"outputs": 2}),
    ("multilabel", {"from_logits": True, "threshold": 0.3}, {"labels": 40}),
    ("multilabel", {"threshold": 0.7}, {"labels": 1}),
    ("ranking", {"k": 5, "min_overlap": 0.6}, {"items": 12}),
    ("ranking", {"k": 1, "min_overlap": 1.0}, {"items": 30}),
    ("embedding", {"min_similarity": 0.9}, {"dims": 3}),
    ("embedding", {"min_similarity": -0.5}, {"dims": 64}),
]


def binomial_interval(n: int, p: float) -> tuple[float, float]:
    lo, hi = stats.binom.interval(0.999, n, p)
    return lo / n, hi / n


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize(("name", "params", "shape"), VARIANTS, ids=lambda v: str(v).replace(" ", ""))
def test_measured_disagreement_and_severity_are_the_planted_ones(name, params, shape, rate):
    s = scenario(name, N, rate, seed=11, params=params, **shape)
    d = s.kind.diffs(s.baseline, s.candidate)
    assert d.ok.all()
    measured = d.disagree.mean()
    lo, hi = binomial_interval(N, rate)
    assert lo <= measured <= hi, f"{name} {params}: measured {measured:.4f}, planted {rate} (99.9 % {lo:.4f}-{hi:.4f})"
    np.testing.assert_array_equal(d.disagree, s.disagree)
    np.testing.assert_allclose(d.severity, s.severity, rtol=0, atol=1e-9)
    assert np.isclose(d.severity.mean(), s.severity.mean(), rtol=0, atol=1e-12)
    if rate == 0.0:
        assert not d.disagree.any()


@pytest.mark.parametrize(("name", "params", "shape"), VARIANTS, ids=lambda v: str(v).replace(" ", ""))
def test_an_identical_candidate_measures_nothing(name, params, shape):
    s = scenario(name, 2_000, 0.06, seed=5, params=params, **shape)
    d = s.kind.diffs(s.baseline, s.baseline.copy())
    assert d.ok.all() and not d.disagree.any()
    assert (d.severity == 0.0).all()
    np.testing.assert_array_equal(d.candidate_summary, d.baseline_summary)
    np.testing.assert_array_equal(d.candidate_label, d.baseline_label)


def test_a_looser_threshold_measures_less_than_was_planted():
    """The scenarios are not built to any kind: the same answers judged by a looser kind disagree less."""
    s = scenario("ranking", N, 0.06, seed=3)
    loose = scenario("ranking", 1, 0.0, params={"min_overlap": 0.5}).kind
    assert loose.diffs(s.baseline, s.candidate).disagree.mean() < 0.75 * s.disagree.mean()
    e = scenario("embedding", N, 0.06, seed=3)
    looser = scenario("embedding", 1, 0.0, params={"min_similarity": 0.5}).kind
    assert looser.diffs(e.baseline, e.candidate).disagree.mean() < 0.75 * e.disagree.mean()
