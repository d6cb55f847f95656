"""The output kinds (issue #22): hand-checked rows per kind, error rows, baseline problems, kind_params
errors, and every kind's conformance to the one interface."""

import math

import numpy as np
import pytest
from scipy import stats

from scorers.kinds import KIND_NAMES, KINDS, KindDiffs, make_kind
from scorers.kinds.multilabel import PER_LABEL_CAP

LOG2_3, LOG2_5 = math.log2(3), math.log2(5)


# -- classification -------------------------------------------------------------------------------
def test_classification_hand_rows():
    b = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])
    c = np.array([[0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    d = make_kind("classification", {}).diffs(b, c)
    assert d.disagree.tolist() == [True, False]
    np.testing.assert_allclose(d.severity, [0.5, 0.1])
    np.testing.assert_allclose(d.metrics["confidence_delta"], [-0.5, 0.1])
    np.testing.assert_allclose(d.metrics["l1"], [1.0, 0.2])
    np.testing.assert_allclose(d.metrics["linf"], [0.5, 0.1])
    np.testing.assert_allclose(d.baseline_summary, [0.7, 0.5])
    np.testing.assert_allclose(d.candidate_summary, [0.7, 0.6])
    assert d.baseline_label.tolist() == [0, 0] and d.candidate_label.tolist() == [1, 0]
    logits = make_kind("classification", {"from_logits": True}).diffs(np.log(b), np.log(c))
    np.testing.assert_allclose(logits.severity, [0.5, 0.1])
    np.testing.assert_allclose(logits.baseline_summary, [0.7, 0.5])


def test_classification_one_value_per_request_is_a_binary_model():
    d = make_kind("classification", {}).diffs(np.array([0.8, 0.3]), np.array([0.4, 0.35]))
    assert d.baseline_label.tolist() == [1, 0] and d.candidate_label.tolist() == [0, 0]
    assert d.disagree.tolist() == [True, False]
    np.testing.assert_allclose(d.severity, [0.4, 0.05])
    np.testing.assert_allclose(d.baseline_summary, [0.8, 0.7])


def test_classification_errors_and_baseline_problems():
    kind = make_kind("classification", {})
    b = np.array([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5]])
    c = np.array([[np.nan, 0.5], [0.9, 0.3], [0.5, 0.5]])
    d = kind.diffs(b, c)
    assert d.error.tolist() == ["candidate output has NaN", "candidate probabilities sum to 1.2, not 1", ""]
    assert d.ok.tolist() == [False, False, True]
    assert np.isnan(d.severity[:2]).all() and not d.disagree[:2].any()
    assert d.candidate_label[:2].tolist() == [-1, -1] and np.isnan(d.candidate_summary[:2]).all()
    assert d.baseline_label.tolist() == [0, 0, 0], "the baseline's own class stays on candidate-error rows"
    assert kind.baseline_problems(np.array([[0.7, 0.3], [1.2, -0.2], [0.5, 0.6], [np.inf, 0.0]])) == {
        1: "baseline probabilities are negative", 2: "baseline probabilities sum to 1.1, not 1",
        3: "baseline output has Inf"}
    assert make_kind("classification", {"from_logits": True}).baseline_problems(np.array([[3.0, -2.0]])) == {}


# -- regression -----------------------------------------------------------------------------------
def test_regression_default_tolerance_is_one_percent_of_the_baseline():
    d = make_kind("regression", {}).diffs(np.array([100.0, 0.0, -50.0, 1.0, 0.0]),
                                          np.array([100.5, 0.0, -52.0, 5.0, 1.0]))
    assert d.disagree.tolist() == [False, False, True, True, True]
    np.testing.assert_allclose(d.severity, [0.005, 0.0, 0.04, 1.0, 1.0])
    np.testing.assert_allclose(d.metrics["abs_error"], [0.5, 0.0, 2.0, 4.0, 1.0])
    np.testing.assert_allclose(d.metrics["rel_error"], [0.005, 0.0, 0.04, 4.0, 1e12])
    np.testing.assert_allclose(d.metrics["signed_error"], [0.5, 0.0, -2.0, 4.0, 1.0])
    np.testing.assert_allclose(d.baseline_summary, [100.0, 0.0, -50.0, 1.0, 0.0])
    np.testing.assert_allclose(d.metrics["candidate_value"], [100.5, 0.0, -52.0, 5.0, 1.0])
    assert (d.baseline_label == -1).all() and (d.candidate_label == -1).all()


def test_regression_absolute_tolerance_and_its_floor():
    kind = make_kind("regression", {"abs_tolerance": 1.0, "rel_tolerance": 0.01})
    assert kind.floor == 100.0
    d = kind.diffs(np.array([0.0, 0.0, 1000.0]), np.array([0.5, 3.0, 1015.0]))
    assert d.disagree.tolist() == [False, True, True]
    np.testing.assert_allclose(d.severity, [0.005, 0.03, 0.015])
    only_abs = make_kind("regression", {"abs_tolerance": 2.0, "rel_tolerance": 0.0})
    d = only_abs.diffs(np.array([0.0, 1000.0]), np.array([1.0, 1003.0]))
    assert d.disagree.tolist() == [False, True]
    np.testing.assert_allclose(d.severity, [0.5, 0.003])


@pytest.mark.parametrize(("abs_tolerance", "rel_tolerance"), [(0.0, 0.01), (0.5, 0.02), (2.0, 0.1)])
def test_regression_relative_error_brackets_the_tolerance(abs_tolerance, rel_tolerance):
    """The module doc's promise: relative error <= rel_tolerance never disagrees, > 2x always does."""
    kind = make_kind("regression", {"abs_tolerance": abs_tolerance, "rel_tolerance": rel_tolerance})
    rng = np.random.default_rng(1)
    b = rng.normal(0.0, 10.0, (50_000, 2))
    c = b + rng.normal(0.0, 1.0, b.shape) * rng.choice([1e-3, 0.1, 1.0, 10.0], (b.shape[0], 1))
    d = kind.diffs(b, c)
    rel = d.metrics["rel_error"]
    assert (rel <= rel_tolerance).any() and (rel > 2 * rel_tolerance).any()
    assert not d.disagree[rel <= rel_tolerance].any() and d.disagree[rel > 2 * rel_tolerance].all()


def test_regression_vector_outputs_take_the_worst():
    d = make_kind("regression", {}).diffs(np.array([[1.0, 2.0], [10.0, 20.0]]),
                                          np.array([[1.0, 2.5], [10.05, 20.0]]))
    assert d.disagree.tolist() == [True, False]
    np.testing.assert_allclose(d.severity, [0.25, 0.005])
    np.testing.assert_allclose(d.metrics["signed_error"], [0.25, 0.025])
    np.testing.assert_allclose(d.metrics["baseline_value"], [1.0, 10.0])


def test_regression_candidate_errors_keep_the_baseline_side():
    kind = make_kind("regression", {})
    d = kind.diffs(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[np.inf, 2.0], [3.0, 4.0]]))
    assert d.error.tolist() == ["candidate output has Inf", ""]
    np.testing.assert_allclose(d.baseline_summary, [1.0, 3.0])
    assert np.isnan(d.metrics["abs_error"][0]) and d.metrics["abs_error"][1] == 0.0
    wrong = kind.diffs(np.array([[1.0, 2.0]]), np.array([[1.0, 2.0, 3.0]]))
    assert wrong.error.tolist() == ["candidate answers 3 values, baseline 2"]
    assert wrong.baseline_summary.tolist() == [1.0] and np.isnan(wrong.severity[0])
    assert kind.baseline_problems(np.array([[1.0], [np.nan]])) == {1: "baseline output has NaN"}
    with pytest.raises(ValueError, match="baseline has 2 rows, candidate 1"):
        kind.diffs(np.zeros((2, 1)), np.zeros((1, 1)))


