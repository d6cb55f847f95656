"""Mergeable latency quantile sketch with bounded relative error (the DDSketch algorithm).

Why our own implementation rather than the ``ddsketch`` package: the package adds values one at a
time in Python (~1 µs each) and serialises through protobuf; the worker scores batches, so we update
with one ``np.unique`` per batch (orders of magnitude faster, see bench/bench_scorers.py) and serialise
to a small JSON dict for the changelog and ClickHouse. The bucket mapping is exactly DDSketch's
logarithmic mapping (gamma = (1 + a) / (1 - a), key = ceil(log_gamma(x)), value = 2 gamma^key / (1 + gamma)),
so quantiles agree with ``ddsketch.DDSketch`` bucket for bucket (tested), and any returned quantile is
within relative error ``a`` of the exact order statistic ``x_(floor(q (n - 1)))`` (0-based), as long as
no bucket was collapsed.

Boundedness: at most ``max_buckets`` buckets; beyond that the *lowest* buckets are collapsed into one
(fast latencies lose accuracy first, tail quantiles keep it). With a = 0.5 % a bucket spans 1 %, so 2,048
buckets cover 1 µs .. 1,000 s before any collapse. Values <= 1e-9 ms count as zero; NaN / negative values
are counted in ``missing`` and never enter the quantiles.
"""

from __future__ import annotations

import math

import numpy as np

ZERO_THRESHOLD_MS = 1e-9


class LatencySketch:
    """update / merge / quantile, river-style; ``to_dict`` / ``from_dict`` for changelogs."""

    def __init__(self, relative_accuracy: float = 0.005, max_buckets: int = 2048):
        if not 0 < relative_accuracy < 1:
            raise ValueError("relative_accuracy must be in (0, 1)")
        self.relative_accuracy = float(relative_accuracy)
        self.max_buckets = int(max_buckets)
        self.gamma = (1 + relative_accuracy) / (1 - relative_accuracy)
        self._multiplier = 1.0 / math.log(self.gamma)
        self.offset = 0  # key of counts[0]
        self.counts = np.zeros(0, dtype=np.int64)
        self.zero_count = 0
        self.missing = 0
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.collapsed = False

    # -- updating -------------------------------------------------------------------------
    def _add_keys(self, keys: np.ndarray, counts: np.ndarray | None) -> None:
        """Add ``counts`` (None: one each) at bucket ``keys``, growing the dense array as needed."""
        if keys.size == 0:
            return
        lo, hi = int(keys.min()), int(keys.max())
        if self.counts.size:
            lo, hi = min(lo, self.offset), max(hi, self.offset + self.counts.size - 1)
        if not self.counts.size or lo < self.offset or hi >= self.offset + self.counts.size:
            grown = np.zeros(hi - lo + 1, dtype=np.int64)
            if self.counts.size:
                grown[self.offset - lo:self.offset - lo + self.counts.size] = self.counts
            self.counts, self.offset = grown, lo
        if counts is None:
            self.counts += np.bincount(keys - self.offset, minlength=self.counts.size)
        else:
            np.add.at(self.counts, keys - self.offset, counts)
        self._collapse()

    def _collapse(self) -> None:
        nz = np.flatnonzero(self.counts)
        if nz.size == 0:
            self.counts, self.offset = np.zeros(0, dtype=np.int64), 0
            return
        self.counts = self.counts[nz[0]:nz[-1] + 1]
        self.offset += int(nz[0])
        excess = self.counts.size - self.max_buckets
        if excess > 0:
            self.counts[excess] += self.counts[:excess].sum()
            self.counts = self.counts[excess:]
            self.offset += excess
            self.collapsed = True

    def update(self, values_ms) -> None:
        v = np.atleast_1d(np.asarray(values_ms, dtype=np.float64)).ravel()
        good = np.isfinite(v) & (v >= 0)
        self.missing += int(v.size - good.sum())
        v = v[good]
        if v.size == 0:
            return
        zero = v <= ZERO_THRESHOLD_MS
        self.zero_count += int(zero.sum())
        pos = v[~zero]
        self.count += int(v.size)
        self.sum += float(v.sum())
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))
        if pos.size:
            keys = np.ceil(np.log(pos) * self._multiplier).astype(np.int64)
            self._add_keys(keys, None)

    def merge(self, other: LatencySketch) -> None:
        if abs(other.gamma - self.gamma) > 1e-12:
            raise ValueError("cannot merge sketches with different relative accuracy")
        self.zero_count += other.zero_count
        self.missing += other.missing
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.collapsed |= other.collapsed
        if other.counts.size:
            keys = np.arange(other.offset, other.offset + other.counts.size, dtype=np.int64)
            nz = other.counts > 0
            self._add_keys(keys[nz], other.counts[nz])

    # -- reading --------------------------------------------------------------------------
    def _value(self, key: int) -> float:
        return 2.0 * self.gamma ** key / (1.0 + self.gamma)

    def value_at_rank(self, rank: float) -> float | None:
        """Approximate order statistic at 0-based ``rank`` (floor semantics, as DDSketch)."""
        if self.count == 0:
            return None
        rank = min(max(rank, 0.0), self.count - 1)
        if rank < self.zero_count:
            return 0.0
        cum = np.cumsum(self.counts)
        i = int(np.searchsorted(cum, rank - self.zero_count, side="right"))
        i = min(i, self.counts.size - 1)
        return float(min(max(self._value(self.offset + i), self.min), self.max))

    def quantile(self, q: float) -> float | None:
        if not 0 <= q <= 1:
            raise ValueError("q must be in [0, 1]")
        if self.count == 0:
            return None
        return self.value_at_rank(q * (self.count - 1))

    def quantiles(self, qs) -> list[float | None]:
        return [self.quantile(q) for q in qs]

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None

    # -- serialising ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "v": 1, "relative_accuracy": self.relative_accuracy, "max_buckets": self.max_buckets,
            "offset": int(self.offset), "counts": self.counts.tolist(), "zero_count": self.zero_count,
            "missing": self.missing, "count": self.count, "sum": self.sum,
            "min": self.min if self.count else None, "max": self.max if self.count else None,
            "collapsed": self.collapsed,
        }

    @classmethod
    def from_dict(cls, d: dict) -> LatencySketch:
        s = cls(d["relative_accuracy"], d.get("max_buckets", 2048))
        s.offset = int(d["offset"])
        s.counts = np.asarray(d["counts"], dtype=np.int64)
        s.zero_count, s.missing, s.count = int(d["zero_count"]), int(d["missing"]), int(d["count"])
        s.sum = float(d["sum"])
        s.min = math.inf if d["min"] is None else float(d["min"])
        s.max = -math.inf if d["max"] is None else float(d["max"])
        s.collapsed = bool(d.get("collapsed", False))
        return s

    def copy(self) -> LatencySketch:
        return LatencySketch.from_dict(self.to_dict())

    def __repr__(self) -> str:
        return f"LatencySketch(count={self.count}, p50={self.quantile(0.5) if self.count else None})"
