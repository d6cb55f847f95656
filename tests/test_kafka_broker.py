"""End-to-end checks against a real Kafka broker (scripts/kafka.sh).

They pin down what the service relies on: idempotent producing, consumer-group
commits, per-key ordering, and a faust worker whose Table survives a restart
through its changelog topic.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections import defaultdict

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]

N_MESSAGES = 1000
N_KEYS = 20


async def _produce_keyed(bootstrap: str, topic: str) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=True, acks="all", linger_ms=5
    )
    await producer.start()
    try:
        futures = []
        for i in range(N_MESSAGES):
            key = f"key-{i % N_KEYS}".encode()
            seq = i // N_KEYS  # per-key sequence number
            futures.append(await producer.send(topic, value=str(seq).encode(), key=key))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def _consume_and_commit(bootstrap: str, topic: str, group: str):
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    received = []
    try:
        deadline = time.monotonic() + 30
        while len(received) < N_MESSAGES and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=1000)
            for msgs in batches.values():
                received.extend(msgs)
        await consumer.commit()
        partitions = consumer.assignment()
        committed = {tp: await consumer.committed(tp) for tp in partitions}
        end = await consumer.end_offsets(list(partitions))
    finally:
        await consumer.stop()
    return received, committed, end


async def _consume_leftovers(bootstrap: str, topic: str, group: str):
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",  # would replay everything if the commit was lost
    )
    await consumer.start()
    leftovers = []
    try:
        deadline = time.monotonic() + 15
        while not consumer.assignment() and time.monotonic() < deadline:
            await consumer.getmany(timeout_ms=200)
        assigned = consumer.assignment()
        # Give it a few fetch rounds to prove nothing is redelivered.
        for _ in range(4):
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                leftovers.extend(msgs)
    finally:
        await consumer.stop()
    return assigned, leftovers


def test_idempotent_producer_group_commit_and_key_order(kafka_bootstrap, new_topic):
    topic = new_topic("broker-e2e", partitions=3)
    group = f"grp-{uuid.uuid4().hex[:8]}"

    asyncio.run(_produce_keyed(kafka_bootstrap, topic))
    received, committed, end = asyncio.run(_consume_and_commit(kafka_bootstrap, topic, group))

    assert len(received) == N_MESSAGES
    assert {m.partition for m in received} == {0, 1, 2}
    per_key = defaultdict(list)
    partition_of_key = defaultdict(set)
    for m in received:
        per_key[m.key].append(int(m.value))
        partition_of_key[m.key].add(m.partition)
    assert len(per_key) == N_KEYS
    for key, seqs in per_key.items():
        assert seqs == list(range(N_MESSAGES // N_KEYS)), f"order broken for {key!r}"
        assert len(partition_of_key[key]) == 1, f"{key!r} spread over partitions"
    # Committed offsets are the log end: nothing left for the group.
    assert len(committed) == 3
    assert committed == end
    assert sum(end.values()) == N_MESSAGES  # idempotence: no duplicates written

    assigned, leftovers = asyncio.run(_consume_leftovers(kafka_bootstrap, topic, group))
    assert assigned == {TopicPartition(topic, p) for p in range(3)}
    assert leftovers == []


# --------------------------------------------------------------------- faust --

FAUST_APP = textwrap.dedent(
    """
    import os
    import faust

    app = faust.App(
        os.environ["APP_ID"],
        broker="kafka://" + os.environ["KAFKA_BOOTSTRAP"],
        store="memory://",          # state rebuilt from the changelog on start
        topic_partitions=2,         # changelog partitions == source partitions
        datadir=os.environ["APP_DATADIR"],
    )
    source = app.topic(os.environ["IN_TOPIC"], key_serializer="raw", value_serializer="raw")
    sink = app.topic(os.environ["OUT_TOPIC"], key_serializer="raw", value_serializer="raw")
    counts = app.Table("counts", default=int, partitions=2)

    @app.agent(source)
    async def count(stream):
        async for key, _value in stream.items():
            name = key.decode()
            counts[name] += 1
            await sink.send(key=key, value=f"{name}={counts[name]}".encode())

    if __name__ == "__main__":
        app.main()
    """
)


async def _send(bootstrap: str, topic: str, keys: list[str]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        for k in keys:
            await producer.send_and_wait(topic, value=b"x", key=k.encode())
    finally:
        await producer.stop()


async def _read_all(bootstrap: str, topic: str, expected: int, timeout: float) -> list[str]:
    """Read the whole topic (no group) until `expected` records or timeout,
    then linger briefly so unexpected extra records would show up too."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    out = []
    try:
        parts = [TopicPartition(topic, p) for p in range(2)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        deadline = time.monotonic() + timeout
        while len(out) < expected and time.monotonic() < deadline:
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                out.extend(m.value.decode() for m in msgs)
        for msgs in (await consumer.getmany(timeout_ms=1000)).values():
            out.extend(m.value.decode() for m in msgs)
    finally:
        await consumer.stop()
    return out


class _FaustWorker:
    def __init__(self, app_file, env, log_path):
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            # --without-web: the CLI otherwise forces the web server on (port 6066).
            [sys.executable, str(app_file), "worker", "--without-web", "-l", "info"],
            env=env,
            cwd=str(app_file.parent),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        # Produce only after "Ready": records that are already in the source
        # topic while faust starts can be processed twice (once during start-up,
        # again after it seeks to the committed offsets) -- at-least-once.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "[^Worker]: Ready" in self.tail(200_000):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"faust worker exited:\n{self.tail()}")
            time.sleep(0.1)
        raise AssertionError(f"faust worker not ready after {timeout}s:\n{self.tail()}")

    def stop(self):
        # Graceful stop commits offsets; faust can hang in shutdown if an agent
        # crashed, so fall back to SIGKILL.
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def tail(self, size: int = 4000) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-size:]


