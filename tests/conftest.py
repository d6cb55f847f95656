"""Shared pytest fixtures.

Kafka (see docs/kafka.md):

* ``kafka_bootstrap`` (session) -- "host:port" of a real Kafka broker. Uses
  ``$KAFKA_BOOTSTRAP`` when set (external broker); otherwise runs
  ``scripts/kafka.sh start`` once per session and ``scripts/kafka.sh stop`` at
  the end, but only if this session started it (and ``KAFKA_KEEP_RUNNING`` is
  not set).
* ``new_topic`` (session) -- ``new_topic("orders", partitions=3)`` creates a
  uniquely named topic (e.g. ``orders-1f3a9c2e``) and returns its name. Plain
  sync callable; safe to call from sync tests and from inside a running event
  loop.

Tests that use them should carry ``@pytest.mark.kafka``.

Models:

* ``models`` (module) -- the digits baseline and its candidates, built locally
  (``streams.models.build_digits_models``) into a directory of the module's
  own, so a test that rewrites a model file never reaches another module.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import uuid
from pathlib import Path

import pytest

KAFKA_SH = Path(__file__).resolve().parent.parent / "scripts" / "kafka.sh"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "kafka: needs a real Kafka broker (scripts/kafka.sh or $KAFKA_BOOTSTRAP)"
    )


@pytest.fixture(scope="session")
def kafka_bootstrap():
    """Bootstrap servers ("127.0.0.1:19092") of a running Kafka broker."""
    external = os.environ.get("KAFKA_BOOTSTRAP")
    if external:
        yield external
        return

    # `start` is idempotent; remember whether a broker was already up so we
    # never stop one that somebody else started.
    was_running = subprocess.run(
        ["bash", str(KAFKA_SH), "status"], capture_output=True
    ).returncode == 0
    # The first run downloads the jars with Maven, hence the generous timeout.
    proc = subprocess.run(
        ["bash", str(KAFKA_SH), "start"], capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        pytest.fail(f"scripts/kafka.sh start failed:\n{proc.stdout}\n{proc.stderr}")
    bootstrap = next(
        line.split("=", 1)[1]
        for line in proc.stdout.splitlines()
        if line.startswith("KAFKA_BOOTSTRAP=")
    )
    yield bootstrap
    if not was_running and not os.environ.get("KAFKA_KEEP_RUNNING"):
        subprocess.run(["bash", str(KAFKA_SH), "clean"], capture_output=True, timeout=60)  # stop and drop its data


def _run_coro(coro):
    # A fresh event loop in a helper thread: works whether or not the caller
    # already runs a loop (asyncio.run() would refuse inside one).
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _create_topic(bootstrap: str, name: str, partitions: int, config: dict | None):
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    await admin.start()
    try:
        resp = await admin.create_topics(
            [NewTopic(name, partitions, 1, topic_configs=config or {})]
        )
        for topic, code, message in resp.topic_errors:
            if code != 0:
                raise RuntimeError(f"create topic {topic} failed: error {code} {message}")
        # Wait until every partition has a leader, so the first produce/fetch
        # does not race the metadata propagation.
        for _ in range(100):
            (meta,) = await admin.describe_topics([name])
            parts = meta["partitions"]
            if meta["error_code"] == 0 and len(parts) == partitions and all(
                p["leader"] >= 0 for p in parts
            ):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"topic {name} has no leaders after 10s: {meta}")
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def new_topic(kafka_bootstrap):
    """Factory: new_topic(prefix, partitions=1, config=None) -> unique topic name."""

    def make(name_prefix: str, partitions: int = 1, config: dict | None = None) -> str:
        name = f"{name_prefix}-{uuid.uuid4().hex[:8]}"
        _run_coro(asyncio.wait_for(_create_topic(kafka_bootstrap, name, partitions, config), 30))
        return name

    return make


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from streams.models import build_digits_models

    return build_digits_models(tmp_path_factory.mktemp("models"))
