"""The replay stage against its own ceiling, side by side: how fast one Python consumer drains the
mirror topic (raw, and decoding every message as the replay stage does), and how fast one
``--role replay`` process drains the same topic in each timing mode, with this code and with an
older commit's (``--old REV``, unpacked with ``git archive``, or ``--old DIR``, a source tree such as
a copy of the working tree before a change). Each run measures the ceilings, then every replay case
in an order that turns by one each run (no case always runs first), then the ceiling with decode
once more; a replay case's ratio in that run is its rate over the mean of the run's two decode
ceilings, so a machine that speeds up or slows down between runs moves both sides of a ratio.
Prints every run, the medians of the rates and the median of the per-run ratios; none of this is a test.

    python bench/bench_replay_timing.py --requests 200000 --runs 3 --old HEAD

Each replay run is its own consumer group on the same pre-filled topic, 2 candidates (digits v2
and its degraded retrain), [replay] batch_size 1,024 (the default), exactly-once transactions on
(the default). A rate counts from the group's first committed offset to its last (as
bench/bench_stages.py); a ceiling rate from the first record fetched to the last.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from io import BytesIO
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_stages import CANDIDATES, MIRROR_PARTITIONS, bootstrap, drain_rate  # noqa: E402

from streams.demo import TrafficGenerator  # noqa: E402
from harness import create_topic, free_port, produce, write_worker_config  # noqa: E402
from streams.models import build_digits_models  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Worker:
    """``shadowlens worker --role replay`` from a given source tree (this one or an unpacked commit)."""

    def __init__(self, root: Path, config: Path, log_path: Path):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(root)}
        env.pop("KAFKA_BOOTSTRAP", None)
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker", "--config", str(config), "--role", "replay",
             "--loglevel", "warning"], cwd=root, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text()[-chars:]

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def unpack(rev: str, into: Path) -> Path:
    """The tree of ``rev`` (git archive), without touching the repository's worktrees."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


async def _drain_consumer(broker: str, topic: str, n: int, decode: bool, batch: int) -> float:
    """One aiokafka consumer with the replay stage's settings (streams.kafka_io.consumer) reads the
    topic's n records; records/s from the first fetch to the last record."""
    from schemas.decode import decode_for_replay
    from streams import kafka_io
    from streams.config import load_settings

    settings = load_settings(overrides={"kafka": {"bootstrap": broker},
                                        "candidates": [{"name": "x", "model": "m", "path": __file__}]})  # fmt: skip
    consumer = kafka_io.consumer(settings, topic, f"bench-ceiling-{uuid.uuid4().hex[:8]}", batch)
    await consumer.start()
    seen, first = 0, None
    try:
        while seen < n:
            fetched = await consumer.getmany(timeout_ms=500, max_records=batch)
            for msgs in fetched.values():
                if first is None and msgs:
                    first = time.perf_counter()
                if decode:
                    for m in msgs:
                        decode_for_replay(m.value)
                seen += len(msgs)
        return n / (time.perf_counter() - first)
    finally:
        await consumer.stop()


def ceiling(broker: str, topic: str, n: int, decode: bool, batch: int) -> float:
    return asyncio.run(_drain_consumer(broker, topic, n, decode, batch))


def replay_rate(root: Path, broker: str, models: dict, topic: str, work: Path, timing: str, name: str,
                batch_size: int = 1024) -> float:  # fmt: skip
    group = f"bench-timing-{uuid.uuid4().hex[:6]}"
    config = write_worker_config(
        work, broker, {c: models["good" if c == "digits-v2" else "degraded"] for c in CANDIDATES}, topic, free_port(),
        timing=timing, window_s=3600, idle_close_s=3600, partitions=MIRROR_PARTITIONS, diffs_partitions=4,
        kafka={"group_id": group, "diffs_topic": f"{topic}.diffs-{group}"}, name=f"{name}.toml",
        chdb=work / f"{name}-chdb", replay={"batch_size": batch_size},
    )  # fmt: skip
    worker = Worker(root, config, work / f"{name}.log")
    try:
        rate, _ = drain_rate(broker, topic, group, [worker], name)
    finally:
        worker.stop()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timings", nargs="+", default=["sampled", "per_request", "batched"])
    parser.add_argument("--old", default="", help="also run this commit's replay (git rev, or a directory holding "
                        "a source tree, e.g. a copy of the working tree before a change), side by side")
    parser.add_argument("--old-timings", nargs="+", default=["per_request", "batched"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1024],
                        help="[replay] batch_size of this code's runs (each timing at each)")
    parser.add_argument("--old-batch-sizes", type=int, nargs="+", default=[1024], help="the same for the old code's runs")
    args = parser.parse_args()
    broker = bootstrap()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        old_root = (Path(args.old) if Path(args.old).is_dir() else unpack(args.old, work / "old")) if args.old else None
        models = build_digits_models(work / "models")
        messages = TrafficGenerator(models["baseline"], rate_per_s=1000).messages(args.requests)
        topic = f"bench-timing-{uuid.uuid4().hex[:8]}"
        create_topic(broker, topic, MIRROR_PARTITIONS)
        produce(broker, topic, messages)
        print(f"{args.requests:,} requests on {topic} ({MIRROR_PARTITIONS} partitions); broker {broker}; "
              f"{os.cpu_count()} cores")  # fmt: skip
        ceilings = [("consumer", "raw"), ("consumer", "decode")]
        replays = [("new", t if b == 1024 else f"{t}@{b}") for b in args.batch_sizes for t in args.timings]
        replays += [("old", t if b == 1024 else f"{t}@{b}") for b in args.old_batch_sizes for t in args.old_timings] if old_root else []
        rates: dict[tuple[str, str], list[float]] = {c: [] for c in ceilings + replays}
        ratios: dict[tuple[str, str], list[float]] = {c: [] for c in replays}
        for i in range(args.runs):
            turned = replays[i % len(replays):] + replays[: i % len(replays)]
            run: dict[tuple[str, str], float] = {}
            decode_ceilings = []
            for case in [*ceilings, *turned, ("consumer", "decode")]:
                who, what = case
                if who == "consumer":
                    rate = ceiling(broker, topic, args.requests, what == "decode", 1024)
                    if what == "decode":
                        decode_ceilings.append(rate)
                else:
                    root = ROOT if who == "new" else old_root
                    timing, _, size = what.partition("@")
                    rate = replay_rate(root, broker, models, topic, work, timing, f"{who}-{timing}-{size or 1024}-{i}",
                                       int(size or 1024))  # fmt: skip
                    run[case] = rate
                rates[case].append(rate)
                print(f"  run {i + 1} {who:8} {what:12} {rate:>12,.0f} requests/s", flush=True)
            for case, rate in run.items():
                ratios[case].append(rate / statistics.mean(decode_ceilings))
        decode_ceiling = statistics.median(rates[("consumer", "decode")])
        print(f"\nmedians of {args.runs} runs (runs in brackets); x ceiling: the median of the per-run ratios to "
              "that run's consumer + decode ceiling (for the ceilings: median over median)")  # fmt: skip
        for case, series in rates.items():
            who, what = case
            med = statistics.median(series)
            runs = " / ".join(f"{r:,.0f}" for r in series)
            ratio = statistics.median(ratios[case]) if case in ratios else med / decode_ceiling
            per_run = f"  per run {' / '.join(f'{r:.3f}' for r in ratios[case])}" if case in ratios else ""
            print(f"{who:8} {what:12} {med:>12,.0f} ({runs})  {ratio:.2f}x{per_run}")


if __name__ == "__main__":
    main()
