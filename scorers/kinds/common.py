"""What every output kind shares: answers as (n, width) rows, the paired driver that turns unusable
rows into candidate errors (counted, never dropped), and the checks of ``kind_params``.

Answers (fixed, documented):

* a 2-D numeric array is n answers of ``width`` values; a 1-D numeric array is n answers of one value
  (n scalars); more dimensions are flattened per row (an ``(n, 1, d)`` embedding is ``(n, d)``);
* a list (or object array) of rows may be ragged: rows are grouped by width and each group is
  scored as one dense block, so the per-request cost stays vectorised;
* the baseline's row sets the width: a candidate row of another width is a candidate error
  ("candidate answers 3 values, baseline 4"), as is a candidate row with NaN or Inf;
* a row whose *baseline* answer is unusable is refused by ``baseline_problems`` before scoring (a
  ``baseline_invalid`` dead letter). ``diffs`` still returns a row for it (error text starting with
  "baseline", NaN everywhere), so it is the caller's job to refuse it first.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from scorers.diffs import _row_problems
from scorers.kinds.base import KindDiffs


def as_rows(x) -> np.ndarray | list[np.ndarray]:
    """(n, width) float64 when the answers are rectangular, else a list of per-row 1-D arrays."""
    if isinstance(x, np.ndarray) and x.dtype != object:
        a = x.astype(np.float64, copy=False)
        if a.ndim == 0:
            raise ValueError("answers must be (n, width) rows, got a single number")
        if a.ndim == 1:
            return a[:, None]
        return a.reshape(a.shape[0], -1) if a.ndim > 2 else a
    rows = [np.asarray(r, dtype=np.float64).reshape(-1) for r in x]
    if len({r.shape[0] for r in rows}) <= 1:
        return np.stack(rows) if rows else np.zeros((0, 0))
    return rows


def by_width(rows: list[np.ndarray]) -> dict[int, np.ndarray]:
    """Width -> indices of the rows that have it (the ragged path's groups)."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.shape[0], []).append(i)
    return {w: np.asarray(ix) for w, ix in groups.items()}


def empty_diffs(n: int, metric_names) -> KindDiffs:
    """n rows with nothing scored: NaN values, -1 labels, no disagreement, no error text yet."""
    nan = np.full(n, np.nan)
    return KindDiffs(
        disagree=np.zeros(n, bool), severity=nan.copy(), baseline_summary=nan.copy(),
        candidate_summary=nan.copy(), baseline_label=np.full(n, -1, np.int64),
        candidate_label=np.full(n, -1, np.int64), error=np.full(n, "", dtype=object),
        metrics={name: nan.copy() for name in metric_names},
    )


def put_rows(out: KindDiffs, index: np.ndarray, part: KindDiffs) -> None:
    """Copy ``part`` (one group's rows) into ``out`` at ``index``; a metric the group lacks stays NaN."""
    for f in ("disagree", "severity", "baseline_summary", "candidate_summary", "baseline_label",
              "candidate_label", "error"):  # fmt: skip
        getattr(out, f)[index] = getattr(part, f)
    for name, values in part.metrics.items():
        if name not in out.metrics:
            out.metrics[name] = np.full(len(out), np.nan)
        out.metrics[name][index] = values


def nonfinite_problems(x: np.ndarray, who: str) -> np.ndarray:
    """Reason per row ("" when usable): NaN, Inf or no values at all (scorers.diffs' checks)."""
    return _row_problems(x, who, from_logits=True)  # from_logits: no probability-vector checks


class PairedKind:
    """The driver behind every kind but classification (which wraps ``scorers.diffs``).

    A subclass says what a usable row is (``_problems``), what the baseline's row alone gives
    (``_baseline_side``), and scores a dense block of equal-width rows (``_score``, computed on every
    row, bad ones included, then blanked here: no boolean-index copies on the common path)."""

    name: ClassVar[str]
    metric_docs: ClassVar[dict[str, str]]

    def metric_names(self, width: int) -> list[str]:
        """The metrics a block of this width carries (multi-label's per-label flips depend on it)."""
        return list(self.metric_docs)

    def _problems(self, x: np.ndarray, who: str) -> np.ndarray:
        return nonfinite_problems(x, who)

    def _baseline_side(self, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _score(self, b: np.ndarray, c: np.ndarray) -> KindDiffs:
        raise NotImplementedError

    def baseline_problems(self, baseline) -> dict[int, str]:
        b = as_rows(baseline)
        if isinstance(b, np.ndarray):
            reasons = self._problems(b, "baseline")
            return {int(i): str(reasons[i]) for i in np.flatnonzero(reasons != "")}
        out: dict[int, str] = {}
        for w, ix in by_width(b).items():
            reasons = self._problems(np.stack([b[i] for i in ix]).reshape(len(ix), w), "baseline")
            out.update({int(ix[j]): str(reasons[j]) for j in np.flatnonzero(reasons != "")})
        return dict(sorted(out.items()))

    def diffs(self, baseline, candidate) -> KindDiffs:
        b, c = as_rows(baseline), as_rows(candidate)
        if len(b) != len(c):
            raise ValueError(f"baseline has {len(b)} rows, candidate {len(c)}: pair rows first")
        if isinstance(b, np.ndarray) and isinstance(c, np.ndarray):
            return self._dense(b, c) if b.shape[1] == c.shape[1] else self._mismatch(b, c.shape[1])
        b_rows, c_rows = list(b), list(c)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (rb, rc) in enumerate(zip(b_rows, c_rows, strict=True)):
            groups.setdefault((rb.shape[0], rc.shape[0]), []).append(i)
        out = empty_diffs(len(b_rows), [])
        for (wb, wc), idx in groups.items():
            bb = np.stack([b_rows[i] for i in idx]).reshape(len(idx), wb)
            cc = np.stack([c_rows[i] for i in idx]).reshape(len(idx), wc)
            put_rows(out, np.asarray(idx), self._dense(bb, cc) if wb == wc else self._mismatch(bb, wc))
        return out

    def _mismatch(self, b: np.ndarray, width: int) -> KindDiffs:
        """Every row a candidate error: the candidate answered ``width`` values, the baseline others."""
        out = empty_diffs(b.shape[0], self.metric_names(b.shape[1]))
        bad_b = self._problems(b, "baseline")
        out.error[:] = f"candidate answers {width} values, baseline {b.shape[1]}"
        out.error[bad_b != ""] = bad_b[bad_b != ""]
        self._fill_baseline(out, b, bad_b != "")
        return out

    def _fill_baseline(self, out: KindDiffs, b: np.ndarray, bad_b: np.ndarray) -> None:
        good = ~bad_b
        if good.any():
            with np.errstate(all="ignore"):
                summary, label = self._baseline_side(b[good])
            out.baseline_summary[good] = summary
            out.baseline_label[good] = label

    def _dense(self, b: np.ndarray, c: np.ndarray) -> KindDiffs:
        n, width = b.shape
        why_b, why_c = self._problems(b, "baseline"), self._problems(c, "candidate")
        bad_b, bad_c = why_b != "", why_c != ""
        bad = bad_b | bad_c
        if width == 0 or bad.all():
            out = empty_diffs(n, self.metric_names(width))
            self._fill_baseline(out, b, bad_b)
        else:
            with np.errstate(all="ignore"):
                out = self._score(b, c)
        if bad.any():
            out.error[:] = np.where(bad_b, why_b, why_c)  # the baseline's reason wins
            out.disagree[bad] = False
            out.severity[bad] = np.nan
            out.candidate_summary[bad] = np.nan
            out.candidate_label[bad] = -1
            out.baseline_summary[bad_b] = np.nan
            out.baseline_label[bad_b] = -1
            for values in out.metrics.values():
                values[bad] = np.nan
        return out


# -- kind_params ----------------------------------------------------------------------------------
def check_params(kind: str, params: dict[str, Any] | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """The defaults overridden by ``params``; an unknown name is a ValueError listing the allowed ones."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        allowed = ", ".join(defaults) or "none"
        raise ValueError(f"{kind} kind_params: unknown parameter {unknown[0]!r}; allowed: {allowed}")
    return {**defaults, **params}


def number(kind: str, name: str, value, lo: float, hi: float, *, lo_open=False, hi_open=False) -> float:
    """A finite number in the given interval, else a ValueError saying which interval."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{kind} kind_params.{name} must be a number in {span}, got {value!r}")
    return float(value)


def integer(kind: str, name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{kind} kind_params.{name} must be a whole number >= {lo}, got {value!r}")
    return int(value)


def flag(kind: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{kind} kind_params.{name} must be true or false, got {value!r}")
    return value