def test_faust_table_changelog_survives_restart(kafka_bootstrap, new_topic, tmp_path):
    pytest.importorskip("faust")
    # faust does not create the topics it consumes (only its internal ones), and
    # a source topic must have as many partitions as the table's changelog.
    in_topic = new_topic("faust-in", partitions=2)
    out_topic = new_topic("faust-out", partitions=2)
    app_file = tmp_path / "counter_app.py"
    app_file.write_text(FAUST_APP)
    env = dict(
        os.environ,
        KAFKA_BOOTSTRAP=kafka_bootstrap,
        APP_ID=f"faust-e2e-{uuid.uuid4().hex[:8]}",
        APP_DATADIR=str(tmp_path / "faust-data"),
        IN_TOPIC=in_topic,
        OUT_TOPIC=out_topic,
    )
    log_path = tmp_path / "worker.log"

    # Run 1: count a few events.
    worker = _FaustWorker(app_file, env, log_path)
    try:
        worker.wait_ready()
        asyncio.run(_send(kafka_bootstrap, in_topic, ["a", "b", "a", "a", "b"]))
        out = asyncio.run(_read_all(kafka_bootstrap, out_topic, 5, timeout=40))
    finally:
        worker.stop()
    assert sorted(out) == ["a=1", "a=2", "a=3", "b=1", "b=2"], f"{out}\n{worker.tail()}"

    # Run 2: a fresh process with an in-memory store must recover counts from
    # the changelog, and the committed offsets must prevent reprocessing.
    log_path.write_bytes(b"")
    worker = _FaustWorker(app_file, env, log_path)
    try:
        worker.wait_ready()
        asyncio.run(_send(kafka_bootstrap, in_topic, ["a"]))
        out = asyncio.run(_read_all(kafka_bootstrap, out_topic, 6, timeout=40))
    finally:
        worker.stop()
    assert sorted(out) == ["a=1", "a=2", "a=3", "a=4", "b=1", "b=2"], f"{out}\n{worker.tail()}"
