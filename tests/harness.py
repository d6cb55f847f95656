"""Run real worker processes against a real broker: shared by the e2e and fault tests and benchmarks.

Nothing here is mocked: it writes a worker config for the digits models, starts
``shadowlens worker`` as separate processes (one ``--role all``, or replay and judge apart),
produces with aiokafka, polls the HTTP API, and can run a broker of its own to stop and restart.
"""

from __future__ import annotations

import asyncio
import json
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
import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import GroupCoordinatorNotAvailableError

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
    timing: str = "per_request", window_s: float = 20, idle_close_s: float = 4,
    chdb: Path | None = None, windows: dict[str, Any] | None = None, partitions: int = 3,
    policy: dict[str, Any] | None = None, diffs_partitions: int = 2, kafka: dict[str, Any] | None = None,
    name: str = "worker.toml", api: dict[str, Any] | None = None, extra: dict[str, dict[str, Any]] | None = None,
    metrics: dict[str, Any] | None = None, replay: dict[str, Any] | None = None,
) -> Path:  # fmt: skip
    """A TOML config replaying the digits v1 traffic against v2 candidates (name -> ONNX path).

    ``windows``: more [windows] settings (e.g. partition_idle_s); ``chdb``: the data path
    (default: ``directory/chdb``); ``api``, ``replay``: more [api], [replay] settings; ``extra``: more fields of a
    candidate, by name (e.g. ``{"v2": {"baseline_output": "probs"}}``)."""
    policy_text = ", ".join(f"{k} = {v!r}" for k, v in {**DEMO_POLICY, **(policy or {})}.items())
    window_settings = {"size_s": window_s, "grace_s": 2, "idle_close_s": idle_close_s, **(windows or {})}
    window_lines = "".join(f"{k} = {v!r}\n" for k, v in window_settings.items())
    kafka_settings = {"group_id": f"worker-{topic}", **(kafka or {})}
    kafka_lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in kafka_settings.items())
    text = f"""
[kafka]
bootstrap = "{bootstrap}"
topic = "{topic}"
dead_letter_topic = "{topic}.dlq"
{kafka_lines}partitions = {partitions}
diffs_partitions = {diffs_partitions}
session_timeout_s = 6  # a killed worker's partitions move quickly in tests

[clickhouse]
dsn = "chdb:///{chdb or directory / 'chdb'}"

[windows]
{window_lines}
[replay]
{"".join(f"{k} = {json.dumps(v)}{chr(10)}" for k, v in {"batch_size": 250, "batch_within_s": 0.3, **(replay or {})}.items())}timing = "{timing}"

[api]
port = {api_port}
{"".join(f"{k} = {json.dumps(v)}{chr(10)}" for k, v in (api or {}).items())}
[metrics]
{"".join(f"{k} = {json.dumps(v)}{chr(10)}" for k, v in {"port": 0, **(metrics or {})}.items())}"""
    for cand, path in candidates.items():
        more = {"model": "digits", **(extra or {}).get(cand, {})}
        text += f"""
[[candidates]]
name = "{cand}"
path = "{path}"
adapter = {{ rename = {{ pixels = "image" }}, cast = {{ image = "float32" }}, scale = {{ image = 0.0625 }} }}
policy = {{ {policy_text} }}
{"".join(f"{k} = {json.dumps(v)}{chr(10)}" for k, v in more.items())}"""
    path = directory / name
    path.write_text(text)
    return path


def produce(bootstrap: str, topic: str, messages: list[bytes | None], partition: Callable[[int], int] | None = None,
            max_request_size: int = 1 << 20) -> None:  # fmt: skip
    """Send in order, keyed as the mirror SDK keys (the request_id; the index for messages that have
    none, e.g. poison); ``partition(i)`` pins message i to a partition."""

    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, linger_ms=5,
                                    max_request_size=max_request_size)  # fmt: skip
        await producer.start()
        try:
            futures = [await producer.send(topic, value=m, key=_sdk_key(i, m),
                                           partition=None if partition is None else partition(i))
                       for i, m in enumerate(messages)]  # fmt: skip
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    asyncio.run(run())


