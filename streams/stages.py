"""The two Kafka stages around the replay and judge cores.

ReplayStage (any number of processes, one consumer group on the mirror topic):
    getmany -> ReplayCore.replay -> diff batches to the diffs topic (key = pair) and dead letters
    to the dead-letter topic, all acknowledged -> commit the mirror offsets -> every
    ``progress_interval_s``, a Progress record to every diffs partition.
    Two micro-batches overlap: batch k+1 is replayed (on the core's own thread) while batch k's
    transaction is sent and committed (on the event loop). Transactions still begin and end in
    order, one at a time, and a progress report waits for the transaction before it, so what a
    reader sees and what a crash leaves are as without the overlap.

JudgeStage (one consumer group on the diffs topic; a pair lives on one partition, so on one judge):
    on assignment, restore the pairs' state from the changelog partitions of the same numbers ->
    getmany -> JudgeCore.apply (rows into ClickHouse, then state) -> state to the changelog,
    acknowledged -> commit the diffs offsets; each second, close due windows the same way.

Each write is retried until it succeeds (``until_done``): while the database or the broker is
away, the stage stops reading (nothing piles up in memory), ``/readyz`` says what it waits for,
and the uncommitted offsets guarantee that a crash meanwhile loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from aiokafka import TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError
from aiokafka.structs import OffsetAndMetadata

from streams import kafka_io
from streams.config import Settings
from streams.judge import JudgeCore
from streams.kafka_io import TYPE_DIFFS, TYPE_PROGRESS, Health, until_done
from streams.records import TYPE_HEADER, DiffBatch, PartitionProgress, Progress
from streams.replay import Inbound, ReplayCore, ReplayOutput
from streams.windows import SourceView

log = logging.getLogger("shadowlens.stages")
KAFKA, KAFKA_JUDGE = "kafka (replay stage)", "kafka (judge stage)"  # health components
_APPLY_RECORDS = 64  # diff records (micro-batches of both candidates) per judge apply, at most
_MOVED = (CommitFailedError, IllegalStateError)  # the partition went to another process: it redoes the batch


class ReplayStage:
    def __init__(self, settings: Settings, core: ReplayCore, health: Health, partitions: dict[str, int]):
        self.settings, self.core, self.health = settings, core, health
        self.partitions = partitions  # topic -> partition count (streams.kafka_io.ensure_topics)
        self.replica = f"replay-{uuid.uuid4().hex[:8]}"
        self.progress: dict[int, PartitionProgress] = {}
        self.replayed = 0
        self.dead_letters = 0
        self.reachable_since = 0.0  # restarted after a failed or stalled send (see _send)
        self.metrics = None  # streams.metrics.WorkerMetrics, set by the topology
        self.last_message_wall = 0.0
        self.reload = None  # streams.registry_reload.HotReload, set by the topology

    async def run(self) -> None:
        k = self.settings.kafka
        consumer = kafka_io.consumer(self.settings, k.topic, k.group_id, self.settings.replay.batch_size,
                                     listener=_ForgetProgress(self.progress))  # fmt: skip
        # Exactly once: one transaction per batch carries its diffs, its dead letters and its mirror
        # offsets, so a process killed mid-batch leaves nothing a read_committed reader sees.
        txn_id = f"{k.group_id}-{self.replica}" if k.exactly_once else None
        producer = kafka_io.Producer(self.settings, self.health, KAFKA, transactional_id=txn_id)
        diffs_partitions = list(range(self.partitions[k.diffs_topic]))
        mirror_partitions = self.partitions[k.topic]
        last_report = 0.0
        # The core runs on one thread of its own, so it is only ever used by one thread at a time;
        # the event loop meanwhile sends the previous batch's transaction (candidates' calls and
        # numpy release the GIL; the loop's I/O needs little of it).
        core_thread = ThreadPoolExecutor(1, thread_name_prefix="replay-core")
        loop = asyncio.get_running_loop()
        sending: asyncio.Task | None = None  # the previous batch's transaction
        try:
            # Inside the try: a worker stopped while the consumer starts still closes it.
            await until_done(KAFKA, self.health, consumer.start)
            while True:
                fetched = await consumer.getmany(
                    timeout_ms=int(self.settings.replay.batch_within_s * 1000), max_records=self.settings.replay.batch_size
                )  # fmt: skip
                messages = [Inbound(m.value, tp.partition, m.offset, tp.topic, m.key)
                            for tp, msgs in fetched.items() for m in msgs]  # fmt: skip
                if messages:
                    if self.reload is not None:  # the registry's table for this batch (may wait for a load)
                        table = await self.reload.prepare(messages)
                        if table is not None:  # swapped between batches, on the core's thread
                            await loop.run_in_executor(core_thread, self.core.swap, table)
                    started = time.perf_counter()
                    out = await loop.run_in_executor(core_thread, self.core.replay, messages)
                    self.last_message_wall = time.time()
                    if self.metrics is not None:
                        self.metrics.batch_seconds.observe(time.perf_counter() - started)
                    if sending is not None:  # one transaction at a time, in order
                        await sending
                    sending = asyncio.create_task(self._hand_over(consumer, producer, messages, out))
                if time.monotonic() - last_report >= k.progress_interval_s:
                    if sending is not None:  # a report covers only what was acknowledged before it
                        await sending
                        sending = None
                    await self._report(consumer, producer, diffs_partitions, mirror_partitions)
                    last_report = time.monotonic()
                    # A summary is due even when no message arrives; on the core's thread, as the log is the core's.
                    await loop.run_in_executor(core_thread, self.core.letter_log.flush)
                    if self.reload is not None:  # loads start and finish while no message arrives too
                        self.reload.idle()
        finally:
            try:
                if sending is not None and not sending.done():
                    sending.cancel()  # stopped mid-transaction: unacknowledged, uncommitted, redelivered
                    await asyncio.gather(sending, return_exceptions=True)
                await consumer.stop()  # leaves the group; commits nothing (auto-commit is off)
            finally:
                core_thread.shutdown(wait=False, cancel_futures=True)
                await producer.stop()

    async def _hand_over(self, consumer, producer, messages: list[Inbound], out: ReplayOutput) -> None:
        """One replayed micro-batch's transaction: its diffs, dead letters and mirror offsets."""
        k = self.settings.kafka
        records = [dict(topic=k.diffs_topic, key=b.key, value=b.encode(), headers=[(TYPE_HEADER, TYPE_DIFFS)])
                   for b in out.batches]  # fmt: skip
        for letter in out.dead_letters:
            key = f"{letter.topic}/{letter.partition}/{letter.offset}".encode()
            records.append(dict(topic=k.dead_letter_topic, key=key, value=letter.model_dump_json().encode()))
        commit = _next_offsets(messages)
        # Exactly once: the offsets go in the records' transaction (for the group, not by the consumer).
        await self._send(producer, records, offsets=commit if k.exactly_once else None, group_id=k.group_id)
        # Dead letters are logged by the replay core, summarised per (candidate, reason) a minute
        # (streams.replay.LetterLog): one line per message flooded the log (1,200 lines for 1,200).
        now = time.time()
        assigned = consumer.assignment()
        for tp, nxt in commit.items():
            if tp not in assigned:  # moved during the batch: its new owner reports it
                continue
            old = self.progress.get(tp.partition)
            sent = max(out.max_sent_ms.get(tp.partition, 0), old.max_sent_ms if old else 0)
            highwater = consumer.highwater(tp)
            self.progress[tp.partition] = PartitionProgress(nxt.offset, -1 if highwater is None else highwater, sent, now)
            if self.metrics is not None and highwater is not None:
                self.metrics.lag.labels(str(tp.partition)).set(max(highwater - nxt.offset, 0))
        if not k.exactly_once:
            try:
                await until_done(KAFKA, self.health, lambda: consumer.commit(commit), give_up=_MOVED)
            except _MOVED as exc:
                log.warning("mirror partitions moved before commit (%s): their new owner replays them", exc)
        self.replayed += out.requests
        self.dead_letters += len(out.dead_letters)
        if self.metrics is not None:
            self.metrics.replayed.inc(out.requests)
            for letter in out.dead_letters:
                self.metrics.dead_letters.labels(letter.error_type).inc()

    async def _report(self, consumer, producer, diffs_partitions: list[int], mirror_partitions: int) -> None:
        now = time.time()
        report = Progress(self.replica, mirror_partitions, now)
        for tp in consumer.assignment():
            old = self.progress.get(tp.partition)
            try:
                position = old.position if old else await consumer.position(tp)
                highwater = consumer.highwater(tp)
            except (AssertionError, IllegalStateError):  # revoked meanwhile: its new owner reports it
                continue
            report.partitions[tp.partition] = PartitionProgress(
                position, -1 if highwater is None else highwater, old.max_sent_ms if old else 0,
                old.advanced_wall if old else now,
            )  # fmt: skip
            if old is None:
                self.progress[tp.partition] = report.partitions[tp.partition]
        if not report.partitions:
            return

        def records() -> list[dict]:
            # Made at each attempt: a report that waited out an outage says so when it lands.
            report.wall = time.time()
            report.reachable_since = report.wall if KAFKA in self.health.waiting else self.reachable_since
            value = report.encode()
            return [dict(topic=self.settings.kafka.diffs_topic, value=value, partition=p,
                         headers=[(TYPE_HEADER, TYPE_PROGRESS)]) for p in diffs_partitions]  # fmt: skip

        await self._send(producer, records)

    async def _send(self, producer, records, offsets: dict | None = None, group_id: str | None = None) -> None:
        """Send and wait for the acks; a send that failed or stalled (the broker was away: aiokafka
        may just wait for it) restarts the 'reachable since' clock the progress reports carry."""
        started = time.time()
        await producer.send_all(records, offsets=offsets, group_id=group_id)
        stalled = time.time() - started > self.settings.windows.progress_fresh_s
        if stalled or self.health.recovered_at.get(KAFKA, 0.0) >= started:
            self.reachable_since = time.time()