def test_ragged_rows_are_scored_per_width():
    kind = make_kind("regression", {})
    b = [np.array([1.0]), np.array([1.0, 2.0]), np.array([3.0]), np.array([5.0, 5.0])]
    c = [np.array([1.5]), np.array([1.0, 2.0]), np.array([3.0, 1.0]), np.array([5.0, 5.0])]
    d = kind.diffs(b, c)
    assert d.error.tolist() == ["", "", "candidate answers 2 values, baseline 1", ""]
    assert d.disagree.tolist() == [True, False, False, False]
    np.testing.assert_allclose(d.severity, [0.5, 0.0, np.nan, 0.0])
    np.testing.assert_allclose(d.baseline_summary, [1.0, 1.0, 3.0, 5.0])
    assert kind.baseline_problems([np.array([1.0]), np.array([2.0, np.nan])]) == {1: "baseline output has NaN"}


# -- multi-label ----------------------------------------------------------------------------------
def test_multilabel_hand_row():
    d = make_kind("multilabel", {}).diffs(np.array([[0.9, 0.1, 0.6, 0.4], [0.5, 0.2, 0.2, 0.2]]),
                                          np.array([[0.8, 0.7, 0.4, 0.4], [0.5, 0.2, 0.2, 0.2]]))
    assert d.disagree.tolist() == [True, False]
    np.testing.assert_allclose(d.severity, [0.5, 0.0])
    np.testing.assert_allclose(d.metrics["hamming"], [2.0, 0.0])
    np.testing.assert_allclose(d.metrics["mean_abs_delta"], [0.225, 0.0])
    assert [d.metrics[f"flip_label_{j}"][0] for j in range(4)] == [0.0, 1.0, 1.0, 0.0]
    assert "flip_label_4" not in d.metrics
    assert d.baseline_label.tolist() == [2, 1] and d.candidate_label.tolist() == [2, 1], "0.5 is on"
    np.testing.assert_allclose(d.baseline_summary, [0.5, 0.25])


