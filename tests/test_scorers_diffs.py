"""Paired per-request diffs: hand fixtures, error accounting, and properties."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from scorers.diffs import classification_diffs, multi_output_diffs, regression_diffs


def test_hand_fixture_two_rows():
    b = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    c = np.array([[0.5, 0.4, 0.1], [0.1, 0.3, 0.6]])
    d = classification_diffs(b, c, top_k=1)
    assert d.baseline_label.tolist() == [0, 1]
    assert d.candidate_label.tolist() == [0, 2]
    assert d.label_flip.tolist() == [False, True]
    np.testing.assert_allclose(d.confidence_delta, [-0.2, -0.3])
    np.testing.assert_allclose(d.l1, [0.4, 0.6])
    np.testing.assert_allclose(d.linf, [0.2, 0.3])
    h0 = np.sqrt(0.5 * ((np.sqrt(0.7) - np.sqrt(0.5)) ** 2 + (np.sqrt(0.2) - np.sqrt(0.4)) ** 2))
    np.testing.assert_allclose(d.hellinger[0], h0)
    np.testing.assert_allclose(d.topk_overlap, [1.0, 0.0])
    assert d.ok.all() and len(d) == 2 and d.error.tolist() == ["", ""]


def test_topk_overlap_partial():
    b = np.array([[0.4, 0.3, 0.2, 0.1]])
    c = np.array([[0.4, 0.1, 0.2, 0.3]])
    assert classification_diffs(b, c, top_k=2).topk_overlap[0] == pytest.approx(0.5)
    assert classification_diffs(b, c, top_k=3).topk_overlap[0] == pytest.approx(2 / 3)


def test_errors_are_counted_with_reasons_never_averaged():
    b = np.tile([0.5, 0.3, 0.2], (4, 1))
    c = np.array([[np.nan, 0.5, 0.5], [np.inf, 0, 0], [0.5, 0.3, 0.2], [0.9, 0.9, 0.9]])
    d = classification_diffs(b, c)
    assert d.error.tolist() == ["candidate output has NaN", "candidate output has Inf", "",
                                "candidate probabilities sum to 2.7, not 1"]
    assert d.ok.tolist() == [False, False, True, False]
    assert d.candidate_label.tolist() == [-1, -1, 0, -1]
    assert d.baseline_label.tolist() == [0, 0, 0, 0]  # production's answer is still known
    assert not d.label_flip[~d.ok].any()
    assert np.isnan(d.l1[~d.ok]).all() and d.l1[2] == 0


def test_shape_mismatch_dense_and_ragged():
    d = classification_diffs(np.full((3, 10), 0.1), np.full((3, 9), 1 / 9))
    assert set(d.error.tolist()) == {"shape mismatch: baseline (10,) candidate (9,)"}
    rows_b = [np.full(10, 0.1), np.full(10, 0.1), np.array([0.2, 0.8])]
    rows_c = [np.full(9, 1 / 9), np.full(10, 0.1), np.array([0.8, 0.2])]
    d = classification_diffs(rows_b, rows_c)
    assert d.error[0] == "shape mismatch: baseline (10,) candidate (9,)"
    assert d.ok[1:].all() and d.label_flip.tolist() == [False, False, True]


def test_baseline_problem_is_reported_as_baseline():
    d = classification_diffs(np.array([[np.nan, 1.0]]), np.array([[0.0, 1.0]]))
    assert d.error[0] == "baseline output has NaN" and d.baseline_label[0] == -1


def test_logits_and_binary_columns():
    z = np.array([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    d_logit = classification_diffs(z, z[:, ::-1], from_logits=True)
    d_prob = classification_diffs(p, p[:, ::-1])
    np.testing.assert_allclose(d_logit.l1, d_prob.l1)
    pos_b, pos_c = np.array([[0.9], [0.2]]), np.array([[0.4], [0.1]])
    d = classification_diffs(pos_b, pos_c)
    assert d.label_flip.tolist() == [True, False]
    np.testing.assert_allclose(d.l1, [1.0, 0.2])
    dl = classification_diffs(np.log(pos_b / (1 - pos_b)), np.log(pos_c / (1 - pos_c)), from_logits=True)
    np.testing.assert_allclose(dl.l1, [1.0, 0.2])


def test_one_dimensional_input_is_one_row():
    d = classification_diffs(np.array([0.6, 0.4]), [0.4, 0.6])
    assert len(d) == 1 and d.label_flip[0]


def test_row_count_mismatch_raises():
    with pytest.raises(ValueError, match="pair rows first"):
        classification_diffs(np.full((2, 2), 0.5), np.full((3, 2), 0.5))


probs = hnp.arrays(np.float64, st.tuples(st.integers(1, 20), st.integers(2, 6)),
                   elements=st.floats(0.01, 1.0)).map(lambda a: a / a.sum(1, keepdims=True))


@settings(max_examples=60, deadline=None)
@given(probs, st.data())
def test_properties(b, data):
    c = data.draw(hnp.arrays(np.float64, b.shape, elements=st.floats(0.01, 1.0)))
    c = c / c.sum(1, keepdims=True)
    same = classification_diffs(b, b)
    assert not same.label_flip.any() and np.allclose(same.l1, 0) and np.allclose(same.hellinger, 0)
    d = classification_diffs(b, c)
    rev = classification_diffs(c, b)
    np.testing.assert_allclose(d.l1, rev.l1)
    np.testing.assert_allclose(d.hellinger, rev.hellinger, atol=1e-12)
    assert ((d.l1 >= 0) & (d.l1 <= 2 + 1e-12)).all() and ((d.hellinger >= 0) & (d.hellinger <= 1)).all()
    assert (d.linf <= d.l1 + 1e-12).all() and (np.abs(d.confidence_delta) <= d.linf + 1e-12).all()
    assert ((d.topk_overlap >= 0) & (d.topk_overlap <= 1)).all()
    np.testing.assert_array_equal(d.label_flip, b.argmax(1) != c.argmax(1))
    # splitting the batch changes nothing (pure per-row function)
    k = b.shape[0] // 2
    parts = [classification_diffs(b[:k], c[:k]), classification_diffs(b[k:], c[k:])]
    np.testing.assert_allclose(np.concatenate([p.l1 for p in parts]), d.l1)



@settings(max_examples=60, deadline=None)
@given(probs, st.data(), st.booleans(), st.integers(1, 4))
def test_whole_batch_checks_agree_with_row_checks(b, data, from_logits, top_k):
    """A batch whose rows are all usable is scored without per-row masks (``all_ok``); with one bad
    row added it takes the row-by-row path. The usable rows come out identical either way, through
    the classification kind too (its summaries and labels)."""
    from scorers.kinds.classification import ClassificationKind

    c = data.draw(hnp.arrays(np.float64, b.shape, elements=st.floats(0.01, 1.0)))
    c = c / c.sum(1, keepdims=True)
    if from_logits:
        b, c = np.log(b), np.log(c)
    fast = classification_diffs(b, c, from_logits=from_logits, top_k=top_k)
    assert fast.all_ok and fast.ok.all()
    bad = np.vstack([c, np.full((1, c.shape[1]), np.nan)])
    slow = classification_diffs(np.vstack([b, b[:1]]), bad, from_logits=from_logits, top_k=top_k)
    assert not slow.all_ok and slow.error.tolist() == [""] * len(b) + ["candidate output has NaN"]
    for name in ("baseline_label", "candidate_label", "label_flip", "confidence_delta", "l1", "linf", "hellinger",
                 "topk_overlap", "error"):
        np.testing.assert_array_equal(getattr(slow, name)[: len(b)], getattr(fast, name), err_msg=name)
    kind = ClassificationKind(from_logits=from_logits, top_k=top_k)
    kf, ks = kind.diffs(b, c), kind.diffs(np.vstack([b, b[:1]]), bad)
    for name in ("disagree", "severity", "baseline_summary", "candidate_summary", "baseline_label", "candidate_label"):
        np.testing.assert_array_equal(getattr(ks, name)[: len(b)], getattr(kf, name), err_msg=name)
    assert np.isnan(ks.candidate_summary[-1]) and ks.baseline_label[-1] == kf.baseline_label[0]


def test_whole_batch_checks_send_any_bad_row_to_row_checks():
    """Each kind of bad row, alone in a batch of good ones, is found (never ``all_ok``)."""
    good = np.tile([0.5, 0.3, 0.2], (4, 1))
    for row, reason in (([np.nan, 0.5, 0.5], "NaN"), ([np.inf, -np.inf, 1.0], "Inf"), ([1e308, 1e308, -1e308], "sum"),
                        ([0.6, 0.6, -0.2], "negative"), ([0.5, 0.3, 0.1], "sum to 0.9")):  # fmt: skip
        c = good.copy()
        c[2] = row
        d = classification_diffs(good, c)
        assert not d.all_ok and d.error[2] != "" and (d.error[[0, 1, 3]] == "").all(), (row, reason, d.error)

def test_regression_diffs():
    b = np.array([[1.0, 0.0], [2.0, -4.0], [1.0, 1.0]])
    c = np.array([[1.5, 0.0], [2.0, -2.0], [np.nan, 1.0]])
    d = regression_diffs(b, c)
    np.testing.assert_allclose(d.abs_error[:2], [[0.5, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(d.rel_error[:2], [[0.5, 0.0], [0.0, 0.5]])
    assert d.error.tolist() == ["", "", "candidate output has NaN"]
    np.testing.assert_allclose(d.max_abs_error[:2], [0.5, 2.0])
    assert np.isnan(d.max_abs_error[2])
    one = regression_diffs([1.0, 2.0], [1.0, 3.0])
    assert one.abs_error.shape == (2, 1)
    assert set(regression_diffs(b, c[:, :1]).error.tolist()) == {"shape mismatch: baseline (2,) candidate (1,)"}


def test_multi_output():
    b = {"cls": np.array([[0.9, 0.1], [0.2, 0.8]]), "score": np.array([1.0, 2.0])}
    c = {"cls": np.array([[0.1, 0.9], [0.2, 0.8]]), "score": np.array([1.0, np.inf])}
    d = multi_output_diffs(b, c, {"cls": "classification", "score": "regression"})
    assert d.error.tolist() == ["", "score: candidate output has Inf"]
    assert d.outputs["cls"].label_flip.tolist() == [True, False]
    missing = multi_output_diffs(b, {"cls": c["cls"]}, {"cls": "classification", "score": "regression"})
    assert (missing.error == "score: candidate output 'score' missing").all()
