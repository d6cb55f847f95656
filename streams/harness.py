"""Run a real worker process against a real broker: shared by the e2e tests and benchmarks.

Nothing here is mocked: it writes a worker config for the digits models, starts
``shadowlens worker`` as a separate process, produces with aiokafka and polls the HTTP API.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streams.demo import DEMO_POLICY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def window_aligned_start(requests: int, rate_per_s: float, window_s: float) -> datetime:
    """A recent start time on a window boundary, so that tests know which requests share a window."""
    earliest = time.time() - requests / rate_per_s - window_s
    return datetime.fromtimestamp(earliest - earliest % window_s, tz=UTC)


def write_worker_config(
    directory: Path, bootstrap: str, candidates: dict[str, Path], topic: str, api_port: int,
    timing: str = "per_request", window_s: float = 20, idle_close_s: float = 4, commit_interval_s: float = 2.8,
) -> Path:  # fmt: skip
    """A TOML config replaying the digits v1 traffic against v2 candidates (name -> ONNX path)."""
    policy = ", ".join(f"{k} = {v!r}" for k, v in DEMO_POLICY.items())
    text = f"""
[kafka]
bootstrap = "{bootstrap}"
topic = "{topic}"
dead_letter_topic = "{topic}.dlq"
group_id = "worker-{topic}"
partitions = 3
commit_interval_s = {commit_interval_s}
session_timeout_s = 6  # a killed worker's partitions move quickly in tests

[clickhouse]
dsn = "chdb:///{directory / 'chdb'}"

[windows]
size_s = {window_s}
grace_s = 2
idle_close_s = {idle_close_s}

[replay]
batch_size = 250
batch_within_s = 0.3
timing = "{timing}"

[api]
port = {api_port}
"""
    for name, path in candidates.items():
        text += f"""
[[candidates]]
name = "{name}"
model = "digits"
path = "{path}"
adapter = {{ rename = {{ pixels = "image" }}, cast = {{ image = "float32" }}, scale = {{ image = 0.0625 }} }}
policy = {{ {policy} }}
"""
    path = directory / "worker.toml"
    path.write_text(text)
    return path


def produce(bootstrap: str, topic: str, messages: list[bytes]) -> None:
    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, linger_ms=5)
        await producer.start()
        try:
            futures = [await producer.send(topic, value=m, key=str(i).encode()) for i, m in enumerate(messages)]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    asyncio.run(run())


def consume_all(bootstrap: str, topic: str, expect: int, timeout_s: float = 30) -> list[bytes]:
    async def run() -> list[bytes]:
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

    return asyncio.run(run())


class WorkerProcess:
    """``shadowlens worker`` in its own process group, its output in a log file."""

    def __init__(self, config: Path, log_path: Path):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("KAFKA_BOOTSTRAP", None)  # the config file names the broker
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker", "--config", str(config)],
            stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text()[-chars:]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def wait_for(self, predicate: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 1.0) -> Any:
        """Poll until predicate() is truthy; raise with the worker's log if it dies or time runs out."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited ({self.proc.returncode}) waiting for {what}:\n{self.log_tail()}")
            try:
                last = predicate()
                if last:
                    return last
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(poll_s)
        raise TimeoutError(f"timed out waiting for {what} (last: {last!r})\n{self.log_tail()}")


def window_totals(api: str, model: str, candidates: list[str]) -> dict[str, int]:
    totals = {}
    for cand in candidates:
        rows = httpx.get(f"{api}/v1/windows/{model}/{cand}", params={"limit": 10000}, timeout=5).json()
        totals[cand] = sum(r["requests"] for r in rows)
    return totals