def test_multilabel_logits_threshold_and_cap():
    kind = make_kind("multilabel", {"from_logits": True, "threshold": 0.25})
    z = math.log(0.25 / 0.75)
    d = kind.diffs(np.array([[z - 0.01, z + 0.01, 5.0]]), np.array([[z + 0.01, z + 0.01, -5.0]]))
    assert d.baseline_label.tolist() == [2] and d.candidate_label.tolist() == [2]
    np.testing.assert_allclose(d.severity, [2 / 3])
    wide = make_kind("multilabel", {}).diffs(np.full((1, 40), 0.9), np.full((1, 40), 0.1))
    assert sorted(k for k in wide.metrics if k.startswith("flip_label_")) == sorted(
        f"flip_label_{j}" for j in range(PER_LABEL_CAP))
    assert wide.severity[0] == 1.0 and wide.metrics["hamming"][0] == 40.0


def test_multilabel_probabilities_outside_0_1_are_problems():
    kind = make_kind("multilabel", {})
    d = kind.diffs(np.array([[0.2, 0.9], [0.2, 0.9]]), np.array([[1.3, 0.9], [0.2, 0.9]]))
    assert d.error[0].startswith("candidate label probabilities outside [0, 1] (from 0.9 to 1.3)")
    assert d.error[1] == "" and not d.disagree[0] and np.isnan(d.metrics["flip_label_0"][0])
    assert list(kind.baseline_problems(np.array([[0.2, 0.9], [-2.0, 3.0]]))) == [1]
    assert make_kind("multilabel", {"from_logits": True}).baseline_problems(np.array([[-2.0, 3.0]])) == {}


# -- ranking --------------------------------------------------------------------------------------
def test_ranking_hand_rows():
    kind = make_kind("ranking", {"k": 4, "min_overlap": 0.6})
    b = np.array([[6.0, 5, 4, 3, 2, 1], [6.0, 5, 4, 3, 2, 1]])
    c = np.array([[6.0, 5, 1, 4, 3, 2], [1.0, 2, 3, 4, 5, 6]])
    d = kind.diffs(b, c)
    np.testing.assert_allclose(d.metrics["overlap_at_k"], [0.75, 0.5])
    assert d.disagree.tolist() == [False, True]
    np.testing.assert_allclose(d.severity, [0.25, 0.5])
    np.testing.assert_allclose(d.metrics["kendall_tau_at_k"], [2 / 3, -1.0])
    ideal = 4 + 3 / LOG2_3 + 2 / 2 + 1 / LOG2_5
    # row 0 lists items 0, 1, 3, 4 (relevance 4, 3, 1, 0); row 1 lists 5, 4, 3, 2 (0, 0, 1, 2)
    np.testing.assert_allclose(d.metrics["ndcg_at_k"], [(4 + 3 / LOG2_3 + 1 / 2) / ideal,
                                                        (1 / 2 + 2 / LOG2_5) / ideal])
    assert d.baseline_label.tolist() == [0, 0] and d.candidate_label.tolist() == [0, 5]
    np.testing.assert_allclose(d.candidate_summary, [6.0, 6.0])


