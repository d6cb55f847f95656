"""Throughput of the two stages, each measured as it runs in production (separate processes, real
Kafka, chDB), plus the embedded pipeline. Prints medians of --runs runs; none of this is a test.

- pipeline: ReplayCore + JudgeCore in one process, no Kafka (what the demo runs), requests/s, with
            the demo's chunks of requests per call and with one 256-request micro-batch per call;
- replay:   --role replay processes (1, then 2) draining a pre-filled mirror topic of --requests
            digits requests against 2 candidates, requests/s from the group's first commit to its
            last (start-up excluded);
- judge:    a --role judge process draining the diffs topic those requests produced, diff rows/s
            into chDB, with an empty table and with --stored-rows rows already stored;
- e2e:      producer -> Kafka -> one replay process -> one judge process -> chDB, requests/s from
            the first message produced to the last offset committed by the judge.

Usage: KAFKA_BOOTSTRAP=127.0.0.1:19092 python bench/bench_stages.py [--requests 200000] [--runs 3]
       [--stored-rows 20000000] [--only pipeline replay judge e2e]  (judge-empty / judge-stored: one table only)
(without KAFKA_BOOTSTRAP it starts scripts/kafka.sh).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path


from streams.config import ReplayConfig
from streams.demo import TrafficGenerator
from streams.models import build_digits_models

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harness lives with the tests
from harness import (  # noqa: E402
    GroupProgress, WorkerProcess, create_topic, free_port, group_progress, produce, produce_batched,
    write_worker_config,
)  # fmt: skip

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = ("digits-v2", "digits-v2-degraded")
MIRROR_PARTITIONS = 6
TIMING = "per_request"  # --timing
EXACTLY_ONCE = True  # --at-least-once turns the replay transactions off
BATCH_SIZE = ReplayConfig.model_fields["batch_size"].default  # --batch-size: [replay] batch_size of the workers
PRODUCER = "sdk"  # --producer: e2e's producer batches records per partition as the mirror SDK's sender does


def bootstrap() -> str:
    if os.environ.get("KAFKA_BOOTSTRAP"):
        return os.environ["KAFKA_BOOTSTRAP"]
    out = subprocess.run(["bash", str(ROOT / "scripts/kafka.sh"), "start"], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1].split("=", 1)[1]


def drain_rate(broker: str, topic: str, group: str, procs: list[WorkerProcess], what: str, timeout_s: float = 900,
               poll_s: float = 0.2):  # fmt: skip
    """Wait until the group has committed the topic's end; items/s from its first commit."""
    first: tuple[float, int] | None = None
    deadline = time.monotonic() + timeout_s
    progress = GroupProgress(broker)
    try:
        while time.monotonic() < deadline:
            for p in procs:
                if not p.alive:
                    raise RuntimeError(f"{what}: a process exited:\n{p.log_tail()}")
            committed, end = progress(topic, group)
            now = time.perf_counter()
            if committed and first is None:
                first = (now, committed)
            if end and committed >= end:
                assert first is not None
                return (committed - first[1]) / max(now - first[0], 1e-9), now - first[0]
            time.sleep(poll_s)
    finally:
        progress.close()
    raise TimeoutError(f"{what}: not drained in {timeout_s} s")


def config_for(work: Path, broker: str, models: dict, topic: str, name: str, chdb: Path | None = None,
               **kafka) -> Path:  # fmt: skip
    return write_worker_config(
        work, broker, {c: models["good" if c == "digits-v2" else "degraded"] for c in CANDIDATES}, topic, free_port(),
        timing=TIMING, window_s=3600, idle_close_s=3600, partitions=MIRROR_PARTITIONS, diffs_partitions=4,
        kafka={"exactly_once": EXACTLY_ONCE, **kafka}, name=name, chdb=chdb or work / name.replace(".toml", "-chdb"),
        replay={"batch_size": BATCH_SIZE},
    )  # fmt: skip


def bench_pipeline(models: dict, messages: list[bytes], work: Path, runs: int) -> None:
    """The demo's chunks (EMBEDDED_CHUNK requests per process call, one insert each) and small
    calls of 256 requests, alternating, so the two are measured side by side."""
    from streams.demo import demo_settings
    from streams.heap import tune_collector
    from streams.pipeline import EMBEDDED_CHUNK, Pipeline
    from streams.sink import ClickHouseSink

    rates: dict[int, list[float]] = {EMBEDDED_CHUNK: [], 256: []}
    for i in range(runs):
        for chunk, series in rates.items():
            settings = demo_settings(work / f"pipeline-{chunk}-{i}", models)
            settings.replay.timing = TIMING
            settings.candidates = [c for c in settings.candidates if not c.noise_reference]  # 2 candidates, as the others
            sink = ClickHouseSink(settings.clickhouse.dsn)
            pipeline = Pipeline(settings, sink)
            tune_collector()  # as the demo and the worker do before their first message
            start = time.perf_counter()
            for lo in range(0, len(messages), chunk):
                pipeline.process(messages[lo : lo + chunk])
            pipeline.close_due(force=True)
            series.append(len(messages) / (time.perf_counter() - start))
            sink.close()
            print(f"  pipeline run {i + 1}, {chunk} requests per call: {series[-1]:,.0f} requests/s")
    for chunk, series in rates.items():
        print(f"pipeline (in process, no Kafka), {chunk} requests per call: median {statistics.median(series):,.0f} "
              "requests/s, 2 candidates")  # fmt: skip


