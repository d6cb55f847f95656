"""End to end on real parts: aiokafka producer -> real Kafka -> worker process (replay + judge stages) -> chDB -> API.

Asserts exactly one diff row per request and candidate (with redelivered duplicates in the
stream), window counts that add up to what was sent, promote for the good candidate and
rollback for the broken one (permuted weights), and malformed messages in the dead-letter
topic with their reason while the rest is processed.
"""

from __future__ import annotations

import json
import re
import signal
import uuid

import httpx
import pytest

from streams.demo import TrafficGenerator
from harness import (
    WorkerProcess, consume_all, free_port, produce, window_aligned_start, window_totals, write_worker_config,
)  # fmt: skip
from streams.models import build_digits_models
from streams.sink import ClickHouseSink

pytestmark = pytest.mark.kafka

REQUESTS = 5000
REDELIVERED = 400


def malformed_messages() -> dict[str, bytes]:
    base = {
        "request_id": "bad-shape",
        "model": "digits",
        "baseline_version": "v1",
        "sent_at": "2026-11-25T12:00:00Z",
        "inputs": {"pixels": {"dtype": "float32", "shape": [1, 32], "data": [0.0] * 32}},
        "baseline_output": {"probabilities": {"dtype": "float32", "shape": [1, 10], "data": [0.1] * 10}},
        "baseline_latency_ms": 1.0,
    }
    missing = {k: v for k, v in base.items() if k != "baseline_latency_ms"} | {"request_id": "bad-schema"}
    return {
        "invalid_json": b"{not json",
        "invalid_schema": json.dumps(missing).encode(),
        "adapter": json.dumps(base).encode(),  # 32 pixels: does not fit the candidates' 64
    }


def skipped_duplicates(log_path) -> int:
    """Duplicate rows the judge reported dropping so far (both candidates)."""
    found = re.findall(r"skipped \d+ redelivered and (\d+) duplicate rows", log_path.read_text())
    return sum(int(n) for n in found)


def test_mirrored_traffic_through_kafka_worker_chdb_and_api(kafka_bootstrap, tmp_path):
    suffix = uuid.uuid4().hex[:8]
    models = build_digits_models(tmp_path / "models")
    api_port = free_port()
    topic, dlq = f"mirror-{suffix}", f"mirror-{suffix}.dlq"
    candidates = {"digits-v2": models["good"], "digits-v2-broken": models["broken"]}
    # Production's latencies come from this test process (TrafficGenerator, an idle moment), the
    # candidates' from a worker sharing 2 cores with the broker: an equally fast model measured
    # 1.3-1.45x at p95 there, and with the demo's 1.5 margin the good candidate sometimes held
    # (1 run in 2 on the code before this line). This test is about the data path and the
    # flip/accuracy verdicts; latency on the same hardware, against a replayed baseline, is
    # checked in tests/test_scorers_realistic.py.
    config = write_worker_config(tmp_path, kafka_bootstrap, candidates, topic, api_port,
                                 policy={"latency_p99_ratio_margin": 2.5, "latency_p50_ratio_margin": 2.5})  # fmt: skip

    # 50 requests/s from a 20 s window boundary: requests 1000..1399 share the window [20 s, 40 s).
    start = window_aligned_start(REQUESTS, rate_per_s=50, window_s=20)
    messages = TrafficGenerator(models["baseline"], rate_per_s=50).messages(REQUESTS, start=start)
    bad = malformed_messages()
    # Redelivery: a slice of the stream arrives twice, as after a producer retry or a consumer
    # restart before commit; interleave so duplicates land in open windows.
    stream = messages[:1500] + messages[1000 : 1000 + REDELIVERED] + list(bad.values()) + messages[1500:]
    produce(kafka_bootstrap, topic, stream)

    worker = WorkerProcess(config, tmp_path / "worker.log")
    api = f"http://127.0.0.1:{api_port}"
    try:

        def windows_complete():
            totals = window_totals(api, "digits", list(candidates))
            return totals if all(v >= REQUESTS for v in totals.values()) else None

        totals = worker.wait_for(windows_complete, 300, "all windows to close")
        assert totals == {"digits-v2": REQUESTS, "digits-v2-broken": REQUESTS}

        good = httpx.get(f"{api}/v1/verdicts/digits/digits-v2", timeout=5)
        broken = httpx.get(f"{api}/v1/verdicts/digits/digits-v2-broken", timeout=5)
        assert good.status_code == 200 and broken.status_code == 200
        assert good.json()["verdict"] == "promote", good.json()["reasons"]
        assert broken.json()["verdict"] == "rollback", broken.json()
        assert broken.json()["samples"] == REQUESTS
        assert httpx.get(f"{api}/v1/verdicts/digits/nope", timeout=5).status_code == 404
        assert httpx.get(f"{api}/healthz", timeout=5).status_code == 200
        assert httpx.get(f"{api}/readyz", timeout=5).status_code == 200
        assert "/v1/verdicts/{model}/{candidate}" in httpx.get(f"{api}/openapi.json", timeout=5).json()["paths"]

        # The bad-shape request fails for each of the two candidates: one letter per candidate.
        letters = [json.loads(m) for m in consume_all(kafka_bootstrap, dlq, expect=len(bad) + 1)]
        assert sorted(letter["error_type"] for letter in letters) == ["adapter", "adapter", "invalid_json", "invalid_schema"]
        by_type = {letter["error_type"]: letter for letter in letters}
        assert "inputs.image" in by_type["adapter"]["reason"]  # names the input after the v1->v2 mapping
        assert sorted(letter["candidate"] for letter in letters if letter["error_type"] == "adapter") == sorted(candidates)
        assert "baseline_latency_ms" in by_type["invalid_schema"]["reason"]
        assert by_type["invalid_json"]["payload"] == bad["invalid_json"].decode()

        # The first requests again, long after their windows closed: duplicates that join no window.
        produce(kafka_bootstrap, topic, messages[:REDELIVERED])
        worker.wait_for(lambda: skipped_duplicates(worker.log_path) == 4 * REDELIVERED, 60, "the late duplicates")
        assert window_totals(api, "digits", list(candidates)) == totals
    finally:
        worker.stop()

    # chDB allows one process per data path: read the rows after the worker has stopped.
    sink = ClickHouseSink(f"chdb:///{tmp_path / 'chdb'}")
    try:
        assert sink.diff_counts() == {("digits", "digits-v2"): REQUESTS, ("digits", "digits-v2-broken"): REQUESTS}
        distinct = sink.query("SELECT uniqExact(request_id) FROM shadowlens.request_diffs")[0][0]
        assert distinct == REQUESTS
        window_sums = dict(sink.query(
            "SELECT candidate, sum(requests) FROM shadowlens.window_stats FINAL GROUP BY candidate"))  # fmt: skip
        assert window_sums == {"digits-v2": REQUESTS, "digits-v2-broken": REQUESTS}
        dups = sink.query("SELECT sum(duplicates_dropped) FROM shadowlens.window_stats FINAL")[0][0]
        assert dups == 2 * REDELIVERED  # counted per candidate in their open window; the late ones in no window
    finally:
        sink.close()