def test_ranking_threshold_counts_items_and_short_lists():
    kind = make_kind("ranking", {})  # k = 10, min_overlap = 0.8
    b = np.tile(np.arange(20.0)[::-1], (4, 1))
    c = b.copy()
    for row, m in enumerate([0, 1, 2, 3]):  # exchange m of the top ten with items outside it
        for j in range(m):
            c[row, [j, 10 + j]] = c[row, [10 + j, j]]
    d = kind.diffs(b, c)
    np.testing.assert_allclose(d.metrics["overlap_at_k"], [1.0, 0.9, 0.8, 0.7])
    assert d.disagree.tolist() == [False, False, False, True]
    short = kind.diffs(np.array([[3.0, 2.0, 1.0]]), np.array([[1.0, 2.0, 3.0]]))
    assert short.metrics["overlap_at_k"][0] == 1.0 and short.metrics["kendall_tau_at_k"][0] == -1.0
    ties = make_kind("ranking", {"k": 2}).diffs(np.array([[1.0, 3.0, 3.0, 0.0]]), np.array([[1.0, 3.0, 3.0, 0.0]]))
    assert ties.baseline_label.tolist() == [1] and ties.severity[0] == 0.0, "equal scores: lower index first"


def test_ranking_kendall_tau_in_chunks_matches_one_pass(monkeypatch):
    from scorers.kinds import ranking

    rng = np.random.default_rng(3)
    scores = rng.random((50, 7))
    whole = ranking.kendall_tau_rows(scores)
    monkeypatch.setattr(ranking, "PAIR_CELLS_PER_CHUNK", 21 * 3)  # three rows a chunk
    np.testing.assert_array_equal(ranking.kendall_tau_rows(scores), whole)
    for i in range(5):  # no ties: tau-a here is scipy's tau-b
        np.testing.assert_allclose(whole[i], stats.kendalltau(-np.arange(7), scores[i]).statistic)


# -- embeddings -----------------------------------------------------------------------------------
def test_embedding_hand_rows():
    kind = make_kind("embedding", {})
    d = kind.diffs(np.array([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0], [3.0, 4.0]]),
                   np.array([[0.0, 1.0], [2.0, 2.0], [-3.0, -4.0], [3.0, 4.0]]))
    np.testing.assert_allclose(d.metrics["cosine_similarity"], [0.0, 1.0, -1.0, 1.0], atol=1e-15)
    assert d.disagree.tolist() == [True, False, True, False]
    np.testing.assert_allclose(d.severity, [0.5, 0.0, 1.0, 0.0], atol=1e-15)
    assert d.severity[3] == 0.0, "identical rows are exactly 0"
    np.testing.assert_allclose(d.metrics["norm_ratio"], [1.0, 2.0, 1.0, 1.0])
    np.testing.assert_allclose(d.baseline_summary, [1.0, math.sqrt(2), 5.0, 5.0])


def test_embedding_zero_vectors():
    kind = make_kind("embedding", {"min_similarity": 0.5})
    d = kind.diffs(np.array([[1.0, 2.0], [0.0, 0.0]]), np.array([[0.0, 0.0], [1.0, 1.0]]))
    assert d.error.tolist() == ["candidate embedding is the zero vector (it has no direction)",
                                "baseline embedding is the zero vector (it has no direction)"]
    assert d.baseline_summary[0] == math.sqrt(5) and np.isnan(d.baseline_summary[1])
    assert kind.baseline_problems(np.array([[0.0, 0.0], [1.0, 0.0]])) == {
        0: "baseline embedding is the zero vector (it has no direction)"}


