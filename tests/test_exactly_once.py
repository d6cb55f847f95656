"""Dead letters exactly once across SIGKILLs of the replay stage (real Kafka, real processes).

A replay batch's diffs, its dead letters and its mirror offsets are one Kafka transaction
(``[kafka] exactly_once``, the default). Before, a replay process killed after its dead letters were
acknowledged and before its offsets were committed sent them again on restart: the topic held
copies. Here a stream of poison is replayed by processes SIGKILLed mid-stream, one after another;
a ``read_committed`` reader then finds every poison message exactly once.

With ``exactly_once = false`` the same run left copies (checked by hand, two runs: 124 and 279 dead
letters written twice), so this test can fail.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from harness import WorkerProcess, consume_all, create_topic, free_port, produce, write_worker_config
from streams.models import build_digits_models

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

POISON = 40_000
KILL_AT = (0.2, 0.45, 0.7)  # share of the stream committed when each replay process is SIGKILLed


def committed(bootstrap: str, group: str, topic: str) -> int:
    async def run() -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets(group)
        except Exception:  # noqa: BLE001 - no coordinator or group yet: nothing committed
            return 0
        finally:
            await admin.close()
        return sum(o.offset for tp, o in offsets.items() if tp.topic == topic and o.offset > 0)

    return asyncio.run(run())


def test_dead_letters_are_written_exactly_once_across_replay_sigkills(kafka_bootstrap, tmp_path):
    models = build_digits_models(tmp_path / "models")
    topic = f"eos-{uuid.uuid4().hex[:8]}"
    create_topic(kafka_bootstrap, topic, 3)
    produce(kafka_bootstrap, topic, [b"{not json %d" % i for i in range(POISON)])
    config = write_worker_config(tmp_path, kafka_bootstrap, {"digits-v2": models["good"]}, topic, free_port(),
                                 partitions=3)  # fmt: skip
    group = f"worker-{topic}"
    for i, share in enumerate(KILL_AT):
        proc = WorkerProcess(config, tmp_path / f"replay-{i}.log", role="replay")
        deadline = time.monotonic() + 90
        while committed(kafka_bootstrap, group, topic) < share * POISON:
            assert proc.alive, proc.log_tail()
            assert time.monotonic() < deadline, f"replay {i} made no progress:\n{proc.log_tail()}"
            time.sleep(0.05)
        proc.stop(signal.SIGKILL)  # mid-stream: its current batch is sent, committed, or neither
    last = WorkerProcess(config, tmp_path / "replay-last.log", role="replay")
    try:
        deadline = time.monotonic() + 120
        while committed(kafka_bootstrap, group, topic) < POISON:
            assert last.alive, last.log_tail()
            assert time.monotonic() < deadline, last.log_tail()
            time.sleep(0.2)
        letters = consume_all(kafka_bootstrap, f"{topic}.dlq", expect=POISON, timeout_s=60, keys=True, to_end=True)
    finally:
        last.stop()
    keys = [k for k, _ in letters]
    assert len(set(keys)) == POISON, f"{POISON - len(set(keys))} poison messages have no dead letter"
    assert len(keys) == POISON, f"{len(keys) - POISON} dead letters written twice"
