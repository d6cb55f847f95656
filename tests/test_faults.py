"""Fault matrix on real parts: worker processes, real Kafka, chDB, digits ONNX models.

Every fault is injected for real: poison bytes on the mirror topic, a ClickHouse data path on a
small filesystem that the test fills up, SIGKILL of worker processes, a broker of the test's own
stopped and restarted with its data. Each test then asserts the same invariants:

- diff rows = unique valid requests x candidates (exactly one per pair, ``FINAL`` and raw);
- window ``requests`` sum to those rows, and the verdict's ``samples`` equal them;
- the dead-letter topic holds exactly the poison that was sent, by reason;
- the worker processes are still running.

The tests that matter for both topologies run twice: one process (``--role all``) and the two
stages apart (two replay processes and a judge process).
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest

from streams.demo import TrafficGenerator
from harness import (
    OwnBroker, Workers, consume_all, create_topic, free_port, produce, window_aligned_start, window_totals,
    write_worker_config,
)  # fmt: skip
from streams.sink import ClickHouseSink

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

VALID = 2000
CANDIDATES = ("digits-v2", "digits-v2-degraded")


@pytest.fixture(scope="module")
def traffic(models) -> list[bytes]:
    start = window_aligned_start(VALID, rate_per_s=50, window_s=20)
    return TrafficGenerator(models["baseline"], rate_per_s=50, seed=11).messages(VALID, start=start)


def setup(tmp_path, bootstrap, models, *, partitions=3, chdb=None, windows=None, big_messages=False):
    topic = f"faults-{uuid.uuid4().hex[:8]}"
    # The mirror topic accepts 4 MiB messages so that a 2 MB poison message reaches the worker.
    create_topic(bootstrap, topic, partitions, {"max.message.bytes": str(4 << 20)} if big_messages else None)
    api_port = free_port()
    config = write_worker_config(
        tmp_path, bootstrap, {c: models["good" if c == "digits-v2" else "degraded"] for c in CANDIDATES}, topic,
        api_port, chdb=chdb, windows=windows, partitions=partitions,
    )  # fmt: skip
    return topic, config, f"http://127.0.0.1:{api_port}"


def wait_exact(workers: Workers, api: str, valid: int, timeout_s: float = 240) -> None:
    """Until every candidate's closed windows add up to ``valid``; then the verdicts agree."""

    def done():
        totals = window_totals(api, "digits", list(CANDIDATES))
        assert all(v <= valid for v in totals.values()), f"windows count more than was sent: {totals}"
        return totals if all(v == valid for v in totals.values()) else None

    workers.wait_for(done, timeout_s, f"windows to add up to {valid}")
    for cand in CANDIDATES:
        verdict = httpx.get(f"{api}/v1/verdicts/digits/{cand}", timeout=5).json()
        assert verdict["samples"] == valid, verdict
    assert workers.all_alive()


def check_rows(chdb: Path, valid_ids: set[str]) -> None:
    """After the workers stopped (chDB: one process per data path): one row per request and candidate."""
    sink = ClickHouseSink(f"chdb:///{chdb}")
    try:
        assert sink.diff_counts() == {("digits", c): len(valid_ids) for c in CANDIDATES}
        raw = dict(sink.query("SELECT candidate, count() FROM shadowlens.request_diffs GROUP BY candidate"))
        ids = {r[0] for r in sink.query("SELECT DISTINCT request_id FROM shadowlens.request_diffs")}
        assert ids == valid_ids
        sink.query("OPTIMIZE TABLE shadowlens.request_diffs FINAL")
        after = dict(sink.query("SELECT candidate, count() FROM shadowlens.request_diffs GROUP BY candidate"))
        assert after == {c: len(valid_ids) for c in CANDIDATES}, (raw, after)
        windows = dict(sink.query("SELECT candidate, sum(requests) FROM shadowlens.window_stats FINAL GROUP BY candidate"))
        assert windows == {c: len(valid_ids) for c in CANDIDATES}
    finally:
        sink.close()


def request_ids(messages: list[bytes]) -> set[str]:
    return {json.loads(m)["request_id"] for m in messages}


def poison(template: bytes) -> dict[str, tuple[bytes | None, str]]:
    """name -> (message value, the dead letter's error_type)."""
    good = json.loads(template)
    pixels = good["inputs"]["pixels"]

    def variant(rid: str, **change) -> bytes:
        return json.dumps({**good, "request_id": rid, **change}).encode()

    return {
        "tombstone": (None, "tombstone"),
        "deep_json": (b"[" * 200_000, "too_deep"),
        "zero_dim": (variant("zero-dim", inputs={"pixels": {**pixels, "shape": [0, 64], "data": ""}}), "invalid_tensor"),
        "nan_input": (variant("nan", inputs={"pixels": {"dtype": "float32", "shape": [1, 64],
                                                         "data": [float("nan")] * 64}}), "non_finite_input"),
        "inf_input": (variant("inf", inputs={"pixels": {"dtype": "float32", "shape": [1, 64],
                                                         "data": [float("inf")] * 64}}), "non_finite_input"),
        "big_invalid": (b'{"request_id": "' + b"x" * 2_000_000 + b'"', "invalid_json"),
        "big_attribute": (variant("big-attr", attributes={"country": "x" * 2_000_000}), "invalid_schema"),
        "unknown_model": (variant("other-model", model="not-configured"), "unknown_model"),
    }  # fmt: skip