def test_worker_killed_mid_stream_loses_nothing_and_counts_nothing_twice(kafka_bootstrap, new_topic, tmp_path):
    """SIGKILL the worker after it has scored part of the stream; the restarted worker recovers
    its pair state from the changelog topic and must end with exactly one diff row and one window
    count per request (the fault matrix in test_faults.py kills it at harder moments)."""
    total = 3000
    models = build_digits_models(tmp_path / "models")
    topic = new_topic("crash", partitions=3)
    candidates = {"digits-v2": models["good"]}
    api_port = free_port()
    config = write_worker_config(tmp_path, kafka_bootstrap, candidates, topic, api_port)
    # The first 2,000 requests fill exactly two 20 s windows; the rest start a new one, so a
    # window the first worker closed (idle, before the kill) gets no later requests.
    start = window_aligned_start(total, rate_per_s=50, window_s=20)
    messages = TrafficGenerator(models["baseline"], rate_per_s=50).messages(total, start=start)
    api = f"http://127.0.0.1:{api_port}"

    produce(kafka_bootstrap, topic, messages[:2000])
    first = WorkerProcess(config, tmp_path / "worker-1.log")
    try:
        first.wait_for(lambda: window_totals(api, "digits", ["digits-v2"])["digits-v2"] >= 1000, 120, "a closed window")
    finally:
        first.stop(signal.SIGKILL)

    produce(kafka_bootstrap, topic, messages[2000:])
    second = WorkerProcess(config, tmp_path / "worker-2.log")
    try:
        totals = second.wait_for(
            lambda: (t := window_totals(api, "digits", ["digits-v2"]))["digits-v2"] >= total and t, 180, "all windows"
        )
        assert totals == {"digits-v2": total}
        assert httpx.get(f"{api}/v1/verdicts/digits/digits-v2", timeout=5).json()["samples"] == total
    finally:
        second.stop()
    assert "restored pair state" in second.log_path.read_text()  # the judge resumed from its changelog

    sink = ClickHouseSink(f"chdb:///{tmp_path / 'chdb'}")
    try:
        assert sink.diff_counts() == {("digits", "digits-v2"): total}
        window_sum = sink.query("SELECT sum(requests) FROM shadowlens.window_stats FINAL")[0][0]
        assert window_sum == total
    finally:
        sink.close()
