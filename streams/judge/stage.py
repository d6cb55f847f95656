"""The judge stage: the Kafka loop around JudgeCore (streams/judge/core.py).

One consumer group on the diffs topic; a pair lives on one partition, so on one judge:
    on assignment, restore the pairs' state from the changelog partitions of the same numbers ->
    getmany -> JudgeCore.apply (rows into ClickHouse, then state) -> state to the changelog,
    acknowledged -> commit the diffs offsets; each second, close due windows the same way.

Each write is retried until it succeeds (``until_done``): while the database or the broker is
away, the stage stops reading (nothing piles up in memory), ``/readyz`` says what it waits for,
and the uncommitted offsets guarantee that a crash meanwhile loses nothing.
"""

from __future__ import annotations

import logging
import time

from aiokafka import TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError
from aiokafka.structs import OffsetAndMetadata

from streams import kafka_io
from streams.config import Settings
from streams.judge.core import JudgeCore
from streams.judge.windows import SourceView
from streams.kafka_io import TYPE_PROGRESS, Health, until_done
from streams.records import TYPE_HEADER, DiffBatch, Progress

log = logging.getLogger("shadowlens.stages")
KAFKA_JUDGE = "kafka (judge stage)"  # health component
_APPLY_RECORDS = 64  # diff records (micro-batches of both candidates) per judge apply, at most
_MOVED = (CommitFailedError, IllegalStateError)  # the partition went to another process: it redoes the batch


