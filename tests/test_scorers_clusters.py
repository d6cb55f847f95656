"""Clusters and the cluster-robust confidence sequence for the request-weighted rate
(scorers/clusters.py, scorers/ratio_cs.py): state, merging, keys, and the statistics' guarantees on
simulated clusters (fast, on the tables directly; the real path is in test_scorers_realistic.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scorers import ratio_cs as rc
from scorers import sequential as sq
from scorers.accumulate import PairAccumulator
from scorers.calibration import _diffs
from scorers.clusters import (
    Closed, ClusterStats, ClusterTracker, cluster_keys, request_keys, signature_hash, singletons,
)  # fmt: skip
from scorers.judge import JudgePolicy, judge

A_R, A_P = 0.005, 0.025  # about the judge's per-metric levels at the default policy (rollback: 0.05 / 2 / 6)


# -- the statistic ---------------------------------------------------------------------------------

def _tables_at_looks(n: np.ndarray, y: np.ndarray, looks: np.ndarray) -> np.ndarray:
    """Tables (looks, bins, 6) of the clusters closed by each look (clusters in closing order)."""
    k = np.searchsorted(np.cumsum(n), looks, side="right")
    b = rc.size_bin(n)
    vals = np.stack([np.ones_like(n), n, n * n, y, y * y, n * y], -1).astype(float)
    out = np.zeros((looks.size, rc.N_BINS, rc.N_STATS))
    for j in np.unique(b):
        c = np.vstack([np.zeros(rc.N_STATS), np.cumsum(np.where((b == j)[:, None], vals, 0.0), axis=0)])
        out[:, j, :] = c[k]
    return out


def _runs(gen, runs: int, seed: int, requests: int = 10_000, margin: float = 0.02):
    """(ever rolled back, ever promoted, rolled back within 5,000) shares over runs judged every 250."""
    rng = np.random.default_rng(seed)
    looks = np.arange(250, requests + 1, 250)
    t = np.stack([_tables_at_looks(*gen(rng, requests), looks) for _ in range(runs)])
    fail = rc.rejects_above(t, margin, A_R)
    ok = rc.rejects_below(t, margin, A_P)
    return fail.any(1).mean(), ok.any(1).mean(), fail[:, looks <= 5000].any(1).mean()


def _bursts(p: float, together: bool):
    """Bursts of 5-20 requests; flips all together (a deterministic model's repeated input) or each
    request on its own (a nondeterministic one)."""
    def gen(rng, n):
        sizes = rng.integers(5, 21, n // 5).astype(float)
        sizes = sizes[np.cumsum(sizes) <= n + 20]
        y = np.where(rng.random(sizes.size) < p, sizes, 0.0) if together else rng.binomial(sizes.astype(int), p)
        return sizes, np.asarray(y, dtype=float)
    return gen


def _sessions(p: float, size: int = 32):
    return lambda rng, n: (np.full(n // size + 1, float(size)), rng.binomial(size, p, n // size + 1).astype(float))


def test_single_requests_match_the_sub_poisson_confidence_sequence():
    """For clusters of one request both families are the Poisson factor of scorers.sequential: the
    bounds are within a few percent of the gamma mixture's (the mixture's prior differs)."""
    for n, s in [(2000, 80), (2000, 20), (5000, 200), (750, 2)]:
        t = rc.RatioTable()
        t.add_singletons(n, s)
        assert float(rc.lower_bound(t, A_R)) == pytest.approx(sq.lower_bound(n, s, A_R), rel=0.06, abs=1e-3)
        assert float(rc.upper_bound(t, A_P)) == pytest.approx(sq.upper_bound(n, s, A_P), rel=0.06)
        assert rc.lower_bound(t, A_R) <= s / n <= rc.upper_bound(t, A_P)


def test_the_rejection_regions_are_intervals():
    """The bounds are the edges of {m : rejected}: checked on random mixes of cluster sizes and of
    independent and all-together flips, on a fine grid of m."""
    rng = np.random.default_rng(1)
    grid = np.linspace(0.0005, 0.5, 1500)
    for _ in range(60):
        t = rc.RatioTable()
        for _ in range(rng.integers(1, 5)):
            n = np.full(rng.integers(1, 300), min(int(rng.integers(1, 40)), 32))
            p = rng.uniform(0, 0.2)
            t.add(n, rng.binomial(n, p) if rng.random() < 0.5 else np.where(rng.random(n.size) < p, n, 0))
        above = rc.log_evalue_above(t, grid) >= np.log(1 / A_R)
        below = rc.log_evalue_below(t, grid) >= np.log(1 / A_P)
        assert not np.any(np.diff(above.astype(int)) > 0) and not np.any(np.diff(below.astype(int)) < 0)


@pytest.mark.parametrize("together", [True, False])
def test_bursts_at_the_margin_are_neither_rolled_back_nor_promoted(together):
    fr, fp, _ = _runs(_bursts(0.02, together), runs=300, seed=2)
    assert fr <= A_R + 3 * np.sqrt(A_R / 300) and fp <= A_P + 3 * np.sqrt(A_P / 300)


def test_sessions_of_independent_flips_keep_near_iid_power():
    """Clusters of 32 requests that flip independently at margin + 2 points: the Fan factor sees their
    small variance; rolled back within 5,000 requests in every run (all 32-request clusters)."""
    _, _, within = _runs(_sessions(0.04), runs=200, seed=3)
    assert within >= 0.99
    fr, fp, _ = _runs(_sessions(0.02), runs=200, seed=4)
    assert fr <= 0.02 and fp <= 0.04


def test_clusters_that_flip_together_are_judged_by_their_number():
    """Twenty 32-request clusters all flipped among 300 (a popular input at 3x the margin): the
    Bernoulli family rolls it back; the same flips spread as independent requests would be far stronger
    evidence, and the bound says how many clusters it rests on."""
    t = rc.RatioTable()
    t.add(np.full(300, 32), np.r_[np.full(20, 32), np.zeros(280)])
    assert rc.rejects_above(t, 0.02, A_R)
    spread = rc.RatioTable()
    spread.add_singletons(9600, 640)
    assert rc.lower_bound(spread, A_R) > rc.lower_bound(t, A_R) + 0.01
    assert t.kish() == pytest.approx(300) and t.largest == 32


def test_a_drifting_rate_is_covered_by_the_running_average():
    """Half the time 3x the margin, half the time 0 (running average = margin at every whole cycle): the
    fixed-eta mixture is valid for the running average, so it is not rolled back more than alpha."""
    def gen(rng, n):
        t = np.arange(n)
        p = np.where((t // 500) % 2 == 0, 0.0, 0.04)
        return np.ones(n), (rng.random(n) < p).astype(float)
    fr, _, _ = _runs(gen, runs=300, seed=5)
    assert fr <= A_R + 3 * np.sqrt(A_R / 300)


def test_requests_to_cross_projects_the_observed_mix():
    t = rc.RatioTable()
    t.add(np.full(50, 8), np.r_[np.full(5, 8), np.zeros(45)])  # 400 requests, 40 flips in 5 clusters
    need = rc.requests_to_cross(t, 0.02, A_R, side="lower")
    assert need is not None and need > 0
    assert rc.rejects_above(t.scaled((400 + need) / 400 * 1.01), 0.02, A_R)
    assert not rc.rejects_above(t.scaled((400 + need) / 400 * 0.9), 0.02, A_R)
    assert rc.requests_to_cross(t, 0.2, A_R, side="lower") is None  # heading the other way


def test_ratio_table_merges_and_round_trips():
    rng = np.random.default_rng(6)
    n, y = rng.integers(1, 33, 500), None
    y = rng.binomial(n, 0.1)
    one, a, b = rc.RatioTable(), rc.RatioTable(), rc.RatioTable()
    one.add(n, y)
    a.add(n[:200], y[:200])
    b.add(n[200:], y[200:])
    a.merge(b)
    np.testing.assert_allclose(a.t, one.t)
    back = rc.RatioTable.from_list(json.loads(json.dumps(one.to_list())))
    np.testing.assert_allclose(back.t, one.t)
    with pytest.raises(ValueError, match="cap"):
        one.add([2000], [0])


# -- clusters -------------------------------------------------------------------------------------

def _update(tr: ClusterTracker, keys, t, flips=None, attrs=None) -> Closed:
    keys = np.asarray(keys, dtype=np.uint64)
    n = keys.size
    flips = np.zeros(n, bool) if flips is None else np.asarray(flips, bool)
    return tr.update(keys, np.asarray(t), ok=np.ones(n, bool), flips=flips, abs_delta=np.zeros(n), attributes=attrs)


def test_a_cluster_ends_at_a_pause_or_at_the_cap():
    tr = ClusterTracker(gap_ms=10, cap=4, max_open=100)
    closed = _update(tr, [1, 1, 1, 2, 1, 1, 1, 3, 0], [0, 1, 2, 3, 4, 5, 6, 30, 31], [1, 0, 0, 1, 0, 0, 1, 0, 1])
    # key 1: four requests reach the cap (closed), two more stay open; key 0: a cluster of its own
    assert sorted(zip(closed.key.tolist(), closed.requests.tolist())) == [(0, 1), (1, 4)]
    assert tr.pending == 4 and tr.split == 1
    later = tr.close_idle(40)  # keys 1 and 2 idle for more than 10 ms; key 3 is not
    assert sorted(zip(later.key.tolist(), later.requests.tolist(), later.flips.tolist())) == [(1, 2, 1), (2, 1, 1)]
    assert list(tr.open) == [3]
    again = _update(tr, [3, 3], [45, 100])  # 3 continues (gap 15 > 10: no, a new cluster) ...
    assert again.requests.tolist() == [1, 1] or again.requests.tolist() == [1]
    assert tr.close_all().requests.sum() + again.requests.sum() == 3


def test_a_pause_inside_one_batch_ends_the_cluster():
    tr = ClusterTracker(gap_ms=10, cap=32, max_open=100)
    closed = _update(tr, [5] * 5, [0, 1, 2, 50, 51])
    assert closed.requests.tolist() == [3] and tr.pending == 2


def test_the_open_map_is_bounded_and_eviction_closes():
    tr = ClusterTracker(gap_ms=10**9, cap=32, max_open=2048)
    closed = _update(tr, np.arange(1, 5001), np.arange(5000))
    assert len(tr.open) == 2048 and tr.evicted == 5000 - 2048 and len(closed) == 5000 - 2048
    assert min(tr.open) == 5000 - 2048 + 1  # the least recently active went first
    raw = json.dumps(tr.to_dict())
    assert len(raw) < 150_000  # 48 bytes a cluster, base64
    back = ClusterTracker.from_dict(json.loads(raw))
    assert back.open == tr.open and back.evicted == tr.evicted


def test_trackers_merge_and_restore_with_signatures():
    a, b = ClusterTracker(gap_ms=100), ClusterTracker(gap_ms=100)
    attrs = [{"country": "de"}, {"country": "fr"}]
    _update(a, [1, 2], [0, 1], attrs=attrs)
    _update(b, [1, 3], [2, 3], flips=[1, 1], attrs=[{"country": "de"}, {"country": "it"}])
    a.merge(b)
    back = ClusterTracker.from_dict(json.loads(json.dumps(a.to_dict())))
    closed = back.close_all()
    assert sorted(zip(closed.key.tolist(), closed.requests.tolist(), closed.flips.tolist())) == [
        (1, 2, 1), (2, 1, 0), (3, 1, 1)]
    stats = ClusterStats()
    stats.add(closed)
    assert {k: t.requests for k, t in stats.slices["country"].items()} == {"de": 2, "fr": 1, "it": 1}


def test_cluster_keys_precedence_and_slices():
    inp = np.array([11, 11, 12, 12], dtype=np.uint64)
    smp = np.array([0, 0, 7, 7], dtype=np.uint64)
    attrs = [{"session": "s1", "c": "de"}, {"session": "s2", "c": "de"}, {"c": "de"}, {"c": "fr"}]
    plain = request_keys(inp, smp)
    assert plain[0] == plain[1] != plain[2] == plain[3]  # input, then the sample key
    by_session = request_keys(inp, smp, attrs, key_attribute="session")
    assert by_session[0] != by_session[1]  # the configured attribute first
    assert by_session[2] != by_session[3]  # one slice per cluster: de and fr apart
    assert (request_keys(np.zeros(2, np.uint64)) == 0).all()  # no key: a cluster of its own
    assert signature_hash({"a": "1", "b": "2"}) == signature_hash({"b": "2", "a": "1"}) != 0
    assert cluster_keys(np.array([5], np.uint64))[0] == 5


def test_cluster_stats_merge_exactly_and_name_the_busiest_key():
    rng = np.random.default_rng(7)
    n = rng.integers(1, 33, 400)
    closed = Closed(np.where(np.arange(400) < 300, 9, np.arange(400)).astype(np.uint64), n, n, np.zeros(400, int),
                    rng.binomial(n, 0.05), rng.random(400), np.zeros(400, int), {0: (("c", "de"),)})
    whole, a, b = ClusterStats(), ClusterStats(), ClusterStats()
    whole.add(closed)
    a.add(Closed(*(getattr(closed, f)[:150] for f in ("key", "requests", "scored", "errors", "flips", "abs_delta",
                                                       "sig")), closed.signatures))
    b.add(Closed(*(getattr(closed, f)[150:] for f in ("key", "requests", "scored", "errors", "flips", "abs_delta",
                                                       "sig")), closed.signatures))
    a.merge(b)
    for name in ("errors", "flips", "abs_delta"):
        np.testing.assert_allclose(getattr(a, name).t, getattr(whole, name).t)
    np.testing.assert_allclose(a.slices["c"]["de"].t, whole.slices["c"]["de"].t)
    key, share = whole.busiest_key()
    assert key == f"{9:016x}" and share > 0.7
    back = ClusterStats.from_dict(json.loads(json.dumps(whole.to_dict())))
    np.testing.assert_allclose(back.flips.t, whole.flips.t)


# -- the accumulator and the judge ------------------------------------------------------------------

def test_without_a_tracker_every_request_is_a_cluster_of_its_own():
    acc = PairAccumulator()
    flips = np.array([True] * 10 + [False] * 990)
    acc.update(_diffs(flips, np.zeros(1000)), baseline_latency_ms=np.ones(1000), candidate_latency_ms=np.ones(1000),
               request_ids=[str(i) for i in range(1000)])
    assert acc.clusters.flips.requests == 1000 and acc.clusters.flips.clusters == 1000
    m = judge(acc, JudgePolicy()).metric("label_flip_rate")
    assert m.samples == 1000 and m.estimate == pytest.approx(0.01)
    assert "1000 scored requests in 1000 independent clusters" in m.detail


def test_a_repeated_input_counts_for_every_request_but_as_one_cluster():
    """Ten requests of one input, all flipped, among 990 others: the estimate is what users see
    (10 / 1000), and the bounds treat the ten as one dependent unit."""
    acc = PairAccumulator()
    flips = np.array([True] * 10 + [False] * 990)
    keys = np.concatenate([np.full(10, 7), np.arange(100, 1090)]).astype(np.uint64)
    d = _diffs(flips, np.zeros(1000))
    acc.update(d, baseline_latency_ms=np.ones(1000), candidate_latency_ms=np.ones(1000),
               request_ids=[str(i) for i in range(1000)], sent_ms=np.arange(1000) * 1000, clustered=True)
    tr = ClusterTracker(gap_ms=60_000)
    acc.add_clusters(tr.update(keys, np.arange(1000) * 1000, ok=np.ones(1000, bool), flips=flips,
                               abs_delta=np.zeros(1000)))
    acc.add_clusters(tr.close_idle(10**9))
    m = judge(acc, JudgePolicy()).metric("label_flip_rate")
    assert m.estimate == pytest.approx(0.01) and m.samples == 1000
    assert "1000 scored requests in 991 independent clusters" in m.detail and "largest cluster <= 16" in m.detail


def test_open_clusters_are_reported_as_pending():
    acc = PairAccumulator()
    d = _diffs(np.zeros(100, bool), np.zeros(100))
    acc.update(d, baseline_latency_ms=np.ones(100), candidate_latency_ms=np.ones(100),
               request_ids=[str(i) for i in range(100)], clustered=True)
    acc.add_clusters(singletons(np.ones(60, bool), np.zeros(60, bool), np.zeros(60)))
    m = judge(acc, JudgePolicy()).metric("label_flip_rate")
    assert m.samples == 60 and "40 more in open clusters" in m.detail


def test_state_from_before_clusters_loads_its_evidence_as_single_requests():
    acc = PairAccumulator()
    acc.update(_diffs(np.r_[np.ones(5, bool), np.zeros(95, bool)], np.full(100, 0.01)),
               baseline_latency_ms=np.ones(100), candidate_latency_ms=np.ones(100),
               request_ids=[str(i) for i in range(100)], attributes=[{"c": "de"}] * 100)
    # v3 state, as the first-seen rule wrote it: 60 of the 100 requests were first seen, the 5 flips among them
    old = acc.to_dict()
    del old["clusters"]
    old["v"] = 3
    old["evidence"] = [60, 0, 60, 5, 0.6]  # requests, errors, scored, label flips, sum |confidence delta|
    old["slices"]["c"]["de"] = [*old["slices"]["c"]["de"], 60, 5]  # ... and the slice's first-seen scored, flips
    back = PairAccumulator.from_dict(old)
    assert back.clusters.flips.requests == 60 and back.clusters.flips.total == 5
    assert back.clusters.slices["c"]["de"].requests == 60
    new = PairAccumulator.from_dict(json.loads(json.dumps(acc.to_dict())))
    np.testing.assert_allclose(new.clusters.flips.t, acc.clusters.flips.t)
