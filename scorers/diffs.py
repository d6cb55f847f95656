"""Per-request paired diffs between a baseline and a candidate answer to the *same* input.

Everything is vectorised over a batch. A row the candidate could not answer usefully (NaN / Inf, wrong
shape, not a probability vector) is *counted* as an error with a human-readable reason in ``error`` and
gets NaN metrics; it is never dropped and never averaged into the diff metrics (the accumulator counts
it in ``error_rate`` instead).

Conventions (fixed, documented):

* classification rows are probability vectors, or logits with ``from_logits=True`` (softmax per row);
  a single column ``(n, 1)`` is the positive-class probability (or logit) of a binary model and is
  expanded to ``[1 - p, p]``;
* probabilities must be finite, >= -1e-6 and sum to 1 within ``1e-3``; otherwise the row is an error,
  because silently renormalising would hide a broken export (e.g. a missing softmax);
* a 1-D numeric array is one row; a list of 1-D arrays is one row each and may be ragged
  (per-row shape mismatches become errors);
* ``confidence_delta`` is the candidate's probability of the *baseline's* top class minus the baseline's
  own top probability (negative = candidate less sure of production's answer);
* ``hellinger`` is ``sqrt(1/2 * sum (sqrt p - sqrt q)^2)`` in [0, 1]; ``l1`` is in [0, 2].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

PROB_SUM_TOLERANCE = 1e-3
PROB_NEGATIVE_TOLERANCE = 1e-6
_CLASSIFICATION_FIELDS = (
    "baseline_label", "candidate_label", "label_flip", "confidence_delta",
    "l1", "linf", "hellinger", "topk_overlap", "error",
)


@dataclass(eq=False)
class ClassificationDiffs:
    """Column-wise diffs for n rows; ``error[i] == ""`` when row i was scored."""

    baseline_label: np.ndarray  # (n,) int64, -1 when the baseline row itself is unusable
    candidate_label: np.ndarray  # (n,) int64, -1 on error
    label_flip: np.ndarray  # (n,) bool, False on error (errors are counted separately)
    confidence_delta: np.ndarray  # (n,) float64, NaN on error
    l1: np.ndarray
    linf: np.ndarray
    hellinger: np.ndarray
    topk_overlap: np.ndarray  # share of the baseline's top-k classes also in the candidate's top-k
    error: np.ndarray  # (n,) object array of str
    top_k: int = 3
    # True when every row was found usable by the whole-batch checks (``_usable``): no row is an
    # error. False says nothing (a concatenation or a subset, or some row may be an error).
    all_ok: bool = False

    @property
    def ok(self) -> np.ndarray:
        return self.error == ""

    def __len__(self) -> int:
        return int(self.baseline_label.shape[0])

    @classmethod
    def empty(cls, n: int, top_k: int = 3) -> ClassificationDiffs:
        nan = np.full(n, np.nan)
        return cls(
            baseline_label=np.full(n, -1, np.int64), candidate_label=np.full(n, -1, np.int64),
            label_flip=np.zeros(n, bool), confidence_delta=nan.copy(), l1=nan.copy(), linf=nan.copy(),
            hellinger=nan.copy(), topk_overlap=nan.copy(), error=np.full(n, "", dtype=object), top_k=top_k,
        )

    @classmethod
    def concat(cls, parts: list[ClassificationDiffs]) -> ClassificationDiffs:
        if not parts:
            return cls.empty(0)
        kw = {f: np.concatenate([getattr(p, f) for p in parts]) for f in _CLASSIFICATION_FIELDS}
        return cls(**kw, top_k=parts[0].top_k)

    def take(self, index: np.ndarray) -> ClassificationDiffs:
        kw = {f: getattr(self, f)[index] for f in _CLASSIFICATION_FIELDS}
        return type(self)(**kw, top_k=self.top_k)


def _as_rows(x) -> tuple[np.ndarray | None, list[np.ndarray] | None]:
    """A dense (n, k) float array when possible, else a list of per-row float arrays (ragged input)."""
    if isinstance(x, np.ndarray) and x.dtype != object:
        arr = x.astype(np.float64, copy=False)
        if arr.ndim == 1:
            arr = arr[None, :]
        elif arr.ndim > 2:
            arr = arr.reshape(arr.shape[0], -1)
        return arr, None
    rows = [np.asarray(r, dtype=np.float64) for r in x]
    shapes = {r.shape for r in rows}
    if len(shapes) == 1 and next(iter(shapes)) != () and len(next(iter(shapes))) == 1:
        return (np.stack(rows) if rows else np.zeros((0, 0))), None
    if rows and all(r.ndim == 0 for r in rows):  # a plain list of numbers is one row
        return np.asarray(rows, dtype=np.float64)[None, :], None
    return None, rows


def _expand_binary(p: np.ndarray, from_logits: bool) -> np.ndarray:
    if p.shape[1] != 1:
        return p
    pos = p[:, 0]
    if from_logits:
        with np.errstate(over="ignore"):
            pos = 1.0 / (1.0 + np.exp(-pos))
    out = np.stack([1.0 - pos, pos], axis=1)
    return np.log(np.clip(out, 1e-300, None)) if from_logits else out


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _row_masks(x: np.ndarray, from_logits: bool) -> dict[str, np.ndarray]:
    """Boolean problem masks per row; NaN wins over Inf wins over not-a-distribution."""
    finite_rows = np.isfinite(x).all(axis=1)
    if finite_rows.all():  # the common case: one pass instead of two
        nan = inf = np.zeros(x.shape[0], dtype=bool)
    else:
        nan = np.isnan(x).any(axis=1)
        inf = ~finite_rows & ~nan
    masks = {"nan": nan, "inf": inf}
    if not from_logits and x.shape[1] > 0:
        finite = ~(nan | inf)
        with np.errstate(invalid="ignore"):
            neg = (x < -PROB_NEGATIVE_TOLERANCE).any(axis=1) & finite
            masks["neg"] = neg
            masks["sum"] = (np.abs(x.sum(axis=1) - 1.0) > PROB_SUM_TOLERANCE) & finite & ~neg
    if x.shape[1] == 0:
        masks["empty"] = np.ones(x.shape[0], dtype=bool)
    return masks


def _reasons(x: np.ndarray, who: str, masks: dict[str, np.ndarray], out: np.ndarray) -> None:
    """Write the reason of each bad row into ``out`` (only where ``out`` is still empty)."""
    free = out == ""
    texts = {"nan": f"{who} output has NaN", "inf": f"{who} output has Inf", "neg": f"{who} probabilities are negative",
             "empty": f"{who} output is empty"}
    for key, mask in masks.items():
        rows = np.flatnonzero(mask & free)
        if key == "sum":
            sums = x[rows].sum(axis=1)
            for i, total in zip(rows, sums, strict=True):
                out[i] = f"{who} probabilities sum to {total:.4g}, not 1"
        else:
            out[rows] = texts[key]
        free[rows] = False


def _usable(x: np.ndarray, from_logits: bool) -> bool:
    """Whether every row passes ``_row_masks``, from a few whole-batch reductions (the usual batch:
    a replayed micro-batch has no bad row). A row's sum is finite only when each of its values is
    (NaN and Inf propagate; finite values that overflow the sum only send the batch to the
    row-by-row checks), and then a row is a distribution iff its smallest value and its sum are
    within the tolerances."""
    if x.shape[0] == 0 or x.shape[1] == 0:
        return False
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow or Inf - Inf is an answer here
        sums = x.sum(axis=1)
    if not np.isfinite(sums).all():
        return False
    if from_logits:
        return True
    return bool(x.min() >= -PROB_NEGATIVE_TOLERANCE and np.abs(sums - 1.0).max() <= PROB_SUM_TOLERANCE)


def _row_problems(x: np.ndarray, who: str, from_logits: bool) -> np.ndarray:
    """Reason per row ("" when usable)."""
    out = np.full(x.shape[0], "", dtype=object)
    _reasons(x, who, _row_masks(x, from_logits), out)
    return out


def _score_dense(b: np.ndarray, c: np.ndarray, from_logits: bool, top_k: int) -> ClassificationDiffs:
    """Both (m, k) with the same k: the vectorised core. Metrics are computed on every row (no
    boolean-index copies, which dominate at 1M rows) and then blanked on error rows."""
    m, k = b.shape
    out = ClassificationDiffs.empty(m, top_k)
    if _usable(b, from_logits) and _usable(c, from_logits):  # no row is an error: no masks to build or apply
        _fill_metrics(out, b, c, from_logits, top_k)
        out.all_ok = True
        return out
    mb, mc = _row_masks(b, from_logits), _row_masks(c, from_logits)
    bad_b = np.logical_or.reduce(list(mb.values())) if mb else np.zeros(m, bool)
    bad_c = np.logical_or.reduce(list(mc.values())) if mc else np.zeros(m, bool)
    bad = bad_b | bad_c
    if bad.any():
        _reasons(b, "baseline", mb, out.error)
        _reasons(c, "candidate", mc, out.error)
    if k == 0 or bad.all():
        if k and (~bad_b & bad_c).any():
            rows = ~bad_b & np.isfinite(b).all(axis=1)
            out.baseline_label[rows] = b[rows].argmax(axis=1)
        return out
    _fill_metrics(out, b, c, from_logits, top_k)
    if bad.any():
        for f in ("confidence_delta", "l1", "linf", "hellinger", "topk_overlap"):
            getattr(out, f)[bad] = np.nan
        out.candidate_label[bad] = -1
        out.label_flip[bad] = False
        out.baseline_label[bad_b] = -1
    return out


def _fill_metrics(out: ClassificationDiffs, b: np.ndarray, c: np.ndarray, from_logits: bool, top_k: int) -> None:
    """Every row's labels and metrics (error rows are blanked by the caller)."""
    m, k = b.shape
    with np.errstate(all="ignore"):
        if from_logits:
            bo, co = _softmax(b), _softmax(c)
        else:
            bo, co = np.maximum(b, 0.0), np.maximum(c, 0.0)
        bl = bo.argmax(axis=1)
        cl = co.argmax(axis=1)
        diff = np.abs(co - bo)
        out.baseline_label = bl.astype(np.int64)
        out.candidate_label = cl.astype(np.int64)
        out.label_flip = bl != cl
        out.confidence_delta = (np.take_along_axis(co, bl[:, None], 1) - np.take_along_axis(bo, bl[:, None], 1))[:, 0]
        out.l1 = diff.sum(axis=1)
        out.linf = diff.max(axis=1)
        out.hellinger = np.sqrt(np.clip(0.5 * np.square(np.sqrt(bo) - np.sqrt(co)).sum(axis=1), 0.0, 1.0))
        kk = max(1, min(top_k, k))
        if kk == k:
            out.topk_overlap = np.ones(m)
        else:  # partition on the raw values (no negated copy): the top kk sit in the last kk columns
            tb = np.argpartition(bo, k - kk, axis=1)[:, k - kk:]
            tc = np.argpartition(co, k - kk, axis=1)[:, k - kk:]
            if k <= 64 and hasattr(np, "bitwise_count"):  # class sets as 64-bit masks: AND + popcount
                one = np.uint64(1)
                sb = np.bitwise_or.reduce(one << tb.astype(np.uint64), axis=1)
                sc = np.bitwise_or.reduce(one << tc.astype(np.uint64), axis=1)
                out.topk_overlap = np.bitwise_count(sb & sc) / kk
            else:
                out.topk_overlap = (tb[:, :, None] == tc[:, None, :]).any(axis=2).sum(axis=1) / kk


