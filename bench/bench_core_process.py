"""What the replay core in a process of its own would buy (issue #22's next step), before building it.

The replay stage runs its core (``ReplayCore.replay``) on a thread of the worker process, so the core
and the event loop (fetch, transactions) share one GIL. This bench drains the same pre-filled topic
three ways, side by side in each run (order turning run to run), none of them producing anything:

* ``thread``: one aiokafka consumer (the replay stage's settings), each micro-batch replayed and its
  diff batches encoded on one core thread, the next batch fetched meanwhile (the stage's layout);
* ``process``: the same, the core in a child process (``ProcessPoolExecutor(1)``), each micro-batch
  sent as (value, partition, offset, topic, key) tuples and the encoded diff batches sent back;
* the ceiling: the consumer decoding every message (bench_replay_timing.py's).

    python bench/bench_core_process.py --requests 200000 --runs 5

Prints every run, the medians and the per-run ratios to the ceiling; none of this is a test, and
neither arm is the product (no transactions, no registry): it bounds what the split is worth.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_replay_timing import ceiling  # noqa: E402
from bench_stages import CANDIDATES, MIRROR_PARTITIONS, bootstrap  # noqa: E402
from harness import create_topic, produce, write_worker_config  # noqa: E402

from streams.demo import TrafficGenerator  # noqa: E402
from streams.models import build_digits_models  # noqa: E402

BATCH = 2048
_CORE = None  # the child's ReplayCore (process arm)


def _settings(config: Path):
    from streams.config import load_settings

    return load_settings(config)


def _start_child(config: str) -> None:
    global _CORE
    from streams.heap import tune_collector
    from streams.replay.core import ReplayCore

    _CORE = ReplayCore(_settings(Path(config)))
    tune_collector()


def _replay_in_child(records: list[tuple]) -> list[bytes]:
    from streams.replay.core import Inbound

    out = _CORE.replay([Inbound(*r) for r in records])
    shared: dict = {}
    return [b.encode(shared) for b in out.batches]


def _replay_here(core, messages: list) -> list[bytes]:
    out = core.replay(messages)
    shared: dict = {}
    return [b.encode(shared) for b in out.batches]


async def _drain(broker: str, topic: str, n: int, config: Path, mode: str, depth: int) -> float:
    from streams import kafka_io
    from streams.replay.core import ReplayCore

    settings = _settings(config)
    if mode == "process":
        pool = ProcessPoolExecutor(1, initializer=_start_child, initargs=(str(config),))
        pool.submit(time.sleep, 0).result()  # the child is up and its core loaded before the clock starts
    else:
        pool, core = ThreadPoolExecutor(1), ReplayCore(settings)
    consumer = kafka_io.consumer(settings, topic, f"bench-core-{uuid.uuid4().hex[:8]}", BATCH)
    await consumer.start()
    loop = asyncio.get_running_loop()
    seen, first, pending = 0, None, []  # up to ``depth`` micro-batches given to the core at once
    try:
        while seen < n:
            fetched = await consumer.getmany(timeout_ms=0 if pending else 500, max_records=BATCH)
            messages = [m for msgs in fetched.values() for m in msgs]
            if messages and first is None:
                first = time.perf_counter()
            while len(pending) >= depth or (pending and not messages):
                await pending.pop(0)
            if messages:
                if mode == "process":
                    records = [(m.value, m.partition, m.offset, m.topic, m.key) for m in messages]
                    pending.append(loop.run_in_executor(pool, _replay_in_child, records))
                else:
                    pending.append(loop.run_in_executor(pool, _replay_here, core, messages))
                seen += len(messages)
        for future in pending:
            await future
        return n / (time.perf_counter() - first)
    finally:
        await consumer.stop()
        pool.shutdown(wait=True, cancel_futures=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--depth", type=int, default=1, help="micro-batches given to the core at once (queued)")
    args = parser.parse_args()
    broker = bootstrap()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        models = build_digits_models(work / "models")
        topic = f"bench-core-{uuid.uuid4().hex[:8]}"
        create_topic(broker, topic, MIRROR_PARTITIONS)
        produce(broker, topic, TrafficGenerator(models["baseline"], rate_per_s=1000).messages(args.requests))
        config = write_worker_config(
            work, broker, {c: models["good" if c == "digits-v2" else "degraded"] for c in CANDIDATES}, topic, 1,
            timing="sampled", window_s=3600, idle_close_s=3600, partitions=MIRROR_PARTITIONS,
            replay={"batch_size": BATCH},
        )  # fmt: skip
        print(f"{args.requests:,} requests on {topic}; {BATCH:,} a micro-batch; depth {args.depth}; "
              f"{os.cpu_count()} cores")  # fmt: skip
        modes = ["thread", "process"]
        rates: dict[str, list[float]] = {m: [] for m in ["ceiling", *modes]}
        ratios: dict[str, list[float]] = {m: [] for m in modes}
        for i in range(args.runs):
            run = {"ceiling": ceiling(broker, topic, args.requests, True, 1024)}
            for mode in modes[i % 2 :] + modes[: i % 2]:
                run[mode] = asyncio.run(_drain(broker, topic, args.requests, config, mode, args.depth))
            for what, rate in run.items():
                rates[what].append(rate)
                if what in ratios:
                    ratios[what].append(rate / run["ceiling"])
            print("  run", i + 1, "  ".join(f"{w} {r:,.0f}" for w, r in run.items()), flush=True)
        print(f"\nmedians of {args.runs} runs; x ceiling: median of the per-run ratios")
        for what, series in rates.items():
            extra = (f"  {statistics.median(ratios[what]):.2f}x (per run "
                     f"{' / '.join(f'{r:.2f}' for r in ratios[what])})") if what in ratios else ""  # fmt: skip
            print(f"{what:8} {statistics.median(series):>10,.0f} req/s{extra}")


if __name__ == "__main__":
    main()