def produce_batched(bootstrap: str, topic: str, messages: list[bytes | None], linger_ms: int = 5) -> None:
    """Send in order, keyed and partitioned as the mirror SDK's sender does it: records appended to
    one batch per partition (``mirror.sender``: ~2 us a record, where ``send`` costs ~18 us of
    Python and ``produce`` above also parses each message for its key). The end-to-end benchmark
    produces this way, so that the producer on its 2 cores costs what the SDK would."""
    from aiokafka.partitioner import murmur2

    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, linger_ms=linger_ms)
        await producer.start()
        try:
            partitions = sorted(await producer.partitions_for(topic))
            open_batches: dict[int, Any] = {}
            deliveries = []
            for i, message in enumerate(messages):
                key = _sdk_key(i, message)
                partition = partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]  # Kafka's default
                builder = open_batches.get(partition) or producer.create_batch()
                if builder.append(key=key, value=message, timestamp=None) is None:  # full: ship, start anew
                    deliveries.append(await producer.send_batch(builder, topic, partition=partition))
                    builder = producer.create_batch()
                    if builder.append(key=key, value=message, timestamp=None) is None:
                        raise ValueError(f"message {i} ({len(message)} bytes) is larger than a batch: use produce()")
                open_batches[partition] = builder
            for partition, builder in open_batches.items():
                deliveries.append(await producer.send_batch(builder, topic, partition=partition))
            await asyncio.gather(*deliveries)
        finally:
            await producer.stop()

    asyncio.run(run())


class _RequestId(msgspec.Struct):
    request_id: Any


_REQUEST_ID = msgspec.json.Decoder(_RequestId)


def _sdk_key(i: int, message: bytes | None) -> bytes:
    """The key the mirror SDK gives a message, its ``request_id``; the index for a message that has
    none (poison). msgspec reads only that field (a whole parse cost more than a send); what it
    refuses (``NaN`` literals, ...) the json module tries."""
    if message and message[:1] == b"{" and len(message) < (1 << 20):
        try:
            return str(_REQUEST_ID.decode(message).request_id).encode()
        except Exception:  # noqa: BLE001 - refused: the json module decides
            pass
        try:
            return str(json.loads(message)["request_id"]).encode()
        except Exception:  # noqa: BLE001 - not a request: keyed by position
            pass
    return str(i).encode()


def create_topic(bootstrap: str, name: str, partitions: int, config: dict | None = None) -> None:
    from aiokafka.admin import NewTopic

    async def run() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(name, partitions, 1, topic_configs=config or {})])
        finally:
            await admin.close()

    asyncio.run(run())


def consume_all(bootstrap: str, topic: str, expect: int, timeout_s: float = 30, keys: bool = False,
                to_end: bool = False) -> list:
    """Every committed value in the topic (``keys``: (key, value) pairs), waiting up to ``timeout_s``
    for ``expect``; ``to_end``: then read on to the topic's current end, so extra copies show too."""

    async def run() -> list:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                    group_id=f"check-{uuid.uuid4().hex[:6]}", isolation_level="read_committed")  # fmt: skip
        await consumer.start()
        out: list = []
        try:
            deadline = time.monotonic() + timeout_s

            async def drain_once() -> None:
                batch = await consumer.getmany(timeout_ms=500)
                out.extend((m.key, m.value) if keys else m.value for msgs in batch.values() for m in msgs)

            while (len(out) < expect or (to_end and not consumer.assignment())) and time.monotonic() < deadline:
                await drain_once()
            if to_end:
                tps = list(consumer.assignment())
                end = await consumer.end_offsets(tps)  # read_committed: the last stable offset
                while time.monotonic() < deadline:
                    positions = [await consumer.position(tp) for tp in tps]
                    if all(pos >= end[tp] for pos, tp in zip(positions, tps, strict=True)):
                        break
                    await drain_once()
        finally:
            await consumer.stop()
        return out

    return asyncio.run(run())


class GroupProgress:
    """(committed, end) of a group on a topic, summed over partitions, from Kafka clients opened
    once (a bench that opened them at every check, 5 times a second, took CPU from what it measured)."""

    def __init__(self, broker: str):
        self.broker = broker
        self.loop = asyncio.new_event_loop()
        self.partitions: dict[str, list[TopicPartition]] = {}

        async def start() -> None:  # aiokafka clients are made inside their loop
            self.admin = AIOKafkaAdminClient(bootstrap_servers=broker)
            self.consumer = AIOKafkaConsumer(bootstrap_servers=broker)
            await self.admin.start()
            await self.consumer.start()

        self.loop.run_until_complete(start())

    def __call__(self, topic: str, group: str) -> tuple[int, int]:
        return self.loop.run_until_complete(self._progress(topic, group))

    async def _progress(self, topic: str, group: str) -> tuple[int, int]:
        if topic not in self.partitions:
            (described,) = await self.admin.describe_topics([topic])
            self.partitions[topic] = [TopicPartition(topic, p["partition"]) for p in described["partitions"]]
        end = sum((await self.consumer.end_offsets(self.partitions[topic])).values())
        try:
            committed = await self.admin.list_consumer_group_offsets(group)
        except GroupCoordinatorNotAvailableError:  # a fresh broker creates __consumer_offsets on first use
            return 0, end
        return sum(o.offset for tp, o in committed.items() if tp.topic == topic and o.offset > 0), end

    def close(self) -> None:
        self.loop.run_until_complete(self.consumer.stop())
        self.loop.run_until_complete(self.admin.close())
        self.loop.close()