def _next_offsets(messages: list[Inbound]) -> dict[TopicPartition, OffsetAndMetadata]:
    """The offsets to commit once these messages are written: one past the last of each partition."""
    last: dict[TopicPartition, int] = {}
    for m in messages:
        tp = TopicPartition(m.topic, m.partition)
        last[tp] = max(last.get(tp, -1), m.offset)
    return {tp: OffsetAndMetadata(off + 1, "") for tp, off in last.items()}


class JudgeStage:
    def __init__(self, settings: Settings, core: JudgeCore, health: Health):
        self.settings, self.core, self.health = settings, core, health
        self.views: dict[int, SourceView] = {}  # diffs partition -> what it says of the mirror partitions
        self.pair_partition: dict[str, int] = {}  # pair key -> diffs partition (and changelog partition)
        self.rows = 0
        self.assigned: set[int] | None = None  # diffs partitions assigned, not yet restored
        self.committed: dict[TopicPartition, int] = {}  # diffs offsets this process committed
        self.revoked: set[int] = set()  # diffs partitions revoked while _gather waited
        self.registry = None  # streams.registry_follow.JudgeRegistry, set by the topology

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


class _ForgetProgress(ConsumerRebalanceListener):
    """A mirror partition that moves away is reported by its new owner, from its committed offset."""

    def __init__(self, progress: dict[int, PartitionProgress]):
        self.progress = progress

    async def on_partitions_revoked(self, revoked) -> None:
        for tp in revoked:
            self.progress.pop(tp.partition, None)

    async def on_partitions_assigned(self, assigned) -> None:
        pass


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