# -- kind_params ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "params", "message"), [
    ("regresion", {}, r"unknown output kind 'regresion'; allowed: classification, regression, multilabel, "
                      r"ranking, embedding"),
    ("regression", {"tolerance": 0.1}, r"regression kind_params: unknown parameter 'tolerance'; allowed: "
                                       r"abs_tolerance, rel_tolerance"),
    ("regression", {"rel_tolerance": -0.1}, r"rel_tolerance must be a number in \[0, inf\), got -0.1"),
    ("regression", {"abs_tolerance": 0, "rel_tolerance": 0}, r"both 0"),
    ("regression", {"abs_tolerance": float("nan")}, r"abs_tolerance must be a number"),
    ("classification", {"from_logits": "yes"}, r"from_logits must be true or false, got 'yes'"),
    ("classification", {"top_k": 0}, r"top_k must be a whole number >= 1, got 0"),
    ("multilabel", {"threshold": 1.0}, r"threshold must be a number in \(0, 1\), got 1.0"),
    ("ranking", {"k": 2.5}, r"k must be a whole number >= 1"),
    ("ranking", {"min_overlap": 0}, r"min_overlap must be a number in \(0, 1\]"),
    ("embedding", {"min_similarity": True}, r"min_similarity must be a number in \(-1, 1\], got True"),
])  # fmt: skip
def test_bad_kind_params_are_one_line_value_errors(name, params, message):
    with pytest.raises(ValueError, match=message) as err:
        make_kind(name, params)
    assert "\n" not in str(err.value)


def test_params_reach_the_kind():
    assert make_kind("ranking", {"k": 5}).k == 5 and make_kind("ranking", None).k == 10
    assert make_kind("regression", {"abs_tolerance": 2}).abs_tolerance == 2.0


# -- one interface --------------------------------------------------------------------------------
def _answers(name: str, rng: np.random.Generator, n: int, width: int) -> np.ndarray:
    if name == "classification":
        return rng.dirichlet(np.ones(width), n)
    if name == "multilabel":
        return rng.random((n, width))
    return rng.normal(size=(n, width))


@pytest.mark.parametrize("name", KIND_NAMES)
def test_every_kind_conforms(name):
    assert set(KIND_NAMES) == {"classification", "regression", "multilabel", "ranking", "embedding"}
    kind_cls = KINDS[name]
    assert kind_cls.name == name and kind_cls.disagree_doc and kind_cls.severity_doc and kind_cls.metric_docs
    kind = make_kind(name, {})
    rng = np.random.default_rng(7)
    n, width = 60, 20  # more than ranking's k = 10, so its lists can differ
    b, c = _answers(name, rng, n, width), _answers(name, rng, n, width)
    c[3, 1], c[4, 0], b[5, 2] = np.nan, np.inf, np.nan
    assert list(kind.baseline_problems(b)) == [5]
    d = kind.diffs(b, c)
    assert isinstance(d, KindDiffs) and len(d) == n
    for f in ("disagree", "severity", "baseline_summary", "candidate_summary", "baseline_label", "candidate_label",
              "error"):  # fmt: skip
        assert getattr(d, f).shape == (n,), f
    assert d.disagree.dtype == bool and d.severity.dtype == np.float64
    assert d.baseline_label.dtype == np.int64 and d.candidate_label.dtype == np.int64
    assert d.error.dtype == object and d.error[3].startswith("candidate") and d.error[4].startswith("candidate")
    assert d.error[5].startswith("baseline")
    bad = ~d.ok
    assert bad.tolist() == [i in (3, 4, 5) for i in range(n)]
    assert np.isnan(d.severity[bad]).all() and not d.disagree[bad].any() and (d.candidate_label[bad] == -1).all()
    assert np.isnan(d.candidate_summary[bad]).all() and np.isfinite(d.baseline_summary[[3, 4]]).all()
    ok_severity = d.severity[~bad]
    assert ((ok_severity >= 0) & (ok_severity <= 1)).all()
    assert d.disagree[~bad].any(), "independent random answers disagree somewhere"
    assert set(d.metrics) <= set(kind_cls.metric_docs) and d.metrics
    for values in d.metrics.values():
        assert values.shape == (n,) and values.dtype == np.float64
        assert np.isnan(values[bad]).all() and np.isfinite(values[~bad]).all()
    same = kind.diffs(b, b)
    assert not same.disagree.any() and (np.nan_to_num(same.severity[same.ok]) == 0).all()
    empty = kind.diffs(np.zeros((0, width)), np.zeros((0, width)))
    assert len(empty) == 0 and empty.error.shape == (0,)