class JudgeStage:
    def __init__(self, settings: Settings, core: JudgeCore, health: Health):
        self.settings, self.core, self.health = settings, core, health
        self.views: dict[int, SourceView] = {}  # diffs partition -> what it says of the mirror partitions
        self.pair_partition: dict[str, int] = {}  # pair key -> diffs partition (and changelog partition)
        self.rows = 0
        self.assigned: set[int] | None = None  # diffs partitions assigned, not yet restored
        self.committed: dict[TopicPartition, int] = {}  # diffs offsets this process committed
        self.revoked: set[int] = set()  # diffs partitions revoked while _gather waited
        self.registry = None  # streams.registry.follow.JudgeRegistry, set by the topology

    async def run(self) -> None:
        k = self.settings.kafka
        self.producer = kafka_io.Producer(self.settings, self.health, KAFKA_JUDGE)
        consumer = kafka_io.consumer(self.settings, k.diffs_topic, k.judge_group, _APPLY_RECORDS, listener=_Recovery(self))
        last_close = 0.0
        try:
            await until_done(KAFKA_JUDGE, self.health, consumer.start)  # in the try: stopped meanwhile, it closes
            while True:
                fetched = await self._gather(consumer)
                if self.assigned is not None:
                    # The assignment changed: nothing is applied until the pairs of the new
                    # partitions are restored. Records fetched meanwhile are read again.
                    for tp, msgs in fetched.items():
                        if tp in consumer.assignment():
                            consumer.seek(tp, msgs[0].offset)
                    assigned, self.assigned = self.assigned, None
                    await until_done(KAFKA_JUDGE, self.health, lambda: self.restore(assigned))
                    continue
                if fetched:
                    await self._apply(consumer, fetched)
                if time.monotonic() - last_close >= 1.0:
                    if self.registry is not None:  # candidates, policy changes, retirements
                        await until_done("clickhouse", self.health, self.registry.refresh)
                    await self._close_due()
                    await self._commit_past_markers(consumer)
                    last_close = time.monotonic()
        finally:
            try:
                await consumer.stop()
            finally:
                await self.producer.stop()

    async def _gather(self, consumer) -> dict:
        """Records to apply in one go: what arrives within ``insert_linger_s`` of the first, up to
        ``_APPLY_RECORDS``. Each apply costs a fixed part (chDB's insert, the pair states'
        changelog write, the commit); with live traffic records trickle in one micro-batch at a
        time, and applying each alone spent most of the judge's time on that fixed part. A
        backlog fills the records at once and waits for nothing."""
        self.revoked.clear()
        fetched = await consumer.getmany(timeout_ms=500, max_records=_APPLY_RECORDS)
        linger = self.settings.clickhouse.insert_linger_s
        if not fetched or linger <= 0:
            return fetched
        deadline = time.monotonic() + linger
        count = sum(map(len, fetched.values()))
        while count < _APPLY_RECORDS and self.assigned is None and (left := deadline - time.monotonic()) > 0:
            more = await consumer.getmany(timeout_ms=max(1, int(left * 1000)), max_records=_APPLY_RECORDS - count)
            for tp, msgs in more.items():
                fetched.setdefault(tp, []).extend(msgs)  # a partition's records stay in offset order
                count += len(msgs)
        if self.revoked:  # its pairs are forgotten; the new owner applies these records from the commit
            fetched = {tp: msgs for tp, msgs in fetched.items() if tp.partition not in self.revoked}
        return fetched

    async def _apply(self, consumer, fetched) -> None:
        batches: list[DiffBatch] = []
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for tp, msgs in fetched.items():
            for m in msgs:
                kind = dict(m.headers or ()).get(TYPE_HEADER)
                try:
                    if kind == TYPE_PROGRESS:
                        self.views.setdefault(tp.partition, SourceView()).update(Progress.decode(m.value))
                    else:
                        batch = DiffBatch.decode(m.value)
                        self.pair_partition[f"{batch.model}/{batch.candidate}"] = tp.partition
                        batches.append(batch)
                except Exception as exc:  # noqa: BLE001 - our own format; a foreign record is skipped, loudly
                    log.error("diffs topic %s@%d: unreadable record skipped (%s)", tp, m.offset, exc)
            offsets[tp] = OffsetAndMetadata(msgs[-1].offset + 1, "")
        if self.registry is not None and any(f"{b.model}/{b.candidate}" not in self.core.configs for b in batches):
            # A candidate a replay process loaded from the registry: its record was written before these rows.
            await until_done(KAFKA_JUDGE, self.health, lambda: self.registry.refresh(sync=True))
        # Inline, not in a thread: a second Python thread would hold the GIL while a candidate's
        # session.run is being timed in the replay stage of the same process, inflating latencies.
        result = await until_done("clickhouse", self.health, _now(self.core.apply, batches))
        await self._save(result.touched)
        try:
            await until_done(KAFKA_JUDGE, self.health, lambda: consumer.commit(offsets), give_up=_MOVED)
            self.committed.update((tp, o.offset) for tp, o in offsets.items())
        except _MOVED as exc:
            log.warning("diffs partitions moved before commit (%s): their new owner re-applies them", exc)
        self.rows += result.rows
        log.debug("applied %d batches: %d rows, %d redelivered, %d duplicates; pairs %s", len(batches), result.rows,
                  result.redelivered, result.duplicates, sorted(result.touched))  # fmt: skip
        if result.redelivered or result.duplicates:
            log.info("skipped %d redelivered and %d duplicate rows", result.redelivered, result.duplicates)

    async def _commit_past_markers(self, consumer) -> None:
        """Commit positions that moved past transaction markers only. The replay stage writes the
        diffs topic in transactions, and each commit leaves a marker after the last record; a
        read_committed consumer's position skips it, but the offsets committed after applying
        records stop one short, so the group would show a lag of one per partition forever (and
        a drain check would never see it done). Every record before the position was applied
        (records are applied as soon as they are returned), so committing the position loses
        nothing."""
        ahead = {}
        for tp in consumer.assignment():
            try:
                position = await consumer.position(tp)
            except Exception:  # noqa: BLE001 - moved meanwhile: its new owner commits it
                continue
            if position > self.committed.get(tp, -1):
                ahead[tp] = OffsetAndMetadata(position, "")
        if not ahead:
            return
        try:
            await until_done(KAFKA_JUDGE, self.health, lambda: consumer.commit(ahead), give_up=_MOVED)
            self.committed.update((tp, o.offset) for tp, o in ahead.items())
        except _MOVED:
            pass  # partitions moved: their new owner reads from their committed offsets

    async def _close_due(self) -> None:
        def view_for(key: str) -> SourceView | None:
            p = self.pair_partition.get(key)
            return None if p is None else self.views.get(p)

        verdicts, touched = await until_done("clickhouse", self.health, _now(self.core.close_due, view_for))
        if log.isEnabledFor(logging.DEBUG):
            now = time.time()
            for key, pw in self.core.pairs().items():
                view = view_for(key)
                log.debug("%s: %d open windows, idle %.1f s; %s", key, len(pw.open_windows), now - pw.last_event_wall,
                          view.describe(now) if view else "no progress reports yet")  # fmt: skip
        await self._save(touched)
        for v in verdicts:
            log.info("verdict %s/%s: %s (%d samples)", v.model, v.candidate, v.verdict, v.samples)

    async def _save(self, keys: set[str]) -> None:
        """Write the pairs' state to the changelog partition of their diffs partition; acknowledged."""
        if not keys:
            return
        topic = self.settings.kafka.changelog_topic
        values = {key: v for key in keys if (v := self.core.serialized(key)) is not None}
        await self.producer.send_all([dict(topic=topic, key=key.encode(), value=value, partition=self.pair_partition[key])
                                      for key, value in values.items()])  # fmt: skip

    async def restore(self, partitions: set[int]) -> None:
        """Read the changelog partitions to their end: the last value per pair is its state."""
        from aiokafka import AIOKafkaConsumer

        if not partitions:
            return
        topic = self.settings.kafka.changelog_topic
        reader = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka.bootstrap, enable_auto_commit=False,
                                  fetch_max_bytes=64 << 20, max_partition_fetch_bytes=16 << 20)  # fmt: skip
        await until_done(KAFKA_JUDGE, self.health, reader.start)
        try:
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            reader.assign(tps)
            await reader.seek_to_beginning(*tps)
            ends = await reader.end_offsets(tps)
            restored = 0
            while [tp for tp in tps if await reader.position(tp) < ends[tp]]:
                for tp, msgs in (await reader.getmany(timeout_ms=1000)).items():
                    for m in msgs:
                        key = m.key.decode()
                        self.core.restore(key, m.value)
                        log.debug("restored %s at %s@%d (%d bytes)", key, tp, m.offset, len(m.value or b""))
                        self.pair_partition[key] = tp.partition
                        restored += 1
            log.info("restored pair state from %s partitions %s (%d records)", topic, sorted(partitions), restored)
        finally:
            await reader.stop()



def _now(fn, *args):
    """A synchronous call as the awaitable factory ``until_done`` retries."""

    async def call():
        return fn(*args)

    return call


class _Recovery(ConsumerRebalanceListener):
    """Pairs follow their diffs partition: forget revoked ones; restore assigned ones before any
    record is applied. The restore itself runs in the stage's loop (JudgeStage.run), never beside
    an apply: aiokafka may hand out records of a new assignment while this listener still runs."""

    def __init__(self, stage: JudgeStage):
        self.stage = stage

    async def on_partitions_revoked(self, revoked) -> None:
        gone = {tp.partition for tp in revoked}
        self.stage.revoked |= gone
        log.debug("judge partitions revoked: %s", sorted(gone))
        self.stage.core.forget({k for k, p in self.stage.pair_partition.items() if p in gone})
        for p in gone:
            self.stage.views.pop(p, None)

    async def on_partitions_assigned(self, assigned) -> None:
        self.stage.assigned = {tp.partition for tp in assigned}