def bench_replay(broker, models, mirror, n, work, runs, processes) -> str:
    rates, diffs_topic = [], ""
    for i in range(runs):
        group = f"bench-replay-{uuid.uuid4().hex[:6]}"
        diffs_topic = f"{mirror}.diffs-{group}"
        config = config_for(work, broker, models, mirror, f"replay-{processes}-{i}.toml", group_id=group,
                            diffs_topic=diffs_topic)  # fmt: skip
        procs = [WorkerProcess(config, work / f"replay-{processes}-{i}-{k}.log", role="replay") for k in range(processes)]
        try:
            rate, took = drain_rate(broker, mirror, group, procs, "replay")
        finally:
            for p in procs:
                p.stop()
        rates.append(rate)
        print(f"  replay x{processes} run {i + 1}: {rate:,.0f} requests/s ({took:.1f} s)")
    print(f"replay stage, {processes} process(es): median {statistics.median(rates):,.0f} requests/s "
          f"({n:,} requests x 2 candidates)")  # fmt: skip
    return diffs_topic


def bench_transactions(broker, models, mirror, n, work, runs) -> None:
    """One replay process with and without Kafka transactions, alternating, on the same topic."""
    global EXACTLY_ONCE
    rates: dict[bool, list[float]] = {True: [], False: []}
    for i in range(runs):
        for mode in (True, False):
            EXACTLY_ONCE = mode
            group = f"bench-txn-{uuid.uuid4().hex[:6]}"
            config = config_for(work, broker, models, mirror, f"txn-{mode}-{i}.toml", group_id=group,
                                diffs_topic=f"{mirror}.diffs-{group}")  # fmt: skip
            proc = WorkerProcess(config, work / f"txn-{mode}-{i}.log", role="replay")
            try:
                rate, _ = drain_rate(broker, mirror, group, [proc], "replay")
            finally:
                proc.stop()
            rates[mode].append(rate)
            print(f"  replay x1 run {i + 1}, {'transactions' if mode else 'at least once'}: {rate:,.0f} requests/s")
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    print(f"replay stage, 1 process: median {on:,.0f} requests/s with transactions, {off:,.0f} without "
          f"({on / off:.0%})")  # fmt: skip
    EXACTLY_ONCE = True


