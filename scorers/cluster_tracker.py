"""Open clusters and the clusters they close (scorers.clusters explains clusters, cap and split,
and the bounded state).

``ClusterTracker`` keeps one pair's open clusters by cluster key and returns what it closes as
``Closed`` arrays; ``singletons`` makes every request a closed cluster of its own.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

DEFAULT_GAP_MS = 60_000
DEFAULT_CAP = 32
DEFAULT_MAX_OPEN = 2048
MAX_SIGNATURES = 512


def tracker_for(policy) -> ClusterTracker:
    """A tracker with a ``scorers.judge.JudgePolicy``'s cluster settings."""
    return ClusterTracker(int(policy.cluster_gap_s * 1000), int(policy.cluster_cap), int(policy.cluster_max_open))



# -- closed clusters ---------------------------------------------------------------------------------

@dataclass
class Closed:
    """Closed clusters, one entry each (arrays of equal length)."""

    key: np.ndarray  # uint64 (0: a request without a key)
    requests: np.ndarray  # int
    scored: np.ndarray
    errors: np.ndarray
    flips: np.ndarray
    abs_delta: np.ndarray  # float
    sig: np.ndarray  # int: index into the signature table, -1 none
    signatures: dict[int, tuple[tuple[str, str], ...]] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.key.size)

    @classmethod
    def empty(cls) -> Closed:
        z = np.zeros(0, dtype=np.int64)
        return cls(np.zeros(0, np.uint64), z, z, z, z, np.zeros(0), z)

    @classmethod
    def concat(cls, parts: Sequence[Closed]) -> Closed:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        sigs: dict[int, tuple] = {}
        for p in parts:
            sigs.update(p.signatures)
        return cls(*(np.concatenate([getattr(p, f) for p in parts])
                     for f in ("key", "requests", "scored", "errors", "flips", "abs_delta", "sig")), sigs)


def singletons(ok, flips, abs_delta, attributes: Sequence[dict[str, str]] | None = None) -> Closed:
    """Every request a closed cluster of its own (traffic judged as independent requests)."""
    ok = np.asarray(ok, dtype=bool).reshape(-1)
    n = ok.size
    sig = np.full(n, -1, dtype=np.int64)
    table: dict[int, tuple] = {}
    if attributes is not None:
        index: dict[tuple, int] = {}
        for i, a in enumerate(attributes):
            if a:
                items = tuple(sorted((str(k), str(v)) for k, v in a.items()))
                sig[i] = index.setdefault(items, len(index))
        table = {v: k for k, v in index.items()}
    return Closed(np.zeros(n, np.uint64), np.ones(n, np.int64), ok.astype(np.int64), (~ok).astype(np.int64),
                  (np.asarray(flips, dtype=bool) & ok).astype(np.int64),
                  np.where(ok, np.abs(np.nan_to_num(np.asarray(abs_delta, dtype=np.float64))), 0.0), sig, table)



# -- open clusters -----------------------------------------------------------------------------------

_FIELDS = (("key", "<u8"), ("first", "<i8"), ("last", "<i8"), ("requests", "<i4"), ("scored", "<i4"),
           ("errors", "<i4"), ("flips", "<i4"), ("abs_delta", "<f8"), ("sig", "<i4"))


