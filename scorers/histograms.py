"""Mergeable count tables behind the window divergences: no raw rows are kept or read back.

``ConfidenceHistogram``: top-class confidence in ``CONFIDENCE_BINS`` = 50 equal-width bins over [0, 1]
(bin i is [i/50, (i+1)/50), the last bin also holds 1.0; a value equal to an inner edge goes to the bin
on its right, as ``divergence.histograms`` does). Values outside [0, 1] (probability rows are accepted
within a small tolerance, see ``diffs``) are clipped into the end bins; NaN / Inf are counted in
``missing`` and never binned. Beside the counts it keeps the sum and sum of squares of the clipped
values in fixed point (integers, resolution ``1 / MOMENT_SCALE`` = 2^-20), so the standard deviation is
known to about 1e-6 and merging stays exact (integer sums), whatever the order.

``LabelPairTable``: counts of (baseline_label, candidate_label) pairs of scored rows. At most
``MAX_LABELS`` = 64 distinct labels (over both sides): labels are admitted in order of arrival (pairs of
one batch in sorted order) and a pair that would need a 65th label is counted in ``overflow`` instead.
Within the limit merging is exact and order-free; past it which pairs overflow depends on arrival order
(as with the accumulator's other bounded tables), and the accumulator then reports no paired test.
Serialised sparsely as ``[[b, c, n], ...]``; at most 64 x 64 entries, in practice the diagonal plus
the flips.

Both are river-style: ``update`` / ``merge`` / ``to_dict`` / ``from_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

CONFIDENCE_BINS = 50
MAX_LABELS = 64
MOMENT_SCALE = 1 << 20
_CHUNK = 1 << 22  # rows per int64 dot product: 2^22 * (2^20)^2 = 2^62 < 2^63


def confidence_bins(values, bins: int = CONFIDENCE_BINS) -> np.ndarray:
    """Bin index of each (finite) value: equal-width bins over [0, 1], values outside clipped."""
    inner = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    return np.searchsorted(inner, np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0), side="right")


class ConfidenceHistogram:
    """Fixed-bin counts of a confidence in [0, 1] plus exact fixed-point moments."""

    def __init__(self, bins: int = CONFIDENCE_BINS):
        if bins < 1:
            raise ValueError("bins must be >= 1")
        self.counts = np.zeros(bins, dtype=np.int64)
        self.s1 = 0  # sum of round(x * MOMENT_SCALE), Python int (unbounded)
        self.s2 = 0  # sum of round(x * MOMENT_SCALE) ** 2
        self.missing = 0  # non-finite values, never binned

    @property
    def bins(self) -> int:
        return int(self.counts.size)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def update(self, values) -> None:
        x = np.asarray(values, dtype=np.float64).reshape(-1)
        finite = np.isfinite(x)
        self.missing += int(x.size - finite.sum())
        x = np.clip(x[finite], 0.0, 1.0)
        if x.size == 0:
            return
        self.counts += np.bincount(confidence_bins(x, self.bins), minlength=self.bins)
        q = np.rint(x * MOMENT_SCALE).astype(np.int64)
        self.s1 += int(q.sum())
        for i in range(0, q.size, _CHUNK):
            self.s2 += int(np.dot(q[i:i + _CHUNK], q[i:i + _CHUNK]))

    def merge(self, other: ConfidenceHistogram) -> None:
        if other.bins != self.bins:
            raise ValueError(f"cannot merge {other.bins} bins into {self.bins}")
        self.counts += other.counts
        self.s1 += other.s1
        self.s2 += other.s2
        self.missing += other.missing

    def mean(self) -> float | None:
        n = self.total
        return self.s1 / n / MOMENT_SCALE if n else None

    def std(self, ddof: int = 1) -> float | None:
        """Standard deviation of the (clipped, 2^-20-rounded) values; None with n <= ddof."""
        n = self.total
        if n <= ddof:
            return None
        num = n * self.s2 - self.s1 * self.s1  # exact integer: n^2 * variance * scale^2
        return math.sqrt(max(num, 0) / (n * (n - ddof))) / MOMENT_SCALE

    def to_dict(self) -> dict:
        return {"counts": self.counts.tolist(), "s1": self.s1, "s2": self.s2, "missing": self.missing}

    @classmethod
    def from_dict(cls, d: dict) -> ConfidenceHistogram:
        h = cls(len(d["counts"]))
        h.counts = np.asarray(d["counts"], dtype=np.int64)
        h.s1, h.s2, h.missing = int(d["s1"]), int(d["s2"]), int(d.get("missing", 0))
        return h


class LabelPairTable:
    """Joint counts of (baseline_label, candidate_label), bounded to ``max_labels`` distinct labels."""

    def __init__(self, max_labels: int = MAX_LABELS):
        self.max_labels = int(max_labels)
        self.pairs: dict[tuple[int, int], int] = {}
        self.labels: set[int] = set()
        self.overflow = 0

    @property
    def total(self) -> int:
        return sum(self.pairs.values())

    def update(self, baseline_labels, candidate_labels) -> None:
        b = np.asarray(baseline_labels, dtype=np.int64).reshape(-1)
        c = np.asarray(candidate_labels, dtype=np.int64).reshape(-1)
        if b.size != c.size:
            raise ValueError(f"{b.size} baseline labels for {c.size} candidate labels")
        if b.size == 0:
            return
        # one np.unique on a combined key (np.unique(axis=0) is ~20x slower); keys sort as (b, c)
        ub, ib = np.unique(b, return_inverse=True)
        uc, ic = np.unique(c, return_inverse=True)
        keys, counts = np.unique(ib.reshape(-1) * uc.size + ic.reshape(-1), return_counts=True)
        pairs = zip(ub[keys // uc.size].tolist(), uc[keys % uc.size].tolist(), strict=True)
        self._add(zip(pairs, counts.tolist(), strict=True))

    def _add(self, items: Iterable[tuple[tuple[int, int], int]]) -> None:
        for (b, c), n in items:
            new = {b, c} - self.labels
            if new and len(self.labels) + len(new) > self.max_labels:
                self.overflow += int(n)
                continue
            self.labels |= new
            self.pairs[(b, c)] = self.pairs.get((b, c), 0) + int(n)

    def merge(self, other: LabelPairTable) -> None:
        self._add(sorted(other.pairs.items()))
        self.overflow += other.overflow

    def table(self) -> tuple[np.ndarray, np.ndarray]:
        """(classes, K x K counts): rows baseline label, columns candidate label, classes sorted."""
        classes = np.array(sorted(self.labels), dtype=np.int64)
        out = np.zeros((classes.size, classes.size), dtype=np.int64)
        for (b, c), n in self.pairs.items():
            out[np.searchsorted(classes, b), np.searchsorted(classes, c)] += n
        return classes, out

    def to_dict(self) -> dict:
        return {"pairs": [[b, c, n] for (b, c), n in sorted(self.pairs.items())], "overflow": self.overflow}

    @classmethod
    def from_dict(cls, d: dict, max_labels: int = MAX_LABELS) -> LabelPairTable:
        t = cls(max_labels)
        t._add(((int(b), int(c)), int(n)) for b, c, n in d["pairs"])
        t.overflow = int(d.get("overflow", 0))
        return t
