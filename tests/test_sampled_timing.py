"""Sampled timing (``[replay] timing = "sampled"``, the default): every micro-batch runs as one
batched call per candidate, and a sample of the requests (by request id hash, at least
``timing_min_per_window`` per window of each micro-batch) is also run alone and timed; the
others carry no latency (NaN). No timed assertions: latencies are only checked for presence."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest

from streams.config import ConfigError, ReplayConfig, load_settings
from streams.demo import V1_TO_V2_ADAPTER, TrafficGenerator
from harness import window_aligned_start
from streams.judge.recent_ids import id_hashes
from streams.replay.core import Inbound, ReplayCore
from streams.replay.runner import OnnxRunner, sampled_by_hash, timed_rows

COLUMNS = ("baseline_label", "candidate_label", "label_flip", "confidence_delta", "l1", "linf", "hellinger",
           "topk_overlap", "candidate_confidence")  # fmt: skip


def core(models, timing="sampled", window_s=1.0, **replay) -> ReplayCore:
    candidates = [
        {"name": "digits-v2", "model": "digits", "path": str(models["good"]), "adapter": V1_TO_V2_ADAPTER},
        {"name": "digits-v1-replay", "model": "digits", "path": str(models["baseline"]), "noise_reference": True},
    ]  # fmt: skip
    settings = load_settings(overrides={"replay": {"timing": timing, **replay}, "windows": {"size_s": window_s},
                                        "candidates": candidates})  # fmt: skip
    return ReplayCore(settings)


def stream(models, n: int, rate_per_s: float = 50, seed: int = 0) -> list[bytes]:
    start = window_aligned_start(n, rate_per_s=rate_per_s, window_s=1)
    return TrafficGenerator(models["baseline"], rate_per_s=rate_per_s, seed=seed).messages(n, start=start)


def replay_all(core: ReplayCore, messages: list[bytes], batch: int, partition: int = 0):
    """Candidate -> list of (micro-batch index, DiffBatch)."""
    out = defaultdict(list)
    for k, lo in enumerate(range(0, len(messages), batch)):
        result = core.replay([Inbound(m, partition, lo + i) for i, m in enumerate(messages[lo : lo + batch])])
        assert not result.dead_letters
        for b in result.batches:
            out[b.candidate].append((k, b))
    return out


def timed_ids(batches) -> set[str]:
    return {r for _, b in batches for r, lat in zip(b.request_id, b.columns["candidate_latency_ms"], strict=True)
            if np.isfinite(lat)}  # fmt: skip


def test_sampled_is_the_default_and_its_fields_are_validated(models):
    assert ReplayConfig().timing == "sampled"
    assert (ReplayConfig().timing_sample, ReplayConfig().timing_min_per_window) == (0.02, 1)
    for timing in ("per_request", "batched", "sampled"):
        assert ReplayConfig(timing=timing).timing == timing
    cand = [{"name": "x", "model": "m", "path": str(models["good"])}]
    with pytest.raises(ConfigError, match="replay.timing_sample"):
        load_settings(overrides={"replay": {"timing_sample": 1.5}, "candidates": cand})
    with pytest.raises(ConfigError, match="replay.timing"):
        load_settings(overrides={"replay": {"timing": "sometimes"}, "candidates": cand})


@pytest.mark.parametrize("fraction", [0.01, 0.02, 0.1, 0.5])
def test_the_fraction_timed_alone_is_the_configured_one(fraction):
    n = 200_000
    hashes = id_hashes([f"request-{i}" for i in range(n)])
    share = sampled_by_hash(hashes, fraction).mean()
    assert abs(share - fraction) < 5 * math.sqrt(fraction * (1 - fraction) / n)
    assert sampled_by_hash(hashes, 0.0).sum() == 0 and sampled_by_hash(hashes, 1.0).all()
    # Nested: a larger fraction times every request a smaller one does (raising it loses no pairs).
    assert not (sampled_by_hash(hashes, fraction / 2) & ~sampled_by_hash(hashes, fraction)).any()


def test_the_replay_times_exactly_the_hash_sample(models):
    """Without the per-window minimum, the requests timed alone are exactly those the id hash picks,
    whatever the micro-batches: their share is the configured one."""
    messages = stream(models, 3000, rate_per_s=1000)
    fraction = 0.1
    by_cand = replay_all(core(models, timing_sample=fraction, timing_min_per_window=0), messages, batch=256)
    batches = by_cand["digits-v2"]
    ids = [r for _, b in batches for r in b.request_id]
    expected = {r for r, s in zip(ids, sampled_by_hash(id_hashes(ids), fraction), strict=True) if s}
    assert timed_ids(batches) == expected
    assert abs(len(expected) / len(ids) - fraction) < 5 * math.sqrt(fraction * (1 - fraction) / len(ids))
    lat = np.concatenate([b.columns["candidate_latency_ms"] for _, b in batches])
    assert (lat[np.isfinite(lat)] > 0).all()
    # Other micro-batch boundaries, another partition (a redelivery): the same requests are timed.
    again = replay_all(core(models, timing_sample=fraction, timing_min_per_window=0), messages, batch=97, partition=3)
    assert timed_ids(again["digits-v2"]) == expected


def test_every_window_of_a_short_stream_gets_timed_samples(models):
    """50 requests a 1 s window, micro-batches of 64: at 2 % the hash alone leaves about a third of
    the windows without a timed request; the per-window minimum gives each window of each micro-batch two."""
    messages = stream(models, 400, rate_per_s=50)
    by_cand = replay_all(core(models, window_s=1.0, timing_min_per_window=2), messages, batch=64)
    per_window, per_batch_window = defaultdict(int), defaultdict(int)
    windows_seen = set()
    for k, b in by_cand["digits-v2"]:
        window = b.columns["sent_ms"] // 1000
        timed = np.isfinite(b.columns["candidate_latency_ms"])
        windows_seen |= set(window.tolist())
        for w, t in zip(window.tolist(), timed.tolist(), strict=True):
            per_window[w] += t
            per_batch_window[(k, w)] += t
    assert len(windows_seen) == 8
    assert all(per_window[w] >= 2 for w in windows_seen)
    for (k, w), count in per_batch_window.items():
        rows = sum(int((b.columns["sent_ms"] // 1000 == w).sum()) for kk, b in by_cand["digits-v2"] if kk == k)
        assert count >= min(2, rows), (k, w)
    total = sum(per_window.values())
    assert total < 0.25 * len(messages)  # a sample, not every request


def test_both_candidates_time_the_same_requests(models):
    messages = stream(models, 600, rate_per_s=200)
    by_cand = replay_all(core(models, window_s=1.0), messages, batch=128)
    cand, ref = by_cand["digits-v2"], by_cand["digits-v1-replay"]
    assert timed_ids(cand) == timed_ids(ref) and timed_ids(cand)
    for (_, b), (_, r) in zip(cand, ref, strict=True):
        assert b.request_id == r.request_id
        # The paired latency (the replayed baseline's on the same request) exists exactly where timed.
        both = np.isfinite(b.columns["candidate_latency_ms"])
        assert np.array_equal(np.isfinite(b.columns["reference_latency_ms"]), both)
        assert np.array_equal(b.columns["reference_latency_ms"][both], r.columns["candidate_latency_ms"][both])


def test_batched_outputs_equal_per_request_outputs(models):
    """The diffs do not depend on the timing: sampled and batched take the batched call's outputs,
    per_request one call per row; all three agree to float32 rounding (a batched GEMM and a one-row
    one round differently: the replayed baseline's l1 to its own recorded output is 0 per row and
    up to ~2e-6 batched)."""
    messages = stream(models, 500, rate_per_s=200)
    runs = {t: replay_all(core(models, timing=t), messages, batch=128) for t in ("sampled", "per_request", "batched")}
    for name in ("digits-v2", "digits-v1-replay"):
        base = runs["per_request"][name]
        for timing in ("sampled", "batched"):
            other = runs[timing][name]
            for (_, a), (_, b) in zip(base, other, strict=True):
                assert a.request_id == b.request_id and a.error == b.error
                for col in COLUMNS:
                    np.testing.assert_allclose(a.columns[col], b.columns[col], rtol=1e-5, atol=1e-5, err_msg=col)
        lat = {t: np.concatenate([b.columns["candidate_latency_ms"] for _, b in runs[t][name]]) for t in runs}
        assert np.isfinite(lat["per_request"]).all() and np.isfinite(lat["batched"]).all()
        assert 0 < np.isfinite(lat["sampled"]).sum() < len(messages)
    for _, b in runs["batched"]["digits-v2"]:  # the batch time shared evenly
        assert np.ptp(b.columns["candidate_latency_ms"]) == 0


def test_runner_sampled_call_is_the_batched_one_and_times_rows_alone(models):
    runner = OnnxRunner(str(models["good"]))
    x = np.random.default_rng(0).random((40, 64), dtype=np.float32)
    batched, _ = runner.run_stacked({"image": x}, 40, "probabilities", "batched")
    sampled, lat = runner.run_stacked({"image": x}, 40, "probabilities", "sampled")
    per_row, _ = runner.run_stacked({"image": x}, 40, "probabilities", "per_request")
    assert np.array_equal(batched, sampled) and np.isnan(lat).all()
    np.testing.assert_allclose(per_row, batched, rtol=1e-5, atol=1e-6)
    alone = runner.time_alone({"image": x}, "probabilities", [3, 17])
    assert alone.shape == (2,) and (alone > 0).all()


def test_timed_rows_tops_up_short_windows_by_the_next_hashes():
    hashes = np.array([5, 1, 9, 3, 7, 2], dtype=np.uint64) << np.uint64(40)
    sent = np.array([0, 0, 0, 1000, 1000, 1000])
    # A zero fraction samples nothing by hash: what is timed is the per-window minimum alone.
    assert timed_rows(hashes, 0.0, sent, 1000, 1).tolist() == [1, 5]  # the smallest hash of each window
    assert timed_rows(hashes, 0.0, sent, 1000, 2).tolist() == [0, 1, 3, 5]  # window 0: 1, 5; window 1: 2, 3
    assert timed_rows(hashes, 0.0, sent, 1000, 9).tolist() == list(range(6))  # no more rows than there are
    assert timed_rows(hashes, 0.0).tolist() == []
    assert timed_rows(hashes, 1.0).tolist() == list(range(6))
    # Small hashes are inside any sample: with 2 % every one of these is timed by the hash alone.
    assert timed_rows(hashes, 0.02, sent, 1000, 1).tolist() == list(range(6))
