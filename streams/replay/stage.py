"""The replay stage: the Kafka loop around ReplayCore (streams/replay/core.py).

Any number of processes, one consumer group on the mirror topic:
    getmany -> ReplayCore.replay -> diff batches to the diffs topic (key = pair) and dead letters
    to the dead-letter topic, all acknowledged -> commit the mirror offsets -> every
    ``progress_interval_s``, a Progress record to every diffs partition.
    Micro-batches overlap: batch k+1 is replayed (on the core's own thread) while batch k's
    transaction is sent and committed and batch k+2 is fetched (on the event loop). Transactions
    still begin and end in order, one at a time, and a progress report waits for every fetched
    batch's transaction, so what a reader sees and what a crash leaves are as without the overlap
    (a crash redoes up to three batches: fetched, replaying, committing).

Each write is retried until it succeeds (``until_done``): while the broker is away the stage stops
reading (nothing piles up in memory), ``/readyz`` says what it waits for, and the uncommitted offsets
guarantee that a crash meanwhile loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from aiokafka import TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError
from aiokafka.structs import OffsetAndMetadata

from streams import kafka_io
from streams.config import Settings
from streams.kafka_io import TYPE_DIFFS, TYPE_PROGRESS, Health, until_done
from streams.records import TYPE_HEADER, PartitionProgress, Progress
from streams.replay.core import ReplayCore, ReplayOutput

log = logging.getLogger("shadowlens.stages")
KAFKA = "kafka (replay stage)"  # health component
SWITCH_INTERVAL_S = 0.0001  # see run: how soon the event loop gets the GIL back from the core's thread
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
        self.reload = None  # streams.registry.reload.HotReload, set by the topology

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
        # While the core's thread runs Python, the event loop gets the GIL back after each socket
        # call or wake-up only when the core yields it: after the switch interval, 5 ms by default.
        # A transaction is several round trips in a row, so each batch's hand-over waited ~5 ms a
        # step; 0.1 ms makes that wait small (process-wide; a switch is asked for only while the
        # loop waits for the GIL, and costs microseconds). 0.1 ms against 0.5: faster in 6 of 6
        # paired runs of bench/bench_replay_timing.py (README, "Replay timing").
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        loop = asyncio.get_running_loop()
        sending: asyncio.Task | None = None  # the previous batch's transaction
        replaying: tuple | None = None  # (future, offsets to commit) of the batch on the core's thread

        def timed_replay(messages: list) -> tuple[ReplayOutput, float]:
            started = time.perf_counter()
            return self.core.replay(messages), time.perf_counter() - started

        async def hand_over_replayed() -> None:
            """The batch on the core's thread, once replayed, to its transaction (after the one before)."""
            nonlocal sending, replaying
            future, commit = replaying
            replaying = None
            out, seconds = await future
            self.last_message_wall = time.time()
            if self.metrics is not None:
                self.metrics.batch_seconds.observe(seconds)
            if sending is not None:  # one transaction at a time, in order
                await sending
            sending = asyncio.create_task(self._hand_over(consumer, producer, commit, out))

        try:
            # Inside the try: a worker stopped while the consumer starts still closes it.
            await until_done(KAFKA, self.health, consumer.start)
            while True:
                # Fetched (and the registry's table prepared) while the batch before is replayed: then
                # only what the consumer holds already, so that batch's hand-over never waits for traffic.
                wait_s = 0 if replaying is not None else self.settings.replay.batch_within_s
                fetched = await consumer.getmany(timeout_ms=int(wait_s * 1000), max_records=self.settings.replay.batch_size)
                # aiokafka's records as they come: they carry what an ``Inbound`` does (value,
                # partition, offset, topic, key), so no object per message is made here.
                messages = [m for msgs in fetched.values() for m in msgs]
                table = None
                if messages and self.reload is not None:  # the registry's table for this batch (may wait for a load)
                    table = await self.reload.prepare(_spans(fetched))
                if replaying is not None:
                    await hand_over_replayed()
                if messages:
                    if table is not None:  # swapped between batches, on the core's thread
                        await loop.run_in_executor(core_thread, self.core.swap, table)
                    replaying = (loop.run_in_executor(core_thread, timed_replay, messages), _next_offsets(fetched))
                if time.monotonic() - last_report >= k.progress_interval_s:
                    # A report covers only what was acknowledged before it: every fetched batch first
                    # (the consumer's position, reported for a partition without a batch yet, is past them).
                    if replaying is not None:
                        await hand_over_replayed()
                    if sending is not None:
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
                # A batch still on the core's thread is dropped: uncommitted, redelivered.
                if sending is not None and not sending.done():
                    sending.cancel()  # stopped mid-transaction: unacknowledged, uncommitted, redelivered
                    await asyncio.gather(sending, return_exceptions=True)
                await consumer.stop()  # leaves the group; commits nothing (auto-commit is off)
            finally:
                core_thread.shutdown(wait=False, cancel_futures=True)
                await producer.stop()

    async def _hand_over(self, consumer, producer, commit: dict, out: ReplayOutput) -> None:
        """One replayed micro-batch's transaction: its diffs, dead letters and mirror offsets
        (``commit``: the offsets after the batch, ``_next_offsets``)."""
        k = self.settings.kafka
        shared: dict = {}  # the candidates' batches share their request lists: each is written once
        records = [dict(topic=k.diffs_topic, key=b.key, value=b.encode(shared), headers=[(TYPE_HEADER, TYPE_DIFFS)])
                   for b in out.batches]  # fmt: skip
        for letter in out.dead_letters:
            key = f"{letter.topic}/{letter.partition}/{letter.offset}".encode()
            records.append(dict(topic=k.dead_letter_topic, key=key, value=letter.model_dump_json().encode()))
        # Exactly once: the offsets go in the records' transaction (for the group, not by the consumer).
        await self._send(producer, records, offsets=commit if k.exactly_once else None, group_id=k.group_id)
        # Dead letters are logged by the replay core, summarised per (candidate, reason) a minute
        # (streams.replay.core.LetterLog): one line per message flooded the log (1,200 lines for 1,200).
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


def _spans(fetched: dict) -> dict[int, tuple[int, int]]:
    """Per mirror partition, the first and the last offset of a fetch (a partition's records come in
    offset order): what the registry checks a batch against, without a loop over its messages."""
    return {tp.partition: (msgs[0].offset, msgs[-1].offset) for tp, msgs in fetched.items() if msgs}


def _next_offsets(fetched: dict) -> dict[TopicPartition, OffsetAndMetadata]:
    """The offsets to commit once a fetch's messages are written: one past the last of each
    partition (aiokafka gives each partition's records in offset order)."""
    return {tp: OffsetAndMetadata(msgs[-1].offset + 1, "") for tp, msgs in fetched.items() if msgs}


class _ForgetProgress(ConsumerRebalanceListener):
    """A mirror partition that moves away is reported by its new owner, from its committed offset."""

    def __init__(self, progress: dict[int, PartitionProgress]):
        self.progress = progress

    async def on_partitions_revoked(self, revoked) -> None:
        for tp in revoked:
            self.progress.pop(tp.partition, None)

    async def on_partitions_assigned(self, assigned) -> None:
        pass