def classification_diffs(baseline_probs, candidate_probs, *, from_logits: bool = False,
                         top_k: int = 3) -> ClassificationDiffs:
    """Paired diffs of two classifiers' outputs for the same n requests (see module doc)."""
    b, b_rows = _as_rows(baseline_probs)
    c, c_rows = _as_rows(candidate_probs)
    if b is not None and c is not None:
        if b.shape[0] != c.shape[0]:
            raise ValueError(f"baseline has {b.shape[0]} rows, candidate {c.shape[0]}: pair rows first")
        b, c = _expand_binary(b, from_logits), _expand_binary(c, from_logits)
        if b.shape == c.shape:
            return _score_dense(b, c, from_logits, top_k)
        out = ClassificationDiffs.empty(b.shape[0], top_k)
        out.error[:] = f"shape mismatch: baseline ({b.shape[1]},) candidate ({c.shape[1]},)"
        if np.isfinite(b).all() and b.shape[1] > 0:
            out.baseline_label[:] = b.argmax(axis=1)
        return out
    b_rows = b_rows if b_rows is not None else list(b)
    c_rows = c_rows if c_rows is not None else list(c)
    if len(b_rows) != len(c_rows):
        raise ValueError(f"baseline has {len(b_rows)} rows, candidate {len(c_rows)}: pair rows first")
    n = len(b_rows)
    out = ClassificationDiffs.empty(n, top_k)
    groups: dict[tuple, list[int]] = {}
    for i, (rb, rc) in enumerate(zip(b_rows, c_rows, strict=True)):
        if rb.shape != rc.shape or rb.ndim != 1:
            out.error[i] = f"shape mismatch: baseline {rb.shape} candidate {rc.shape}"
        else:
            groups.setdefault(rb.shape, []).append(i)
    for _, idx in groups.items():
        ix = np.asarray(idx)
        part = classification_diffs(np.stack([b_rows[i] for i in idx]), np.stack([c_rows[i] for i in idx]),
                                    from_logits=from_logits, top_k=top_k)
        for f in _CLASSIFICATION_FIELDS:
            getattr(out, f)[ix] = getattr(part, f)
    return out


