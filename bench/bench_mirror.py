"""Benchmark of the mirror SDK: caller-side cost of ``publish`` and sustained throughput.

    .venv/bin/python bench/bench_mirror.py --bootstrap 127.0.0.1:19092 [--runs 5]

Caller cost: each ``MirrorClient.publish`` call is timed with perf_counter_ns while the
client's sender thread is live and delivering to the broker (so GIL sharing with the sender
is in the figure). A typical request: inputs 1x64 float32, output 1x10 float32, 2 attributes.
Modes: "tight" calls back to back (worst case for contention); "paced" at a fixed rate like a
busy service (5,000 req/s); "sampled 10%" tight with a 0.1 sampling rate.

Throughput: records acknowledged by the broker (acks=all, lz4) per second, publishing as fast
as the buffer allows (the bench waits when the buffer is 80% full instead of dropping).
Each figure is the median over --runs runs; target p99 <= 50 us on the caller.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid

import numpy as np

from mirror import MirrorClient

X = np.random.default_rng(0).random((1, 64), dtype=np.float32)
Y = np.random.default_rng(1).random((1, 10), dtype=np.float32)
ATTRS = {"country": "de", "device": "ios"}


def caller_cost(bootstrap: str, calls: int, rate: float, paced_per_s: float | None) -> dict:
    client = MirrorClient(bootstrap_servers=bootstrap, topic=f"bench-mirror-{uuid.uuid4().hex[:6]}",
                          buffer_size=calls + 1, default_sample_rate=rate, client_id="bench")
    publish, clock = client.publish, time.perf_counter_ns
    timings = np.empty(calls, dtype=np.int64)
    time.sleep(0.5)  # let the sender connect
    interval = 1e9 / paced_per_s if paced_per_s else 0
    next_at = clock()
    for i in range(calls):
        if interval:
            while clock() < next_at:
                pass
            next_at += interval
        t0 = clock()
        publish(f"req-{i}", "digits", "v1", {"x": X}, {"probs": Y}, 1.5, ATTRS)
        timings[i] = clock() - t0
    stats = client.close(timeout=60)
    return {"p50_us": float(np.percentile(timings, 50)) / 1000, "p99_us": float(np.percentile(timings, 99)) / 1000,
            "p999_us": float(np.percentile(timings, 99.9)) / 1000, "published": stats.published,
            "sampled_out": stats.sampled_out, "dropped": stats.dropped}


def throughput(bootstrap: str, records: int, buffer_size: int = 50_000) -> dict:
    client = MirrorClient(bootstrap_servers=bootstrap, topic=f"bench-mirror-{uuid.uuid4().hex[:6]}",
                          buffer_size=buffer_size, client_id="bench")
    time.sleep(0.5)
    high_water = int(buffer_size * 0.8)
    t0 = time.perf_counter()
    for i in range(records):
        while i % 1000 == 0 and client.stats().buffer_depth > high_water:
            time.sleep(0.001)
        client.publish(f"req-{i}", "digits", "v1", {"x": X}, {"probs": Y}, 1.5, ATTRS)
    stats = client.close(timeout=120)
    elapsed = time.perf_counter() - t0
    return {"records_per_s": stats.published / elapsed, "published": stats.published, "dropped": stats.dropped,
            "failed": stats.failed, "seconds": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:19092"))
    parser.add_argument("--calls", type=int, default=100_000, help="timed publish calls per caller-cost run")
    parser.add_argument("--records", type=int, default=200_000, help="records per throughput run")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    modes = {
        "tight, rate 1.0": dict(rate=1.0, paced_per_s=None),
        "paced 5k/s, rate 1.0": dict(rate=1.0, paced_per_s=5000),
        "tight, sampled 10%": dict(rate=0.1, paced_per_s=None),
    }
    results: dict[str, dict] = {}
    for name, options in modes.items():
        calls = min(args.calls, 20_000) if options["paced_per_s"] else args.calls
        runs = [caller_cost(args.bootstrap, calls, **options) for _ in range(args.runs)]
        results[name] = {k: statistics.median(r[k] for r in runs) for k in ("p50_us", "p99_us", "p999_us")}
        results[name]["p99_us_runs"] = [round(r["p99_us"], 2) for r in runs]
        print(f"publish {name:22s} p50 {results[name]['p50_us']:6.2f} us  p99 {results[name]['p99_us']:6.2f} us  "
              f"p99.9 {results[name]['p999_us']:7.2f} us  (p99 per run {results[name]['p99_us_runs']})", flush=True)
    runs = [throughput(args.bootstrap, args.records) for _ in range(args.runs)]
    rate = statistics.median(r["records_per_s"] for r in runs)
    results["throughput"] = {"records_per_s": rate, "runs": [round(r["records_per_s"]) for r in runs],
                             "lost": sum(r["dropped"] + r["failed"] for r in runs)}
    print(f"sustained throughput to {args.bootstrap}: {rate:,.0f} records/s acknowledged "
          f"(runs {results['throughput']['runs']}, lost {results['throughput']['lost']})")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
