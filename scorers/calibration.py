"""Calibration on realistic traffic, through the real path: ``SeenFilter`` -> ``PairAccumulator`` -> ``judge()``.

Each run streams ``requests`` simulated requests in windows of ``window``; after every window the
window is folded into the cumulative accumulator exactly as the judge stage does it and ``judge()``
is called with the memory of the previous look. Nothing of the decision rule is re-implemented here
(``scorers.simulate`` keeps a vectorised twin of the i.i.d. rule for very many runs; it is checked
against ``judge()`` in the tests).

Scenarios (``SCENARIOS``), all at the default ``JudgePolicy`` unless said otherwise:

* ``aa``            identical candidate: 0.3 % near-tie flips, with a noise run growing beside it;
* ``at_margin``     flip rate = margin (0.02): the hardest case for both sides;
* ``power``         flip rate = margin + 2 points;
* ``repeats_half``  every distinct input arrives in a burst of 5–20 identical requests (retries,
                    popular inputs); a deterministic model flips all of a burst or none; mean flip
                    margin / 2;
* ``repeats_margin`` the same at mean flip = margin;
* ``drift``         flip probability margin * (1 + 0.9 sin(2 pi t / cycle + random phase)): the day's
                    mean is the margin; ``min_span_s`` = one cycle;
* ``bad_slice``     20 slice values of 5 % each; one at 3x the margin, the rest at margin / 4;
* ``aa_slices``     20 fine slices (0.3 % flips), to show what the slice gate costs an A/A promote;
* ``latency_2x``    an A/A candidate on flips, but 2x slower on heavy-tailed latencies (lognormal
                    sigma 1, 1 % spikes x20), with a replayed baseline on the same hardware;
* ``latency_aa``    the same tail, not slower.

Run the full table with ``python bench/calibration.py``; the tests run a quick version.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from scorers.accumulate import PairAccumulator
from scorers.diffs import ClassificationDiffs
from scorers.evidence import SeenFilter
from scorers.judge import JudgeMemory, JudgePolicy, judge
from scorers.latency import PairedLatency

MARGIN = 0.02
CYCLE_REQUESTS = 2_500  # one simulated "day" in the drift scenario (4 cycles in 10,000 requests)
MS_PER_REQUEST = 1_000


@dataclass
class Traffic:
    """Per-request values of one run, in arrival order."""

    flip: np.ndarray  # bool
    abs_delta: np.ndarray  # float in [0, 1]
    input_key: np.ndarray  # uint64, != 0
    segment: np.ndarray | None = None  # slice value per request (str), or None
    noise_flip: np.ndarray | None = None  # the replayed baseline's flips on the same requests
    latency: np.ndarray | None = None  # (3, n): production, replayed baseline, candidate (ms)


def _iid(rng, n, p) -> Traffic:
    return Traffic(rng.random(n) < p, rng.beta(0.2, 19.8, n), np.arange(1, n + 1, dtype=np.uint64))


def _bursts(rng, n, p) -> Traffic:
    sizes = rng.integers(5, 21, size=n // 5 + 1)
    owner = np.repeat(np.arange(sizes.size), sizes)[:n]
    flip_per_input = rng.random(sizes.size) < p
    delta_per_input = rng.beta(0.2, 19.8, sizes.size)
    return Traffic(flip_per_input[owner], delta_per_input[owner], (owner + 1).astype(np.uint64))


def _drift(rng, n, p) -> Traffic:
    t = np.arange(n)
    rate = p * (1 + 0.9 * np.sin(2 * np.pi * t / CYCLE_REQUESTS + rng.uniform(0, 2 * np.pi)))
    return Traffic(rng.random(n) < rate, rng.beta(0.2, 19.8, n), np.arange(1, n + 1, dtype=np.uint64))


def _slices(rng, n, bad: float | None, rest: float) -> Traffic:
    seg = rng.integers(0, 20, n)
    p = np.where(seg == 0, bad if bad is not None else rest, rest)
    tr = _iid(rng, n, 0.0)
    tr.flip = rng.random(n) < p
    tr.segment = np.array([f"s{v:02d}" for v in range(20)], dtype=object)[seg]
    return tr


def _aa(rng, n) -> Traffic:
    tr = _iid(rng, n, 0.003)
    tr.abs_delta = rng.beta(0.01, 99.99, n)
    tr.noise_flip = rng.random(n) < 0.003
    return tr


def _latency(rng, n, slower: float) -> Traffic:
    """Heavy tail: a request's own cost ~ lognormal(0, 1), x20 for 1 % of requests (cache misses,
    long inputs); each run of it adds hardware noise lognormal(0, 0.1). Production ran elsewhere
    (x1.3, noisier); the candidate is ``slower`` x the replayed baseline on the same machine."""
    tr = _aa(rng, n)
    cost = rng.lognormal(0.0, 1.0, n) * np.where(rng.random(n) < 0.01, 20.0, 1.0)
    noise = rng.lognormal(0.0, 0.1, (3, n))
    tr.latency = np.stack([1.3 * cost * rng.lognormal(0.0, 0.3, n), cost * noise[1], slower * cost * noise[2]])
    return tr


SCENARIOS: dict[str, tuple[Callable[[np.random.Generator, int], Traffic], dict]] = {
    "aa": (_aa, {}),
    "at_margin": (lambda rng, n: _iid(rng, n, MARGIN), {}),
    "power": (lambda rng, n: _iid(rng, n, MARGIN + 0.02), {}),
    "repeats_half": (lambda rng, n: _bursts(rng, n, MARGIN / 2), {}),
    "repeats_margin": (lambda rng, n: _bursts(rng, n, MARGIN), {}),
    "drift": (lambda rng, n: _drift(rng, n, MARGIN), {"min_span_s": CYCLE_REQUESTS * MS_PER_REQUEST / 1000}),
    "bad_slice": (lambda rng, n: _slices(rng, n, 3 * MARGIN, MARGIN / 4), {}),
    "aa_slices": (lambda rng, n: _slices(rng, n, None, 0.003), {}),
    "latency_2x": (lambda rng, n: _latency(rng, n, 2.0), {}),
    "latency_aa": (lambda rng, n: _latency(rng, n, 1.0), {}),
}


def _diffs(flip: np.ndarray, abs_delta: np.ndarray) -> ClassificationDiffs:
    n = flip.size
    d = ClassificationDiffs.empty(n)
    d.label_flip[:] = flip
    d.confidence_delta[:] = -abs_delta
    for f in ("l1", "linf", "hellinger"):
        getattr(d, f)[:] = abs_delta
    d.topk_overlap[:] = 1.0
    d.baseline_label[:] = 0
    d.candidate_label[:] = np.where(flip, 1, 0)
    return d


@dataclass
class RunTrace:
    verdicts: list[str]
    flagged_at: int | None  # first look (requests) with a flagged slice


def run_once(traffic: Traffic, policy: JudgePolicy, *, window: int = 250, seed: int = 0) -> RunTrace:
    """One shadow run through the real accumulator and judge, judged after every window."""
    n = traffic.flip.size
    rng = np.random.default_rng(seed)
    cum, noise = PairAccumulator(), PairAccumulator() if traffic.noise_flip is not None else None
    paired = PairedLatency() if traffic.latency is not None else None
    seen, noise_seen = SeenFilter(capacity=50_000, bits=1 << 20), SeenFilter(capacity=50_000, bits=1 << 20)
    memory, verdicts, flagged_at = JudgeMemory(), [], None
    for end in range(window, n + 1, window):
        sl = slice(end - window, end)
        keys = traffic.input_key[sl]
        sent = np.arange(end - window, end, dtype=np.int64) * MS_PER_REQUEST
        lat = rng.lognormal(0.0, 0.2, (3, window))
        if traffic.latency is not None:
            lat = traffic.latency[:, sl]
            paired.update(lat[1], lat[2])
        attrs = None if traffic.segment is None else [{"segment": v} for v in traffic.segment[sl]]
        ids = [str(i) for i in range(end - window, end)]
        cum.update(_diffs(traffic.flip[sl], traffic.abs_delta[sl]), baseline_latency_ms=lat[0],
                   candidate_latency_ms=lat[2], request_ids=ids, attributes=attrs,
                   evidence=seen.first_seen(keys), sent_ms=sent)
        if noise is not None:
            noise.update(_diffs(traffic.noise_flip[sl], traffic.abs_delta[sl] * 0), baseline_latency_ms=lat[0],
                         candidate_latency_ms=lat[1], request_ids=ids, evidence=noise_seen.first_seen(keys),
                         sent_ms=sent)
        j = judge(cum, policy, noise=noise, memory=memory, paired_latency=paired)
        memory = j.memory
        verdicts.append(j.verdict)
        if flagged_at is None and j.failed_slices:
            flagged_at = end
    return RunTrace(verdicts, flagged_at)


@dataclass
class CalibrationResult:
    scenario: str
    runs: int
    looks: np.ndarray
    verdicts: np.ndarray  # (runs, looks)
    flagged_at: np.ndarray  # (runs,) requests at the first flagged slice, -1 if never

    def ever(self, verdict: str) -> float:
        return float((self.verdicts == verdict).any(axis=1).mean())

    def first_within(self, verdict: str, requests: int) -> float:
        cols = self.looks <= requests
        hit = [next((v for v in row[cols] if v != "hold"), "hold") == verdict for row in self.verdicts]
        return float(np.mean(hit))

    def promoted_before_flagged(self) -> float:
        first_promote = np.array([int(self.looks[np.argmax(r == "promote")]) if (r == "promote").any() else -1
                                  for r in self.verdicts])
        bad = (first_promote >= 0) & ((self.flagged_at < 0) | (first_promote < self.flagged_at))
        return float(bad.mean())

    def flip_back(self) -> float:
        """Share of runs where a promote is later followed by a hold (verdict instability)."""
        out = []
        for r in self.verdicts:
            idx = np.flatnonzero(r == "promote")
            out.append(idx.size > 0 and bool((r[idx[0]:] == "hold").any()))
        return float(np.mean(out))

    def median_promote_at(self) -> int | None:
        at = [int(self.looks[np.argmax(r == "promote")]) for r in self.verdicts if (r == "promote").any()]
        return int(np.median(at)) if at else None


def calibrate(scenario: str, *, runs: int = 200, requests: int = 10_000, window: int = 250, seed: int = 0,
              policy: JudgePolicy | None = None) -> CalibrationResult:
    make, overrides = SCENARIOS[scenario]
    policy = dataclasses.replace(policy or JudgePolicy(), **overrides)
    rng = np.random.default_rng(seed)
    traces = [run_once(make(rng, requests), policy, window=window, seed=seed * 100_003 + r) for r in range(runs)]
    looks = np.arange(window, requests + 1, window)
    return CalibrationResult(scenario, runs, looks, np.array([t.verdicts for t in traces]),
                             np.array([-1 if t.flagged_at is None else t.flagged_at for t in traces]))