@dataclass(eq=False)
class RegressionDiffs:
    """Per row and output: absolute and relative error of the candidate against the baseline."""

    abs_error: np.ndarray  # (n, m) float64, NaN on error rows
    rel_error: np.ndarray  # (n, m) |c - b| / max(|b|, rel_floor)
    error: np.ndarray  # (n,) object array of str
    rel_floor: float = 1e-9

    @property
    def ok(self) -> np.ndarray:
        return self.error == ""

    @property
    def max_abs_error(self) -> np.ndarray:
        """Worst output per row (NaN on error rows): the per-request score used for ranking."""
        out = np.full(len(self), np.nan)
        ok = self.ok
        if ok.any() and self.abs_error.shape[1]:
            out[ok] = self.abs_error[ok].max(axis=1)
        return out

    def __len__(self) -> int:
        return int(self.error.shape[0])


def regression_diffs(baseline, candidate, *, rel_floor: float = 1e-9) -> RegressionDiffs:
    """Absolute and relative error per output. ``rel_floor`` keeps the relative error finite when the
    baseline is 0 (it is then |c - b| / rel_floor, large on purpose: a change from exactly zero)."""
    b = np.asarray(baseline, dtype=np.float64)
    c = np.asarray(candidate, dtype=np.float64)
    b = b[:, None] if b.ndim == 1 else b.reshape(b.shape[0], -1)
    c = c[:, None] if c.ndim == 1 else c.reshape(c.shape[0], -1)
    if b.shape[0] != c.shape[0]:
        raise ValueError(f"baseline has {b.shape[0]} rows, candidate {c.shape[0]}: pair rows first")
    n = b.shape[0]
    if b.shape != c.shape:
        err = np.full(n, f"shape mismatch: baseline ({b.shape[1]},) candidate ({c.shape[1]},)", dtype=object)
        nan = np.full((n, b.shape[1]), np.nan)
        return RegressionDiffs(nan, nan.copy(), err, rel_floor)
    err_b = _row_problems(b, "baseline", from_logits=True)  # from_logits=True: skip probability checks
    err_c = _row_problems(c, "candidate", from_logits=True)
    error = np.where(err_b != "", err_b, err_c).astype(object)
    ok = error == ""
    abs_err = np.full(b.shape, np.nan)
    rel_err = np.full(b.shape, np.nan)
    abs_err[ok] = np.abs(c[ok] - b[ok])
    rel_err[ok] = abs_err[ok] / np.maximum(np.abs(b[ok]), rel_floor)
    return RegressionDiffs(abs_err, rel_err, error, rel_floor)


