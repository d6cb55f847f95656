"""Clusters through the judge core (streams/judge/core.py): keys from the diff rows' sample_hash (the
record's explicit sample_key) or input_hash, open clusters in the pair's changelog state across a
restart, closed at the watermark or when the traffic stops. No Kafka, no database (a stub sink)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streams.config import load_settings
from streams.judge.core import JudgeCore
from streams.records import DiffBatch, empty_columns


class StubSink:
    def __init__(self):
        self.verdicts = []

    def insert_diff_batches(self, batches):
        pass

    def scored_positions(self, pairs, request_ids, since_ms, until_ms):
        return {}

    def stored_id_hashes(self, model, candidate, since_ms):
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)

    def insert_windows(self, windows):
        pass

    def insert_verdicts(self, verdicts, provenance=None):
        self.verdicts.extend(verdicts)


@pytest.fixture
def settings(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    return load_settings(overrides={
        "clickhouse": {"dsn": f"chdb:///{tmp_path / 'ch'}"},
        "windows": {"size_s": 60.0, "grace_s": 0.0},
        "candidates": [{"name": "v2", "model": "m", "path": str(model), "policy": {"cluster_gap_s": 30.0}}],
    })  # fmt: skip


def _batch(lo: int, hi: int, users: np.ndarray, flips: np.ndarray) -> DiffBatch:
    n = hi - lo
    c = empty_columns(n)
    c["sent_ms"][:] = np.arange(lo, hi) * 1000
    c["label_flip"][:] = flips[lo:hi]
    c["candidate_label"][:] = flips[lo:hi]
    c["baseline_confidence"][:] = c["candidate_confidence"][:] = 0.9
    c["baseline_latency_ms"][:] = c["candidate_latency_ms"][:] = 1.0
    c["label"][:] = np.nan
    c["source_offset"][:] = np.arange(lo, hi)
    c["input_hash"][:] = np.arange(lo, hi) + 1
    c["sample_hash"][:] = users[lo:hi]
    c["id_hash"][:] = np.arange(lo, hi) + 10**6
    return DiffBatch("m", "v2", 0, c, [f"r{i}" for i in range(lo, hi)], ["v1"] * n, [""] * n, [{}] * n,
                     routed=n, covers={0: hi - 1})


def _traffic(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    users = rng.integers(1, 11, n).astype(np.uint64)  # ten users, one request a second
    return users, rng.random(n) < 0.05


def test_sessions_of_the_sample_key_are_the_clusters_and_survive_a_restart(settings):
    users, flips = _traffic()
    whole = JudgeCore(settings, StubSink())
    for lo in range(0, 3000, 500):
        whole.apply([_batch(lo, lo + 500, users, flips)])
    verdicts, _ = whole.close_due(lambda key: None, force=True)
    m = next(x for x in verdicts[-1].metrics if x.name == "label_flip_rate")
    assert m.samples == 3000 and m.estimate == pytest.approx(flips.mean())
    # ten users, each asking every ~10 s with a 30 s gap: sessions of up to the cap of 32
    clusters = int(m.detail.split(" independent clusters")[0].split(" in ")[-1])
    assert 3000 / 32 <= clusters < 300 and "largest cluster <= 32" in m.detail

    restarted = JudgeCore(settings, StubSink())
    first = JudgeCore(settings, StubSink())
    for lo in range(0, 1500, 500):
        first.apply([_batch(lo, lo + 500, users, flips)])
    key = "m/v2"
    state = json.loads(first.serialized(key))
    assert state["clusters"]["n"] > 0  # open sessions are in the changelog state
    restarted.restore(key, first.serialized(key))
    for lo in range(1500, 3000, 500):
        restarted.apply([_batch(lo, lo + 500, users, flips)])
    again, _ = restarted.close_due(lambda key: None, force=True)
    m2 = next(x for x in again[-1].metrics if x.name == "label_flip_rate")
    assert m2.detail == m.detail and m2.lower == m.lower and m2.upper == m.upper


def test_without_a_sample_key_repeated_inputs_are_the_clusters(settings):
    users, flips = _traffic()
    core = JudgeCore(settings, StubSink())
    batch = _batch(0, 3000, np.zeros(3000, np.uint64), flips)
    batch.columns["input_hash"][:] = np.arange(3000) // 5 + 1  # each input five times in a row
    batch.columns["label_flip"][:] = np.repeat(flips[::5], 5)
    core.apply([batch])
    verdicts, _ = core.close_due(lambda key: None, force=True)
    m = next(x for x in verdicts[-1].metrics if x.name == "label_flip_rate")
    assert "3000 scored requests in 600 independent clusters" in m.detail
