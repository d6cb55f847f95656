"""Producer retries: a request id already scored from a *different* message is a duplicate.

A producer that retries, or a backfill replayed twice, sends the same request id again in a new
message (a redelivery of the same message is caught earlier, by the pair's applied offsets). The
judge keeps, per pair, the hashes of the ids it stored lately (streams/judge/recent_ids.py) and asks
ClickHouse, in one lookup within the dedup horizon, only about the ids those cannot clear.
"""

from __future__ import annotations

import numpy as np

from streams.judge.recent_ids import RecentIds, id_hashes
from streams.judge.windows import PairWindows, pair_key

RECENT_MARGIN_MS = 10 * 60_000  # how far before a pair's first batch the loaded ids reach, beyond the horizon


class RetryFilter:
    """Which rows of a call's batches are producer retries; ``recent`` is rebuilt from ClickHouse
    when a pair is (re)acquired or its state restored (``forget``)."""

    def __init__(self, sink, horizon_ms: int):
        self.sink, self.horizon_ms = sink, horizon_ms
        self.recent: dict[str, RecentIds] = {}
        self.lookups = 0  # request ids looked up in ClickHouse (metrics, tests)

    def remember(self, key: str, hashes: np.ndarray, sent_ms: np.ndarray) -> None:
        """Rows just written for a pair: their ids are cleared locally from now on."""
        self.recent[key].add(hashes, sent_ms)

    def forget(self, key: str) -> None:
        self.recent.pop(key, None)

    def drop(self, kept):
        """Rows whose request id was already scored from a *different* message are duplicates
        (a producer retry, a replayed backfill). ClickHouse is asked, in one lookup within the
        horizon, only about the ids the pair's ``RecentIds`` cannot clear (streams/judge/recent_ids.py)."""
        asked: list[str] = []
        hashes = []  # per kept batch: its ids' hashes (0 in the column: an older replay sent none)
        for pw, rows, _ in kept:
            h = rows.columns["id_hash"]
            hashes.append(h if h.all() else id_hashes(rows.request_id))
            if not len(rows):
                continue
            key, sent = pair_key(pw.model, pw.candidate), rows.columns["sent_ms"]
            recent = self.recent.get(key)
            if recent is None:
                # A margin back: rows that arrive later but were sent a little before this batch
                # (partitions read at different paces) are covered too; older ones are looked up.
                since = int(sent.min()) - self.horizon_ms - RECENT_MARGIN_MS
                recent = self.recent[key] = self._load(pw, since)
            ask = ~recent.covers(sent) | recent.maybe_seen(hashes[-1])
            asked.extend(rows.request_id[i] for i in np.flatnonzero(ask).tolist())
        prior: dict = {}
        if asked:
            sent = np.concatenate([rows.columns["sent_ms"] for _, rows, _ in kept if len(rows)])
            pairs = sorted({(pw.model, pw.candidate) for pw, _, _ in kept})
            prior = self.sink.scored_positions(pairs, asked, since_ms=int(sent.min()) - self.horizon_ms,
                                               until_ms=int(sent.max()) + self.horizon_ms)  # fmt: skip
        self.lookups += len(asked)
        # A pair whose ids in this call have distinct hashes repeats no id within the call, and
        # with nothing found in ClickHouse all its rows are fresh: no per-row check needed.
        by_pair: dict[str, list[np.ndarray]] = {}
        for (pw, _, _), h in zip(kept, hashes, strict=True):
            by_pair.setdefault(pair_key(pw.model, pw.candidate), []).append(h)
        distinct = {key: np.unique(np.concatenate(hs)).size == sum(map(len, hs)) for key, hs in by_pair.items()}
        seen: dict[str, set[str]] = {}
        out = []
        for (pw, rows, routed), h in zip(kept, hashes, strict=True):
            key = pair_key(pw.model, pw.candidate)
            if not prior and distinct[key]:
                out.append((pw, rows, routed, [], h))
                continue
            pair_seen = seen.setdefault(key, set())
            keep, dups = [], []
            parts, offs = rows.columns["source_partition"].tolist(), rows.columns["source_offset"].tolist()
            for i, rid in enumerate(rows.request_id):
                earlier = prior.get((pw.model, pw.candidate, rid))
                if rid in pair_seen or (earlier is not None and earlier != (parts[i], offs[i])):
                    dups.append(int(rows.columns["sent_ms"][i]))
                    continue
                pair_seen.add(rid)
                keep.append(i)
            if len(keep) == len(rows):
                out.append((pw, rows, routed, dups, h))
            else:
                out.append((pw, rows.take(keep), routed, dups, h[keep]))
        return out

    def _load(self, pw: PairWindows, since_ms: int) -> RecentIds:
        """The pair's stored ids from ``since_ms`` on: one query when this judge first writes the pair."""
        recent = RecentIds(since_ms, self.horizon_ms)
        hashes, sent = self.sink.stored_id_hashes(pw.model, pw.candidate, since_ms)
        recent.add(hashes, sent)
        return recent