class ClusterTracker:
    """Open clusters of one pair, by cluster key; ``update`` returns the clusters it closes (cap,
    gap inside a batch, eviction), ``close_idle(now_ms)`` those idle for more than the gap,
    ``close_all`` the rest. ``to_dict`` / ``from_dict`` for the pair's changelog state; ``merge``
    joins two trackers (the same key's open clusters combine)."""

    def __init__(self, gap_ms: int = DEFAULT_GAP_MS, cap: int = DEFAULT_CAP, max_open: int = DEFAULT_MAX_OPEN):
        if cap < 1 or cap > 1024:
            raise ValueError("cluster cap must be within 1..1024")
        self.gap_ms, self.cap, self.max_open = int(gap_ms), int(cap), int(max_open)
        # key -> [first_ms, last_ms, requests, scored, errors, flips, abs_delta, sig]
        self.open: dict[int, list] = {}
        self.signatures: dict[int, tuple[tuple[str, str], ...]] = {}
        self._sig_index: dict[tuple, int] = {}
        self.clock_ms: int | None = None  # latest event time seen
        self.closed = 0
        self.split = 0  # closed because they reached the cap
        self.evicted = 0  # closed early because the open map was full

    # -- signatures
    def _sig(self, attributes: dict[str, str] | None) -> int:
        if not attributes:
            return -1
        items = tuple(sorted((str(k), str(v)) for k, v in attributes.items()))
        sid = self._sig_index.get(items)
        if sid is None:
            if len(self.signatures) >= MAX_SIGNATURES:
                self._gc_signatures()
                if len(self.signatures) >= MAX_SIGNATURES:
                    return -1  # table full: this cluster is judged overall, not in its slices
            sid = max(self.signatures, default=-1) + 1
            self.signatures[sid] = items
            self._sig_index[items] = sid
        return sid

    def _gc_signatures(self) -> None:
        live = {c[7] for c in self.open.values()}
        for sid in [s for s in self.signatures if s not in live]:
            self._sig_index.pop(self.signatures.pop(sid), None)

    @property
    def pending(self) -> int:
        """Requests in open clusters (not judged yet)."""
        return int(sum(c[2] for c in self.open.values()))

    # -- updating
    def update(self, keys, sent_ms, *, ok, flips, abs_delta,
               attributes: Sequence[dict[str, str]] | None = None) -> Closed:
        """Add requests (cluster keys from ``cluster_keys``; key 0: a cluster of its own). Returns the
        clusters closed by this call (full ones, ones followed by a longer pause in this batch, and
        evicted ones)."""
        keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
        t = np.asarray(sent_ms, dtype=np.int64).reshape(-1)
        ok = np.asarray(ok, dtype=bool).reshape(-1)
        fl = (np.asarray(flips, dtype=bool).reshape(-1) & ok).astype(np.int64)
        ad = np.where(ok, np.abs(np.nan_to_num(np.asarray(abs_delta, dtype=np.float64).reshape(-1))), 0.0)
        n = keys.size
        if n == 0:
            return Closed.empty()
        self.clock_ms = int(t.max()) if self.clock_ms is None else max(self.clock_ms, int(t.max()))
        out: list[Closed] = []
        sigs = (np.full(n, -1, dtype=np.int64) if attributes is None
                else np.array([self._sig(a) for a in attributes], dtype=np.int64))
        alone = keys == 0
        if alone.any():
            i = np.flatnonzero(alone)
            one = np.ones(i.size, dtype=np.int64)
            out.append(Closed(keys[i], one, ok[i].astype(np.int64), (~ok[i]).astype(np.int64), fl[i], ad[i], sigs[i]))
            self.closed += int(i.size)
        i = np.flatnonzero(~alone)
        if i.size:
            out.append(self._update_keyed(keys[i], t[i], ok[i], fl[i], ad[i], sigs[i]))
        out.append(self._evict())
        closed = Closed.concat(out)
        closed.signatures = dict(self.signatures)
        return closed

    def _update_keyed(self, keys, t, ok, fl, ad, sigs) -> Closed:
        order = np.lexsort((t, keys))
        keys, t, ok, fl, ad, sigs = keys[order], t[order], ok[order], fl[order], ad[order], sigs[order]
        n = keys.size
        new_key = np.r_[True, keys[1:] != keys[:-1]]
        gap = np.r_[True, (t[1:] - t[:-1]) > self.gap_ms]
        run_start = new_key | gap
        run_id = np.cumsum(run_start) - 1
        starts = np.flatnonzero(run_start)
        runs = starts.size
        # The first run of each key may continue the key's open cluster.
        base = np.zeros(runs, dtype=np.int64)  # requests already in the cluster the run continues
        joins = np.zeros(runs, dtype=bool)
        for r in np.flatnonzero(new_key[starts]).tolist():
            k = int(keys[starts[r]])
            c = self.open.get(k)
            if c is not None and t[starts[r]] - c[1] <= self.gap_ms and c[2] < self.cap:
                joins[r], base[r] = True, c[2]
        pos = np.arange(n) - starts[run_id]
        chunk = (base[run_id] + pos) // self.cap
        piece_start = run_start | np.r_[False, chunk[1:] != chunk[:-1]]
        piece = np.cumsum(piece_start) - 1
        pieces = int(piece[-1]) + 1
        p_first = np.flatnonzero(piece_start)
        size = np.bincount(piece, minlength=pieces)
        s_ok = np.bincount(piece, weights=ok, minlength=pieces).astype(np.int64)
        s_fl = np.bincount(piece, weights=fl, minlength=pieces).astype(np.int64)
        s_ad = np.bincount(piece, weights=ad, minlength=pieces)
        t_first = t[p_first]
        t_last = np.maximum.reduceat(t, p_first)
        p_run = run_id[p_first]
        p_key = keys[p_first]
        p_sig = sigs[p_first]
        last_piece_of_key = np.r_[p_key[1:] != p_key[:-1], True]
        first_piece_of_run = np.r_[True, p_run[1:] != p_run[:-1]]
        out_rows = []
        for i in range(pieces):
            k = int(p_key[i])
            r = int(p_run[i])
            row = [int(t_first[i]), int(t_last[i]), int(size[i]), int(s_ok[i]), int(size[i] - s_ok[i]),
                   int(s_fl[i]), float(s_ad[i]), int(p_sig[i])]
            if first_piece_of_run[i] and joins[r]:
                c = self.open.pop(k)
                row = [c[0], max(c[1], row[1]), c[2] + row[2], c[3] + row[3], c[4] + row[4], c[5] + row[5],
                       c[6] + row[6], c[7]]
            elif first_piece_of_run[i] and new_key[starts[r]] and k in self.open:
                out_rows.append((k, self.open.pop(k)))  # a longer pause: the old cluster is over
            if row[2] >= self.cap:
                self.split += 1
                out_rows.append((k, row))
            elif last_piece_of_key[i]:
                self.open[k] = row
            else:
                out_rows.append((k, row))
        return self._closed(out_rows)

    def _closed(self, rows: list[tuple[int, list]]) -> Closed:
        if not rows:
            return Closed.empty()
        self.closed += len(rows)
        a = np.array([r for _, r in rows], dtype=np.float64)
        return Closed(np.array([k for k, _ in rows], dtype=np.uint64), a[:, 2].astype(np.int64),
                      a[:, 3].astype(np.int64), a[:, 4].astype(np.int64), a[:, 5].astype(np.int64), a[:, 6],
                      a[:, 7].astype(np.int64))

    def _evict(self) -> Closed:
        extra = len(self.open) - self.max_open
        if extra <= 0:
            return Closed.empty()
        oldest = sorted(self.open, key=lambda k: self.open[k][1])[:extra]
        self.evicted += extra
        return self._closed([(k, self.open.pop(k)) for k in oldest])

    def close_idle(self, now_ms: int | None = None) -> Closed:
        """Close the clusters whose last request is more than the gap before ``now_ms`` (default: the
        latest event time seen). The caller passes the watermark: no earlier event is still to come."""
        now = self.clock_ms if now_ms is None else int(now_ms)
        if now is None or not self.open:
            return Closed.empty()
        done = [k for k, c in self.open.items() if now - c[1] > self.gap_ms]
        closed = self._closed([(k, self.open.pop(k)) for k in done])
        closed.signatures = dict(self.signatures)
        return closed

    def close_all(self) -> Closed:
        closed = self._closed(list(self.open.items()))
        self.open.clear()
        closed.signatures = dict(self.signatures)
        return closed

    # -- merging and state
    def merge(self, other: ClusterTracker) -> None:
        remap = {sid: self._sig(dict(items)) for sid, items in other.signatures.items()}
        for k, c in other.open.items():
            c = [*c[:7], remap.get(c[7], -1)]
            mine = self.open.get(k)
            if mine is None:
                self.open[k] = c
            else:
                self.open[k] = [min(mine[0], c[0]), max(mine[1], c[1]), *(a + b for a, b in zip(mine[2:7], c[2:7],
                                                                                              strict=True)), mine[7]]
        if other.clock_ms is not None:
            self.clock_ms = other.clock_ms if self.clock_ms is None else max(self.clock_ms, other.clock_ms)
        self.closed += other.closed
        self.split += other.split
        self.evicted += other.evicted

    def to_dict(self) -> dict:
        rows = sorted(self.open.items())  # the same state whatever order the requests came in
        arrays = []
        for j, (name, dt) in enumerate(_FIELDS):
            col = [k for k, _ in rows] if name == "key" else [c[j - 1] for _, c in rows]
            arrays.append(np.asarray(col, dtype=dt).tobytes())
        live = {c[7] for c in self.open.values()}
        return {"v": 1, "gap_ms": self.gap_ms, "cap": self.cap, "max_open": self.max_open, "clock": self.clock_ms,
                "closed": self.closed, "split": self.split, "evicted": self.evicted, "n": len(rows),
                "open": base64.b64encode(b"".join(arrays)).decode(),
                "signatures": {str(s): [list(p) for p in items] for s, items in self.signatures.items() if s in live}}

    @classmethod
    def from_dict(cls, d: dict) -> ClusterTracker:
        tr = cls(d["gap_ms"], d["cap"], d["max_open"])
        tr.clock_ms, tr.closed, tr.split, tr.evicted = d["clock"], d["closed"], d["split"], d["evicted"]
        tr.signatures = {int(s): tuple((str(k), str(v)) for k, v in items) for s, items in d["signatures"].items()}
        tr._sig_index = {items: s for s, items in tr.signatures.items()}
        raw, n, off, cols = base64.b64decode(d["open"]), int(d["n"]), 0, []
        for _, dt in _FIELDS:
            size = np.dtype(dt).itemsize * n
            cols.append(np.frombuffer(raw[off:off + size], dtype=dt))
            off += size
        for i in range(n):
            tr.open[int(cols[0][i])] = [int(cols[1][i]), int(cols[2][i]), int(cols[3][i]), int(cols[4][i]),
                                        int(cols[5][i]), int(cols[6][i]), float(cols[7][i]), int(cols[8][i])]
        return tr

    def __repr__(self) -> str:
        return (f"ClusterTracker(open={len(self.open)}, pending={self.pending}, closed={self.closed}, "
                f"split={self.split}, evicted={self.evicted})")
