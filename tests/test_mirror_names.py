"""The mirror SDK's names agree with the CLI, the TOML and the README (``bootstrap``, with aiokafka's
``bootstrap_servers`` as an alias), a wrong keyword is one line naming the right ones, and records
that a closing client could not deliver are counted as lost to the shutdown, not as dropped.

Real aiokafka clients throughout: against the shared broker, and against a port where nothing
listens (a broker that is down)."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer

from mirror import AsyncMirrorClient, MirrorClient, MirrorConfig, MirrorError

X = np.zeros((1, 4), np.float32)
Y = np.zeros((1, 3), np.float32)


def down_bootstrap() -> str:
    """host:port of a port where nothing listens (bound, then released): a broker that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


async def _consume(bootstrap: str, topic: str, expect: int, timeout_s: float = 60) -> list:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    out: list = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(out) < expect and loop.time() < deadline:
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                out.extend(messages)
    finally:
        await consumer.stop()
    return out


# ------------------------------------------------------------------ names --

@pytest.mark.kafka
def test_bootstrap_keyword_delivers_to_that_broker(kafka_bootstrap):
    topic = f"mirror-names-{uuid.uuid4().hex[:8]}"
    with MirrorClient(bootstrap=kafka_bootstrap, topic=topic, close_timeout_s=30) as client:
        assert client.config.bootstrap == client.config.bootstrap_servers == kafka_bootstrap
        for i in range(20):
            assert client.publish(f"sync-{i}", "digits", "v1", {"x": X}, {"y": Y}, 1.0)
    stats = client.stats()
    assert (stats.published, stats.dropped, stats.failed) == (20, 0, 0), stats

    async def run_async() -> None:
        async with AsyncMirrorClient(bootstrap=kafka_bootstrap, topic=topic, close_timeout_s=30) as mirror:
            for i in range(20):
                assert mirror.publish(f"async-{i}", "digits", "v1", {"x": X}, {"y": Y}, 1.0)
        assert mirror.stats().published == 20, mirror.stats()

    asyncio.run(run_async())
    ids = {json.loads(m.value)["request_id"] for m in asyncio.run(_consume(kafka_bootstrap, topic, 40))}
    assert ids == {f"{kind}-{i}" for kind in ("sync", "async") for i in range(20)}


def test_bootstrap_servers_stays_an_alias():
    there = down_bootstrap()
    assert MirrorConfig(bootstrap_servers=there).bootstrap == there
    client = MirrorClient(bootstrap_servers=there, close_timeout_s=0.2)
    try:
        assert client.config.bootstrap == there and client.config.producer_kwargs()["bootstrap_servers"] == there
    finally:
        client.close()
    # A config plus keywords: the alias replaces the config's value as the name does.
    base = MirrorConfig(bootstrap="a:1", topic="t")
    client = AsyncMirrorClient(base, bootstrap_servers=there)
    assert client.config.bootstrap == there and client.config.topic == "t"


@pytest.mark.parametrize("make", [MirrorClient, AsyncMirrorClient, MirrorConfig], ids=lambda m: m.__name__)
def test_a_wrong_keyword_is_one_line_naming_the_right_ones(make):
    with pytest.raises(MirrorError) as info:
        make(bootstrap_server="127.0.0.1:19092")
    message = str(info.value)
    assert isinstance(info.value, TypeError)  # what a wrong keyword argument always raised
    assert "\n" not in message
    assert message.startswith(f"bootstrap_server: not a setting of {make.__name__}(); did you mean bootstrap?")
    assert "settings: bootstrap, topic," in message and "bootstrap_servers is an alias of bootstrap" in message
    with pytest.raises(MirrorError, match=r"^kafka: not a setting of .*\(\); settings: bootstrap"):
        make(kafka="127.0.0.1:19092")
    with pytest.raises(MirrorError, match="got both bootstrap and its alias bootstrap_servers"):
        make(bootstrap="a:1", bootstrap_servers="b:2")


def test_a_config_that_is_not_a_config_is_named():
    with pytest.raises(MirrorError, match=r"^config: str '127.0.0.1:19092' is not a MirrorConfig; .*bootstrap="):
        MirrorClient("127.0.0.1:19092")


# --------------------------------------------------- close with the broker down -

@pytest.mark.timeout(60)
def test_records_undelivered_at_close_are_shutdown_not_dropped():
    client = MirrorClient(bootstrap=down_bootstrap(), client_id="names-sync", buffer_size=100)
    results = [client.publish(f"r{i}", "m", "v", X, Y, 1.0) for i in range(150)]
    assert results.count(True) == 100  # the buffer holds 100; publish refused the rest at once
    stats = client.close(timeout=1.0)
    assert stats.published == 0 and not stats.connected
    assert stats.failed_by_reason["shutdown"] == 100  # taken, never delivered: lost to the shutdown
    assert stats.dropped == 50  # refused by publish (buffer full)
    assert stats.accepted == stats.published + stats.failed and stats.buffer_depth == 0
    text = client.prometheus_text().decode()
    assert 'shadowlens_mirror_failed_total{client="names-sync",reason="shutdown"} 100.0' in text
    assert 'shadowlens_mirror_dropped_total{client="names-sync"} 50.0' in text


@pytest.mark.timeout(60)
def test_async_client_counts_undelivered_records_at_close_as_shutdown():
    async def run() -> None:
        mirror = await AsyncMirrorClient(bootstrap=down_bootstrap(), client_id="names-async").start()
        for i in range(30):
            assert mirror.publish(f"r{i}", "m", "v", X, Y, 1.0)
        await asyncio.sleep(0.2)  # the sender is trying to connect meanwhile
        stats = await mirror.close(timeout=1.0)
        assert (stats.published, stats.dropped, stats.failed_by_reason["shutdown"]) == (0, 0, 30), stats
        assert 'reason="shutdown"} 30.0' in mirror.prometheus_text().decode()
        assert mirror.publish("late", "m", "v", X, Y, 1.0) is False and mirror.stats().dropped == 1

    asyncio.run(run())
