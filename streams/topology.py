"""The faust worker: the whole streaming topology in one place.

    mirror topic --(agent ``replay``: micro-batch, decode, dedup, replay, diff)--> ClickHouse
                  \\--> dead-letter topic (malformed messages, with the reason)
    timer ``close_windows`` -> window_stats + verdicts -> ClickHouse
    task ``verdicts_api`` -> HTTP (served here because chDB allows one process per data path)

Table beside the agent: ``pair-state`` (open windows and cumulative evidence per
model/candidate, JSON). It is keyed by pair through the producer's partitioner (not by the
source partition) so the timer can update it too; that assumes one worker process owns the
whole mirror topic; scale-out is one worker per topic (see README).

Delivery is at-least-once: a micro-batch's offsets are acknowledged only after its diff rows are
in ClickHouse; diff rows are idempotent (ReplacingMergeTree key), and the pipeline skips request
ids that already have a diff row, so window counts never include a redelivery.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import faust

from schemas import DeadLetter, MirroredRequest
from streams.api import create_app, serve_in_loop
from streams.config import Settings
from streams.pipeline import Pipeline
from streams.sink import ClickHouseSink

log = logging.getLogger("shadowlens.worker")


def create_worker_app(settings: Settings) -> faust.App:
    kafka = settings.kafka
    app = faust.App(
        kafka.group_id,
        broker=f"kafka://{kafka.bootstrap}",
        store="memory://",
        topic_partitions=kafka.partitions,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,  # our API (FastAPI, OpenAPI) is served by the task below instead
        datadir=str(Path(tempfile.gettempdir()) / "shadowlens-faust"),  # nothing durable: memory tables
        broker_commit_interval=kafka.commit_interval_s,
        broker_session_timeout=kafka.session_timeout_s,
        broker_heartbeat_interval=kafka.session_timeout_s / 10,
    )
    mirror_topic = app.topic(kafka.topic, key_type=bytes, value_type=bytes, value_serializer="raw",
                             key_serializer="raw", partitions=kafka.partitions)  # fmt: skip
    dead_letter_topic = app.topic(kafka.dead_letter_topic, value_serializer="raw", key_serializer="raw",
                                  partitions=kafka.partitions)  # fmt: skip
    pair_state = app.Table("pair-state", default=None, use_partitioner=True)

    sink = ClickHouseSink(settings.clickhouse.dsn, settings.clickhouse.database)
    pipeline = Pipeline(settings, sink, pair_state=pair_state)
    app.shadowlens_pipeline = pipeline  # for tests and introspection

    async def changelog_metadata_ready() -> None:
        # With use_partitioner, faust hashes table keys with the producer's partitioner, which
        # needs the changelog topic's metadata loaded first (faust does not wait for it).
        if not getattr(pair_state, "_shadowlens_ready", False):
            producer = app.producer._ensure_producer()
            await producer.client._wait_on_metadata(pair_state.changelog_topic.get_topic_name())
            pair_state._shadowlens_ready = True
            log.info("changelog metadata ready")

    @app.agent(mirror_topic)
    async def replay(stream):
        await changelog_metadata_ready()
        async for events in stream.take_events(settings.replay.batch_size, within=settings.replay.batch_within_s):
            good: list[MirroredRequest] = []
            positions: list[tuple[int, int]] = []
            dead: list[DeadLetter] = []
            for event in events:
                msg = event.message
                decoded = pipeline.decode(event.value, msg.topic, msg.partition, msg.offset)
                if isinstance(decoded, MirroredRequest):
                    good.append(decoded)
                    positions.append((msg.partition, msg.offset))
                else:
                    dead.append(decoded)
            result = pipeline.process(good, positions)
            for event in events:
                processed_offsets[event.message.partition] = event.message.offset
            if result.redelivered:
                log.info("skipped %d redelivered (request, candidate) pairs already in state", result.redelivered)
            for letter in dead + result.dead_letters:
                log.warning("dead letter (%s): %s", letter.error_type, letter.reason)
                await dead_letter_topic.send(value=letter.model_dump_json().encode())
            # take_events acknowledges these offsets once this iteration returns: after the write.

    processed_offsets: dict[int, int] = {}  # mirror partition -> last offset fully processed

    def drained() -> bool:
        """Every assigned mirror partition has been processed up to its high watermark."""
        assigned = [tp for tp in app.consumer.assignment() if tp.topic == kafka.topic]
        if not assigned:
            return False
        for tp in assigned:
            highwater = app.consumer.highwater(tp)  # next offset to be written; None before a fetch
            committed = app.consumer._committed_offset.get(tp) or 0  # next offset to read after a restart
            done = max(processed_offsets.get(tp.partition, -1) + 1, committed)
            if highwater is None or highwater > done:
                return False
        return True

    @app.timer(interval=1.0)
    async def close_windows():
        await changelog_metadata_ready()
        for verdict in pipeline.close_due(drained=drained()):
            log.info("verdict %s/%s: %s (%d samples)", verdict.model, verdict.candidate, verdict.verdict,
                     verdict.samples)  # fmt: skip

    if settings.api.enabled:

        @app.task
        async def verdicts_api():
            await serve_in_loop(create_app(sink), settings.api.host, settings.api.port).serve()

    return app


async def ensure_topics(settings: Settings) -> None:
    """Create the mirror and dead-letter topics when missing.

    faust creates only its own internal topics; a source topic that appears after the worker
    started is noticed only at the next metadata refresh (minutes), so create it up front.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [settings.kafka.topic, settings.kafka.dead_letter_topic]
        missing = [NewTopic(t, settings.kafka.partitions, 1) for t in wanted if t not in existing]
        if missing:
            await admin.create_topics(missing)
            log.info("created topics %s", [t.name for t in missing])
    finally:
        await admin.close()


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    import asyncio

    asyncio.run(ensure_topics(settings))
    app = create_worker_app(settings)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
