"""End to end on real parts: aiokafka producer -> real Kafka -> faust worker process -> chDB -> API.

Asserts exactly one diff row per request and candidate (with redelivered duplicates in the
stream), window counts that add up to what was sent, promote for the good candidate and
rollback for the broken one (permuted weights), and malformed messages in the dead-letter
topic with their reason while the rest is processed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streams.demo import DEMO_POLICY, TrafficGenerator
from streams.models import build_digits_models
from streams.sink import ClickHouseSink

pytestmark = pytest.mark.kafka

REQUESTS = 5000
REDELIVERED = 400


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_worker_config(tmp: Path, bootstrap: str, models: dict[str, Path], suffix: str, api_port: int) -> Path:
    config = f"""
[kafka]
bootstrap = "{bootstrap}"
topic = "mirror-{suffix}"
dead_letter_topic = "mirror-{suffix}.dlq"
group_id = "worker-{suffix}"
partitions = 3

[clickhouse]
dsn = "chdb:///{tmp / 'chdb'}"
database = "shadowlens"

[windows]
size_s = 20
grace_s = 2
idle_close_s = 4

[replay]
batch_size = 250
batch_within_s = 0.3

[api]
port = {api_port}
"""
    policy = ", ".join(f"{k} = {v!r}" for k, v in DEMO_POLICY.items())
    for name, key in (("digits-v2", "good"), ("digits-v2-broken", "broken")):
        config += f"""
[[candidates]]
name = "{name}"
model = "digits"
path = "{models[key]}"
adapter = {{ rename = {{ pixels = "image" }}, cast = {{ image = "float32" }}, scale = {{ image = 0.0625 }} }}
policy = {{ {policy} }}
"""
    path = tmp / "worker.toml"
    path.write_text(config)
    return path


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
        "invalid_tensor": json.dumps(base).encode(),
    }


async def _produce(bootstrap: str, topic: str, messages: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value=m, key=str(i).encode()) for i, m in enumerate(messages)]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def _consume_all(bootstrap: str, topic: str, expect: int, timeout_s: float = 30) -> list[bytes]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                group_id=f"check-{uuid.uuid4().hex[:6]}")  # fmt: skip
    await consumer.start()
    out: list[bytes] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(out) < expect and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            out.extend(m.value for msgs in batch.values() for m in msgs)
    finally:
        await consumer.stop()
    return out


def start_worker(config: Path, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("KAFKA_BOOTSTRAP", None)  # the config file names the broker
    return subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "worker", "--config", str(config)],
        stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip


def stop_worker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen, log_path: Path):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"worker exited ({proc.returncode}) while waiting for {what}:\n{log_path.read_text()[-4000:]}")
        try:
            last = predicate()
            if last:
                return last
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(1.0)
    pytest.fail(f"timed out waiting for {what} (last: {last!r})\n{log_path.read_text()[-4000:]}")


def test_mirrored_traffic_through_kafka_worker_chdb_and_api(kafka_bootstrap, tmp_path):
    suffix = uuid.uuid4().hex[:8]
    models = build_digits_models(tmp_path / "models")
    api_port = _free_port()
    config = write_worker_config(tmp_path, kafka_bootstrap, models, suffix, api_port)
    topic, dlq = f"mirror-{suffix}", f"mirror-{suffix}.dlq"

    messages = TrafficGenerator(models["baseline"], rate_per_s=50).messages(REQUESTS)
    bad = malformed_messages()
    # Redelivery: a slice of the stream arrives twice, as after a producer retry or a consumer
    # restart before commit; interleave so duplicates land in open windows.
    stream = (
        messages[:1500] + messages[1000 : 1000 + REDELIVERED] + list(bad.values()) + messages[1500:]
        + messages[:REDELIVERED]  # and again long after their windows closed
    )
    asyncio.run(_produce(kafka_bootstrap, topic, stream))

    log_path = tmp_path / "worker.log"
    proc = start_worker(config, log_path)
    api = f"http://127.0.0.1:{api_port}"
    try:

        def windows_complete():
            totals = {}
            for cand in ("digits-v2", "digits-v2-broken"):
                rows = httpx.get(f"{api}/v1/windows/digits/{cand}", params={"limit": 1000}, timeout=5).json()
                totals[cand] = sum(r["requests"] for r in rows)
            return totals if all(v >= REQUESTS for v in totals.values()) else None

        totals = wait_for(windows_complete, 300, "all windows to close", proc, log_path)
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
        letters = [json.loads(m) for m in asyncio.run(_consume_all(kafka_bootstrap, dlq, expect=len(bad) + 1))]
        assert sorted(letter["error_type"] for letter in letters) == sorted([*bad, "invalid_tensor"])
        by_type = {letter["error_type"]: letter for letter in letters}
        assert "inputs.image" in by_type["invalid_tensor"]["reason"]  # names the input after the v1->v2 mapping
        assert "baseline_latency_ms" in by_type["invalid_schema"]["reason"]
        assert by_type["invalid_json"]["payload"] == bad["invalid_json"].decode()
    finally:
        stop_worker(proc)

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
        assert dups == 2 * REDELIVERED  # counted per candidate in their open window, never added to the stats
    finally:
        sink.close()
