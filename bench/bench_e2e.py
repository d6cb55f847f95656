"""End-to-end throughput: aiokafka producer -> Kafka -> faust worker -> chDB, on this machine.

For each timing mode, runs the worker as a separate process (as in production), waits until it
is up, then produces N mirrored digits requests and measures until every request is counted in
a closed window (read through the verdicts API). Reports the median of --runs runs.

Usage: KAFKA_BOOTSTRAP=127.0.0.1:19092 python bench/bench_e2e.py [--requests 20000] [--runs 3]
(without KAFKA_BOOTSTRAP it starts scripts/kafka.sh).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from streams.demo import TrafficGenerator
from streams.models import build_digits_models

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harness lives with the tests
from harness import WorkerProcess, free_port, produce, window_totals, write_worker_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def bootstrap() -> str:
    if os.environ.get("KAFKA_BOOTSTRAP"):
        return os.environ["KAFKA_BOOTSTRAP"]
    out = subprocess.run([str(ROOT / "scripts/kafka.sh"), "start"], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1].split("=", 1)[1]


def one_run(broker: str, messages: list[bytes], models: dict, timing: str, work: Path) -> dict:
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    port = free_port()
    candidates = {"digits-v2": models["good"], "digits-v2-degraded": models["degraded"]}
    # Windows as long as the run: what is timed is replay + scoring + writes, not window closing.
    config = write_worker_config(work, broker, candidates, topic, port, timing=timing, window_s=3600,
                                 idle_close_s=1)  # fmt: skip
    worker = WorkerProcess(config, work / f"{topic}.log")
    api = f"http://127.0.0.1:{port}"
    try:
        worker.wait_for(lambda: httpx.get(f"{api}/readyz", timeout=2).status_code == 200, 120, "API up", 0.2)
        time.sleep(3)  # let the consumer group settle its assignment
        start = time.perf_counter()
        produce(broker, topic, messages)
        produced = time.perf_counter() - start
        worker.wait_for(
            lambda: all(v >= len(messages) for v in window_totals(api, "digits", list(candidates)).values()),
            600, "all requests in windows", poll_s=0.1,
        )  # fmt: skip
        elapsed = time.perf_counter() - start
    finally:
        worker.stop()
    return {"elapsed_s": elapsed, "produce_s": produced, "req_per_s": len(messages) / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timing", nargs="+", default=["per_request", "batched"])
    args = parser.parse_args()
    broker = bootstrap()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = build_digits_models(work / "models")
        messages = TrafficGenerator(models["baseline"]).messages(args.requests)
        print(f"{args.requests} mirrored requests x 2 candidates, broker {broker}, {os.cpu_count()} cores")
        for timing in args.timing:
            runs = []
            for i in range(args.runs):
                run_dir = work / f"{timing}-{i}"
                run_dir.mkdir()
                runs.append(one_run(broker, messages, models, timing, run_dir))
                print(f"  {timing} run {i + 1}: {runs[-1]['req_per_s']:.0f} req/s "
                      f"({runs[-1]['elapsed_s']:.1f} s, producing took {runs[-1]['produce_s']:.1f} s)")  # fmt: skip
            median = statistics.median(r["req_per_s"] for r in runs)
            print(f"{timing}: median {median:.0f} requests/s end to end (each replayed against 2 candidates)")


if __name__ == "__main__":
    main()