def prefill_rows(dsn_dir: Path, rows: int) -> None:
    """``rows`` synthetic diff rows for the benchmark's pairs, spread over the last 5 days."""
    code = f"""
from streams.sink import ClickHouseSink
s = ClickHouseSink("chdb:///{dsn_dir}")
s.client.command('''INSERT INTO shadowlens.request_diffs (model, candidate, request_id, baseline_version, sent_at,
  scored_at, baseline_label, candidate_label, label_flip, error, source_partition, source_offset)
  SELECT 'digits', if(number % 2 = 0, 'digits-v2', 'digits-v2-degraded'), generateUUIDv4(), 'v1',
  now64(3) - toIntervalMillisecond(number % 432000000), now64(3), number % 10, number % 10, 0, '', 99, number
  FROM numbers({rows})''', settings={{"max_insert_threads": 2}})
# Measure writes, not the merges the pre-fill itself left to do in the background.
s.client.command("OPTIMIZE TABLE shadowlens.request_diffs FINAL")
print(s.query("SELECT count() FROM shadowlens.request_diffs")[0][0])
s.close()
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def forget_run_rows(dsn_dir: Path) -> None:
    """Delete the rows a judge run wrote (the pre-fill's have source_partition 99): otherwise the
    next run re-applies request ids already stored, which is crash recovery, not steady state."""
    code = f"""
from streams.sink import ClickHouseSink
s = ClickHouseSink("chdb:///{dsn_dir}")
s.client.command("ALTER TABLE shadowlens.request_diffs DELETE WHERE source_partition != 99",
                 settings={{"mutations_sync": 2}})
s.close()
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def bench_judge(broker, models, mirror, diffs_topic, rows, work, runs, stored) -> None:
    template = work / "judge-stored"
    if stored:
        t = time.perf_counter()
        prefill_rows(template, stored)
        print(f"  ({stored:,} rows stored in {time.perf_counter() - t:.0f} s)")
    rates = []
    for i in range(runs):
        group = f"bench-judge-{uuid.uuid4().hex[:6]}"
        name = f"judge-{stored}-{i}.toml"
        # With stored rows, every run writes into the same pre-filled database, and its rows are
        # deleted after it; chDB data directories cannot be copied (their metadata links point
        # into the original).
        chdb = template if stored else work / name.replace(".toml", "-chdb")
        config = config_for(work, broker, models, mirror, name, chdb=chdb, judge_group_id=group, diffs_topic=diffs_topic)
        proc = WorkerProcess(config, work / f"judge-{stored}-{i}.log", role="judge")
        try:
            rate, took = drain_rate(broker, diffs_topic, group, [proc], "judge")
        finally:
            proc.stop()
        if not stored:
            shutil.rmtree(chdb, ignore_errors=True)
        else:  # the next run must meet the same table: the pre-filled rows only, not this run's ids
            forget_run_rows(chdb)
        # Kafka records per second -> diff rows per second (each record is one micro-batch of one pair).
        rates.append(rate * rows / max(1, group_progress(broker, diffs_topic, group)[1]))
        print(f"  judge run {i + 1} ({stored:,} rows stored): {rates[-1]:,.0f} diff rows/s ({took:.1f} s)")
    print(f"judge stage, {stored:,} rows stored: median {statistics.median(rates):,.0f} diff rows/s into chDB")


def bench_e2e(broker, models, messages, work, runs) -> None:
    rates = []
    for i in range(runs):
        topic = f"bench-e2e-{uuid.uuid4().hex[:8]}"
        create_topic(broker, topic, MIRROR_PARTITIONS)
        config = config_for(work, broker, models, topic, f"e2e-{i}.toml")
        procs = [WorkerProcess(config, work / f"e2e-{i}-{role}.log", role=role) for role in ("replay", "judge")]
        try:
            time.sleep(8)  # both processes up and in their groups
            start = time.perf_counter()
            (produce_batched if PRODUCER == "sdk" else produce)(broker, topic, messages)
            group = f"worker-{topic}-judge"
            progress = GroupProgress(broker)
            try:
                while True:
                    committed, end = progress(f"{topic}.diffs", group)
                    replayed, produced = progress(topic, f"worker-{topic}")
                    if produced and replayed >= produced and end and committed >= end:
                        break
                    if not all(p.alive for p in procs):
                        raise RuntimeError("e2e: a process exited")
                    time.sleep(0.2)
            finally:
                progress.close()
            rates.append(len(messages) / (time.perf_counter() - start))
        finally:
            for p in procs:
                p.stop()
        print(f"  e2e run {i + 1}: {rates[-1]:,.0f} requests/s")
    print(f"end to end (one replay + one judge process): median {statistics.median(rates):,.0f} requests/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--e2e-requests", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--stored-rows", type=int, default=20_000_000)
    parser.add_argument("--only", nargs="+", default=["pipeline", "replay", "judge", "e2e"])
    parser.add_argument("--timing", default="per_request", choices=["per_request", "batched"],
                        help="candidate timing: one session.run per row (default) or per micro-batch")
    parser.add_argument("--at-least-once", action="store_true",
                        help="replay without Kafka transactions ([kafka] exactly_once = false), to measure their cost")
    parser.add_argument("--producer", default="sdk", choices=["sdk", "per-record"],
                        help="e2e producer: batches per partition as mirror.sender does (default), or one "
                             "aiokafka send per record (what this bench used before)")
    parser.add_argument("--batch-size", type=int, default=ReplayConfig.model_fields["batch_size"].default,
                        help="the worker processes' [replay] batch_size (default: the product's default)")
    args = parser.parse_args()
    global TIMING, EXACTLY_ONCE, PRODUCER, BATCH_SIZE
    PRODUCER, BATCH_SIZE = args.producer, args.batch_size
    TIMING = args.timing
    EXACTLY_ONCE = not args.at_least_once
    broker = bootstrap()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        models = build_digits_models(work / "models")
        t = time.perf_counter()
        messages = TrafficGenerator(models["baseline"], rate_per_s=1000).messages(args.requests)
        print(f"{args.requests:,} mirrored digits requests generated in {time.perf_counter() - t:.0f} s; "
              f"broker {broker}; {os.cpu_count()} cores; timing {TIMING}")  # fmt: skip
        if "pipeline" in args.only:
            bench_pipeline(models, messages[:40_000], work, args.runs)
        judge_runs = {"judge": (0, args.stored_rows), "judge-empty": (0,), "judge-stored": (args.stored_rows,)}
        stored_cases = sorted({n for name in args.only for n in judge_runs.get(name, ())})
        if {"replay", "transactions"} & set(args.only) or stored_cases:
            mirror = f"bench-mirror-{uuid.uuid4().hex[:8]}"
            create_topic(broker, mirror, MIRROR_PARTITIONS)
            produce(broker, mirror, messages)
            # Judge alone: one replay run makes its diffs topic.
            replay_runs = args.runs if "replay" in args.only else 1
            diffs_topic = ""
            if "replay" in args.only or stored_cases:
                diffs_topic = bench_replay(broker, models, mirror, args.requests, work, replay_runs, 1)
            if "replay" in args.only:
                bench_replay(broker, models, mirror, args.requests, work, args.runs, 2)
            if "transactions" in args.only:
                bench_transactions(broker, models, mirror, args.requests, work, args.runs)
            for stored in stored_cases:
                bench_judge(broker, models, mirror, diffs_topic, args.requests * len(CANDIDATES), work, args.runs, stored)
        if "e2e" in args.only:
            bench_e2e(broker, models, messages[: args.e2e_requests], work, args.runs)


if __name__ == "__main__":
    main()
