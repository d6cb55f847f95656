"""Benchmark of the scoring engine (not a test). Prints medians of several runs.

    .venv/bin/python bench/bench_scorers.py [--rows 1000000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from scorers.accumulate import PairAccumulator
from scorers.diffs import classification_diffs
from scorers.judge import JudgePolicy, judge
from scorers.simulate import simulate, synthetic_outputs
from scorers.sketch import LatencySketch


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n, r = args.rows, args.repeats

    b, c = synthetic_outputs(rng, n, classes=10, flip_rate=0.04)
    t = timed(lambda: classification_diffs(b, c), r)
    print(f"classification_diffs {n:,} x 10 probabilities: {t * 1e3:.0f} ms, {n / t:,.0f} rows/s")
    z = np.log(b)
    t = timed(lambda: classification_diffs(z, np.log(c), from_logits=True), r)
    print(f"classification_diffs {n:,} x 10 logits:        {t * 1e3:.0f} ms, {n / t:,.0f} rows/s")

    d = classification_diffs(b, c)
    lat_b, lat_c = rng.lognormal(2, 0.4, n), rng.lognormal(2.05, 0.4, n)
    ids = [f"req-{i}" for i in range(n)]
    attrs = [{"country": ("de", "fr", "us", "br")[i % 4], "device": ("ios", "android")[i % 2]} for i in range(n)]
    labels = np.where(rng.random(n) < 0.3, d.baseline_label, np.nan)

    def update(with_slices: bool):
        acc = PairAccumulator()
        acc.update(d, baseline_latency_ms=lat_b, candidate_latency_ms=lat_c, request_ids=ids,
                   attributes=attrs if with_slices else None, labels=labels)
        return acc

    t = timed(lambda: update(False), r)
    print(f"PairAccumulator.update {n:,} rows (no slices):   {t * 1e3:.0f} ms, {n / t:,.0f} rows/s")
    t = timed(lambda: update(True), r)
    print(f"PairAccumulator.update {n:,} rows (2 slice keys): {t * 1e3:.0f} ms, {n / t:,.0f} rows/s")

    policy = JudgePolicy(label_flip_rate_margin=0.10)
    big = update(True)
    small = PairAccumulator()
    small.update(d.take(np.arange(2500)), baseline_latency_ms=lat_b[:2500], candidate_latency_ms=lat_c[:2500],
                 request_ids=ids[:2500], attributes=attrs[:2500], labels=labels[:2500])
    for name, acc in (("2,500", small), (f"{n:,}", big)):
        t = timed(lambda acc=acc: judge(acc, policy), max(r, 20))
        print(f"judge (window close) on {name} requests: {t * 1e3:.1f} ms")
    t = timed(lambda: PairAccumulator.from_dict(big.to_dict()).merge(small), max(r, 20))
    print(f"PairAccumulator to_dict + from_dict + merge: {t * 1e3:.2f} ms")

    s_vals = rng.lognormal(2, 0.5, n)
    t = timed(lambda: LatencySketch().update(s_vals), r)
    print(f"LatencySketch.update, one batch of {n:,}: {n / t:,.0f} values/s")
    batches = np.array_split(s_vals[:250_000], 1000)

    def small_batches():
        s = LatencySketch()
        for x in batches:
            s.update(x)
    t = timed(small_batches, r)
    print(f"LatencySketch.update, batches of 250: {250_000 / t:,.0f} values/s ({1000 / t:,.0f} batches/s)")
    a, bsk = LatencySketch(), LatencySketch()
    a.update(s_vals[: n // 2])
    bsk.update(s_vals[n // 2:])
    t = timed(lambda: [a.copy().merge(bsk) for _ in range(100)], r) / 100
    print(f"LatencySketch merge (incl. copy): {1 / t:,.0f} merges/s")
    t = timed(lambda: LatencySketch.from_dict(a.to_dict()), r)
    print(f"LatencySketch to_dict + from_dict: {t * 1e6:.0f} µs")
    try:
        import ddsketch

        ref_vals = s_vals[:100_000].tolist()

        def ref():
            s = ddsketch.DDSketch(0.005)
            for v in ref_vals:
                s.add(v)
        t = timed(ref, 3)
        print(f"(reference) ddsketch.DDSketch.add, one value at a time: {100_000 / t:,.0f} values/s")
    except ImportError:
        pass

    t = timed(lambda: simulate(runs=1000, requests=5000, flip_rate=0.03), 3)
    print(f"calibration harness: 1,000 runs x 5,000 requests x 20 looks: {t:.2f} s")


if __name__ == "__main__":
    main()