@dataclass(eq=False)
class MultiOutputDiffs:
    """Diffs per named output; a row is an error when any output of it is (first reason, prefixed)."""

    outputs: dict[str, ClassificationDiffs | RegressionDiffs] = field(default_factory=dict)
    error: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))

    @property
    def ok(self) -> np.ndarray:
        return self.error == ""

    def __len__(self) -> int:
        return int(self.error.shape[0])


def multi_output_diffs(baseline: Mapping[str, object], candidate: Mapping[str, object],
                       kinds: Mapping[str, str], *, from_logits: bool = False, top_k: int = 3) -> MultiOutputDiffs:
    """``kinds`` maps each output name to "classification" or "regression"."""
    n = None
    for v in baseline.values():
        n = len(np.asarray(v)) if not isinstance(v, list) else len(v)
        break
    n = n or 0
    error = np.full(n, "", dtype=object)
    outputs: dict[str, ClassificationDiffs | RegressionDiffs] = {}
    for name, kind in kinds.items():
        if name not in baseline:
            raise KeyError(f"baseline has no output {name!r}")
        if name not in candidate:
            error[error == ""] = f"{name}: candidate output {name!r} missing"
            continue
        if kind == "classification":
            d = classification_diffs(baseline[name], candidate[name], from_logits=from_logits, top_k=top_k)
        elif kind == "regression":
            d = regression_diffs(baseline[name], candidate[name])
        else:
            raise ValueError(f"unknown output kind {kind!r} for {name!r}")
        outputs[name] = d
        fresh = (error == "") & (d.error != "")
        error[fresh] = np.char.add(f"{name}: ", d.error[fresh].astype(str)) if fresh.any() else error[fresh]
    return MultiOutputDiffs(outputs, error)