@pytest.mark.parametrize("topology", ["one", "split"])
def test_poison_is_isolated_and_nothing_valid_is_lost(kafka_bootstrap, tmp_path, models, traffic, topology):
    topic, config, api = setup(tmp_path, kafka_bootstrap, models, big_messages=True)
    bad = poison(traffic[0])
    # Poison spread through the stream, on every partition (round-robin by index).
    stream: list[bytes | None] = []
    step = VALID // len(bad)
    for i, (value, _) in enumerate(bad.values()):
        stream += traffic[i * step : (i + 1) * step] + [value]
    stream += traffic[len(bad) * step :]
    produce(kafka_bootstrap, topic, stream, partition=lambda i: i % 3, max_request_size=4 << 20)

    workers = Workers(config, tmp_path, topology)
    try:
        wait_exact(workers, api, VALID)
        raw = [json.loads(m) for m in consume_all(kafka_bootstrap, f"{topic}.dlq", expect=len(bad) + 1, timeout_s=20)]
        # Dead letters are at-least-once (README): a replay batch redelivered after a rebalance on a
        # loaded machine sends its letters again. Count distinct ones, by what they carry.
        distinct = {(d["error_type"], d["payload_sha256"], d["key"], d["partition"], d["offset"]): d
                    for d in raw}
        letters = list(distinct.values())
        assert Counter(letter["error_type"] for letter in letters) == Counter(kind for _, kind in bad.values())
        big = [letter for letter in letters if (letter["original_size"] or 0) > 1_000_000]
        assert len(big) == 2 and all(letter["payload_truncated"] and letter["payload_sha256"] for letter in big)
        # The worker restarts on the state it wrote (a 2 MB attribute once made it exit on every start).
        workers.restart_judge()
        more = TrafficGenerator(models["baseline"], rate_per_s=50, seed=12).messages(
            200, start=window_aligned_start(200, 50, 20))  # fmt: skip
        produce(kafka_bootstrap, topic, more)
        wait_exact(workers, api, VALID + 200)
    finally:
        workers.stop()
    check_rows(tmp_path / "chdb", request_ids(traffic) | request_ids(more))


def test_a_quiet_partition_does_not_hold_windows_open(kafka_bootstrap, tmp_path, models, traffic):
    """Partition 2 has the first requests, then goes quiet. With idle closing out of reach (1 h),
    only the watermark can close windows: they close because a partition read to its end and
    silent for partition_idle_s stops holding it back; every window but the newest is written."""
    topic, config, api = setup(tmp_path, kafka_bootstrap, models, windows={"idle_close_s": 3600, "partition_idle_s": 3})
    produce(kafka_bootstrap, topic, traffic, partition=lambda i: i % 3 if i < 300 else i % 2)
    workers = Workers(config, tmp_path, "one")
    per_window = 20 * 50  # 20 s windows at 50 requests/s
    closed = VALID - VALID % per_window if VALID % per_window else VALID - per_window
    try:
        workers.wait_for(lambda: all(v == closed for v in window_totals(api, "digits", list(CANDIDATES)).values()),
                         120, f"{closed} requests in closed windows")  # fmt: skip
        assert workers.all_alive()
    finally:
        workers.stop()


def test_open_windows_are_capped_when_a_partition_holds_the_watermark(kafka_bootstrap, tmp_path, models, traffic):
    """Partition 2 has the first requests, then stays silent and never counts as quiet: the cap
    on open windows (2) closes the oldest early instead of letting the state grow (the early
    closes are logged and counted in the state)."""
    topic, config, api = setup(tmp_path, kafka_bootstrap, models,
                               windows={"idle_close_s": 3600, "partition_idle_s": 3600, "max_open_windows": 2})  # fmt: skip
    produce(kafka_bootstrap, topic, traffic, partition=lambda i: i % 3 if i < 300 else i % 2)
    workers = Workers(config, tmp_path, "one")
    try:
        # 2,000 requests over 40 s of event time = 2 windows: nothing is over the cap yet.
        time.sleep(8)
        assert window_totals(api, "digits", list(CANDIDATES)) == {c: 0 for c in CANDIDATES}
        later = TrafficGenerator(models["baseline"], rate_per_s=50, seed=13).messages(
            1000, start=window_aligned_start(VALID, 50, 20).replace(microsecond=0) + _seconds(40))  # fmt: skip
        produce(kafka_bootstrap, topic, later, partition=lambda i: i % 2)
        workers.wait_for(lambda: all(v == 1000 for v in window_totals(api, "digits", list(CANDIDATES)).values()),
                         120, "the oldest window closed early")  # fmt: skip
        assert "before they are final" in workers.logs()
    finally:
        workers.stop()