def group_progress(bootstrap: str, topic: str, group: str) -> tuple[int, int]:
    """One (committed, end) check (``GroupProgress``)."""
    progress = GroupProgress(bootstrap)
    try:
        return progress(topic, group)
    finally:
        progress.close()


def group_lag(bootstrap: str, topic: str, group: str) -> int:
    """Records of ``topic`` past what ``group`` committed (the end offsets count transaction
    markers too: a group that commits only one past its last record never reaches 0 on a
    transactional topic)."""
    committed, end = group_progress(bootstrap, topic, group)
    return end - committed


class WorkerProcess:
    """``shadowlens worker`` in its own process group, its output in a log file."""

    def __init__(self, config: Path, log_path: Path, role: str = "all"):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("KAFKA_BOOTSTRAP", None)  # the config file names the broker
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker", "--config", str(config), "--role", role, "--loglevel", os.environ.get("SHADOWLENS_TEST_LOGLEVEL", "info")],
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

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

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
        rows = httpx.get(f"{api}/v1/windows/{model}/{cand}", params={"limit": 1000}, timeout=5).json()
        totals[cand] = sum(r["requests"] for r in rows)
    return totals


class Workers:
    """The worker topology under test: ``"one"`` process (``--role all``) or ``"split"``
    (``replays`` replay processes and one judge process, which serves the API)."""

    def __init__(self, config: Path, directory: Path, topology: str = "one", replays: int = 2):
        self.config, self.directory, self.topology = config, directory, topology
        self.started = 0
        self.judge = self._start("all" if topology == "one" else "judge")
        self.replays = [] if topology == "one" else [self._start("replay") for _ in range(replays)]

    def _start(self, role: str) -> WorkerProcess:
        self.started += 1
        return WorkerProcess(self.config, self.directory / f"worker-{self.started}-{role}.log", role=role)

    @property
    def processes(self) -> list[WorkerProcess]:
        return [self.judge, *self.replays]

    def restart_judge(self, sig: int = signal.SIGKILL) -> None:
        self.judge.stop(sig)
        self.judge = self._start("all" if self.topology == "one" else "judge")

    def kill_replay(self, index: int = 0, sig: int = signal.SIGKILL) -> None:
        self.replays[index].stop(sig)
        self.replays[index] = self._start("replay")

    def stop_replays(self) -> None:
        """Stop the replay processes gently (``split`` only), so the diffs topic goes quiet: each
        one reports its progress to every diffs partition once a second, in a transaction."""
        for p in self.replays:
            p.stop()

    def all_alive(self) -> bool:
        return all(p.alive for p in self.processes)

    def wait_for(self, predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
        for p in self.replays:
            if not p.alive and p.proc.returncode not in (0, -signal.SIGTERM):
                raise RuntimeError(f"replay process exited ({p.proc.returncode}):\n{p.log_tail()}")
        return self.judge.wait_for(predicate, timeout_s, what)

    def logs(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.directory.glob("worker-*.log")))

    def stop(self) -> None:
        for p in self.processes:
            p.stop()


class OwnBroker:
    """A Kafka broker of the caller's own (scripts/kafka.sh on another port and state dir), so a
    test can stop and restart it without disturbing the shared one."""

    def __init__(self, name: str):
        port = free_port_pair()
        self.bootstrap = f"127.0.0.1:{port}"
        self.env = {**os.environ, "KAFKA_PORT": str(port), "KAFKA_CONTROLLER_PORT": str(port + 1),
                    "KAFKA_STATE_DIR": f"/tmp/shadowlens-kafka-{name}-{os.getpid()}"}  # fmt: skip
        self.env.pop("KAFKA_BOOTSTRAP", None)

    def run(self, command: str) -> None:
        script = Path(__file__).resolve().parent.parent / "scripts" / "kafka.sh"
        proc = subprocess.run(["bash", str(script), command], env=self.env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"kafka.sh {command} failed:\n{proc.stdout}\n{proc.stderr}")


def free_port_pair() -> int:
    """A port p with p+1 also free (kafka.sh puts the controller on p+1)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair")


def stored_rows(data_dir: Path, *sql: str) -> list[list[tuple]]:
    """Each query's rows from a worker's embedded ClickHouse (chDB at ``data_dir``), read once the
    worker has let go of the path (chDB allows one process per data path)."""
    from streams.sink import ClickHouseSink

    sink = ClickHouseSink(f"chdb:///{data_dir}", create=False)
    try:
        return [sink.query(q) for q in sql]
    finally:
        sink.close()