def _seconds(s: float):
    from datetime import timedelta

    return timedelta(seconds=s)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs for the chDB data path, which the test fills up for real."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the disk-full fault needs a small filesystem")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(disk: Path) -> None:
    subprocess.run(f"dd if=/dev/zero of={disk / 'filler'} bs=1M", shell=True, capture_output=True)


@pytest.mark.parametrize("topology", ["one", "split"])
def test_a_full_disk_is_waited_out_and_a_kill_during_it_loses_nothing(kafka_bootstrap, tmp_path, models, traffic,
                                                                       small_disk, topology):  # fmt: skip
    chdb = small_disk / "chdb"
    topic, config, api = setup(tmp_path, kafka_bootstrap, models, chdb=chdb)
    workers = Workers(config, tmp_path, topology)
    third = VALID // 3
    try:
        produce(kafka_bootstrap, topic, traffic[:third])
        workers.wait_for(lambda: httpx.get(f"{api}/readyz", timeout=5).status_code == 200 and
                         httpx.get(f"{api}/v1/verdicts/digits/digits-v2", timeout=5).status_code == 200, 120,
                         "the first rows")  # fmt: skip
        # Outage 1: the disk fills while traffic keeps coming; the worker waits, says why, and serves.
        fill(small_disk)
        produce(kafka_bootstrap, topic, traffic[third : 2 * third])
        not_ready = workers.wait_for(lambda: (r := httpx.get(f"{api}/readyz", timeout=5)).status_code == 503 and r,
                                     120, "/readyz to report the database")  # fmt: skip
        assert "clickhouse" in not_ready.json()["detail"]
        assert httpx.get(f"{api}/v1/verdicts/digits/digits-v2", timeout=5).status_code == 200  # still serving
        time.sleep(3)
        assert workers.all_alive()
        (small_disk / "filler").unlink()
        workers.wait_for(lambda: httpx.get(f"{api}/readyz", timeout=5).status_code == 200, 120, "recovery")
        # Outage 2: SIGKILL the worker (the judge) while it waits for the disk; restart on a free disk.
        fill(small_disk)
        produce(kafka_bootstrap, topic, traffic[2 * third :])
        workers.wait_for(lambda: httpx.get(f"{api}/readyz", timeout=5).status_code == 503, 120, "the second outage")
        workers.judge.stop(9)
        (small_disk / "filler").unlink()
        workers.restart_judge()
        wait_exact(workers, api, VALID)
    finally:
        workers.stop()
    assert "clickhouse unavailable" in workers.logs()
    check_rows(chdb, request_ids(traffic))


@pytest.mark.parametrize("topology", ["one", "split"])
def test_a_broker_outage_splits_no_window(tmp_path, models, topology):
    """Real-time traffic through the mirror SDK; the broker stops for ~15 s (longer than
    idle_close_s) and restarts with its data. No window closes during the outage, so no request
    becomes a late event: window sums equal the rows. The SDK reports the broker as disconnected."""
    from mirror import MirrorClient
    from schemas import MirroredRequest

    broker = OwnBroker(f"faults-{topology}")
    broker.run("start")
    workers = None
    try:
        topic, config, api = setup(tmp_path, broker.bootstrap, models)
        source = [MirroredRequest.model_validate_json(m) for m in TrafficGenerator(
            models["baseline"], rate_per_s=50, seed=21).messages(1500)]  # fmt: skip
        workers = Workers(config, tmp_path, topology)
        client = MirrorClient(bootstrap_servers=broker.bootstrap, topic=topic, close_timeout_s=30, buffer_size=20000)
        saw_disconnected = False
        try:
            for i, ev in enumerate(source):  # ~30 s at 50 requests/s, sent_at = now
                client.publish(ev.request_id, "digits", "v1", {"pixels": ev.inputs["pixels"].to_array()},
                               {"probabilities": ev.baseline_output["probabilities"].to_array()},
                               latency_ms=ev.baseline_latency_ms, attributes=dict(ev.attributes))  # fmt: skip
                if i == 500:
                    broker.run("stop")
                    outage_started = time.monotonic()
                if 500 < i and time.monotonic() - outage_started < 15:
                    saw_disconnected |= not client.stats().connected
                if i == 1250:
                    broker.run("start")  # same state dir: topics, offsets and the changelog survive
                time.sleep(0.02)
        finally:
            client.close(timeout=30)
        assert saw_disconnected, "MirrorClient.stats().connected stayed True while the broker was down"
        delivered = consume_all(broker.bootstrap, topic, expect=len(source), timeout_s=30)
        valid_ids = request_ids(delivered)
        wait_exact(workers, api, len(valid_ids), timeout_s=180)  # a late event would leave a sum short
        workers.stop()
        check_rows(tmp_path / "chdb", valid_ids)
    finally:
        if workers is not None:
            workers.stop()
        broker.run("clean")
