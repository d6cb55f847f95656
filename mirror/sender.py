"""The Kafka half of a mirror client: an asyncio task that drains the buffer into aiokafka.

Why one sequential task: records of one key must reach the broker in publish order, and a
single ``await producer.send`` loop gives that for free (the producer keeps per-partition order).

Outages: while the producer cannot start, the task retries with capped exponential backoff
and the buffer fills, so publish drops (counted). A producer that reports an error it cannot
recover from by itself (idempotence state lost, e.g. the broker came back with a fresh log) or
that delivered nothing for a whole delivery timeout while failing, is closed and recreated;
that is how delivery resumes without restarting the client.

``stats().connected`` says whether the broker is reachable now, not merely that a producer
exists: aiokafka's producer stays "started" through an outage. It goes False when a delivery
fails because no broker could take it (after aiokafka's own retries) or, while there is nothing
to send, when the client has no connection to a partition leader and cannot open one; it goes
True again on the next delivery or successful check.
"""

from __future__ import annotations

import asyncio
import functools
import time

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka import errors as kafka_errors
from aiokafka.partitioner import murmur2

from mirror.core import MirrorCore
from mirror.encoding import encode_message
from mirror.logs import logger

# Errors after which this producer instance will not deliver again: recreate it.
_PRODUCER_BROKEN = (
    kafka_errors.OutOfOrderSequenceNumber,
    kafka_errors.UnknownProducerId,
    kafka_errors.InvalidProducerEpoch,
    kafka_errors.InvalidProducerIdMapping,
    kafka_errors.ProducerFenced,
    kafka_errors.ProducerClosed,
    kafka_errors.IllegalStateError,
)


def _unreachable(exc: BaseException) -> bool:
    """Whether a failed send means the broker could not be reached (or had no leader to take
    the records). Timeouts and aiokafka's retriable errors do; a broker's verdict on the records
    themselves (too large, invalid, not authorised) does not, and neither does ``Abandoned``."""
    if isinstance(exc, (TimeoutError, kafka_errors.KafkaTimeoutError, kafka_errors.RequestTimedOutError)):
        return True
    return isinstance(exc, kafka_errors.KafkaError) and exc.retriable


class Abandoned(kafka_errors.KafkaError):
    """Set on records still inside a producer we give up on; ``reason`` is the failure counter."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"producer abandoned ({reason})")
        self.reason = reason


_TAKE = 512  # records moved from the buffer per round; bounds the work between awaits
_IDLE_POLL_S = 1.0  # backstop: the sender re-checks the buffer even if no wake-up arrives


class KafkaSender:
    def __init__(self, core: MirrorCore) -> None:
        self.core = core
        self.config = core.config
        self._producer: AIOKafkaProducer | None = None
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._reset_requested = False
        self._failures_since_success = 0
        self._last_success = time.monotonic()
        self._last_check = 0.0
        self._backoff_s = 0.1

    def wake(self) -> None:
        """Loop-thread wake-up; the client makes it thread-safe where needed."""
        self._wakeup.set()

    def request_stop(self) -> None:
        self._stopping = True
        self._wakeup.set()

    async def run(self) -> None:
        """Send until stopped and drained. Never raises (except cancellation)."""
        core = self.core
        while True:
            try:
                if self._reset_requested:
                    await self._close_producer(abandon="delivery")
                if self._producer is None:
                    if self._stopping and not (core.buffer or core.pending):
                        return
                    if not await self._connect():
                        await self._sleep(self._backoff_s)
                        self._backoff_s = min(self._backoff_s * 2, self.config.reconnect_backoff_max_s)
                        continue
                    self._backoff_s = 0.1
                if not core.pending and not core.take(_TAKE):
                    if self._stopping:
                        await self._flush()
                        return
                    await self._check_connection()
                    await self._idle()
                    continue
                await self._send_pending()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep the sender alive whatever happens
                core.log.warning("sender", "mirror: sender error, recreating the producer: %r", exc)
                self._reset_requested = True
                await self._sleep(self._backoff_s)

    async def _send_pending(self) -> None:
        """Encode pending records into one batch per partition and hand the batches to aiokafka.

        Why batches rather than ``producer.send`` per record: send costs ~18 us of Python per
        record (metadata wait, partitioner, accumulator), a batch append ~2 us; the sender's
        CPU is taken from the same interpreter (GIL) as the service's own threads.
        """
        core, pending, topic, producer = self.core, self.core.pending, self.config.topic, self._producer
        assert producer is not None
        try:
            partitions = sorted(await producer.partitions_for(topic))
        except _PRODUCER_BROKEN as exc:
            self._broken(exc)
            return
        except Exception as exc:  # no metadata in time (broker down): the records wait in pending
            self._failed_batch(exc, 0)
            await self._sleep(self._backoff_s)
            return
        batches: dict[int, tuple] = {}  # partition -> (builder, record count)
        for _ in range(len(pending)):
            record = pending.popleft()
            try:
                key, value, timestamp_ms = encode_message(record)
            except Exception as exc:
                core.count("encode")
                core.log.warning("encode", "mirror: could not encode request %s: %r", record.request_id, exc)
                continue
            partition = partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]  # Kafka's default
            builder, count = batches.get(partition) or (producer.create_batch(), 0)
            if builder.append(key=key, value=value, timestamp=timestamp_ms) is None:  # builder full
                if count:
                    if not await self._ship(builder, partition, count):
                        pending.appendleft(record)
                        break
                    builder, count = producer.create_batch(), 0
                if builder.append(key=key, value=value, timestamp=timestamp_ms) is None:
                    core.count("encode")
                    core.log.warning("too_large", "mirror: request %s is %d bytes, more than max_batch_size; "
                                     "dropped", record.request_id, len(value))
                    continue
            batches[partition] = (builder, count + 1)
        for partition, (builder, count) in batches.items():
            if count:
                await self._ship(builder, partition, count)

    async def _ship(self, builder, partition: int, count: int) -> bool:
        """Queue one batch in the producer; its delivery callback counts the records."""
        core = self.core
        if self._producer is None or self._reset_requested:
            self._failed_batch(Abandoned("delivery"), count)
            return False
        try:
            delivery = await self._producer.send_batch(builder, self.config.topic, partition=partition)
        except _PRODUCER_BROKEN as exc:
            self._failed_batch(exc, count)
            self._broken(exc)
            return False
        except Exception as exc:  # timed out waiting for the previous batch (broker slow or down)
            self._failed_batch(exc, count)
            return True
        with core.counters.lock:
            core.counters.in_flight += count
        delivery.add_done_callback(functools.partial(self._delivered, count))
        return True

    def _delivered(self, count: int, delivery: asyncio.Future) -> None:
        core = self.core
        if delivery.cancelled():
            exc: BaseException | None = asyncio.CancelledError()
        else:
            exc = delivery.exception()
        with core.counters.lock:
            core.counters.in_flight -= count
            if exc is None:
                core.counters.published += count
        if exc is None:
            self._failures_since_success = 0
            self._last_success = time.monotonic()
            core.connected = True  # a broker took it: whatever failed before, it is reachable now
        elif isinstance(exc, Abandoned):
            core.count(exc.reason, count)
        else:
            self._failed_batch(exc, count)
            if isinstance(exc, _PRODUCER_BROKEN):
                self._broken(exc)

    def _failed_batch(self, exc: BaseException, count: int) -> None:
        """``count`` records failed delivery (0: nothing lost, the attempt failed)."""
        if count:
            self.core.count("delivery", count)
        if _unreachable(exc):
            # aiokafka retried for the whole delivery timeout, or we waited that long for metadata
            # or for room: the broker is gone even though the producer is still "started".
            self.core.connected = False
        self.core.log.warning("delivery", "mirror: delivery to %s failed: %r", self.config.topic, exc)
        self._failures_since_success += 1
        stuck_s = self.config.delivery_timeout_ms / 1000
        if self._failures_since_success >= 10 and time.monotonic() - self._last_success > stuck_s:
            self._broken(exc)

    def _broken(self, exc: BaseException) -> None:
        if not self._reset_requested:
            self.core.log.warning("reset", "mirror: producer cannot recover (%r); recreating it", exc)
        self._reset_requested = True
        self._failures_since_success = 0
        self._last_success = time.monotonic()

    async def _connect(self) -> bool:
        producer = AIOKafkaProducer(**self.config.producer_kwargs())
        try:
            await asyncio.wait_for(producer.start(), self.config.delivery_timeout_ms / 1000 + 1)
        except asyncio.CancelledError:
            await _stop_quietly(producer, None)
            raise
        except Exception as exc:
            await _stop_quietly(producer, None)
            # A late delivery callback of the previous producer may have set it True.
            self.core.connected = False
            self.core.log.warning("connect", "mirror: Kafka at %s unavailable (%r); retrying, records are "
                                  "buffered then dropped", self.config.bootstrap, exc)
            return False
        self._producer = producer
        self._reset_requested = False
        self.core.connected = True
        logger.info("mirror: connected to Kafka at %s, topic %s", self.config.bootstrap, self.config.topic)
        return True

    async def _check_connection(self) -> None:
        """While idle, at most once per idle poll: ask aiokafka's client for a connection to each
        leader of the topic's partitions; ``connected`` becomes whether it has or could open all.

        Why: with nothing to send, no send failure would ever tell that the broker left (nor that it
        came back). Cheap while connected: an open connection is reused and nothing is sent. While
        the broker is down each check is one connection attempt, bounded by the idle poll.
        """
        now = time.monotonic()
        producer = self._producer
        if producer is None or now - self._last_check < _IDLE_POLL_S:
            return
        self._last_check = now
        topic = self.config.topic
        cluster = producer.client.cluster
        partitions = cluster.partitions_for_topic(topic)
        if not partitions:  # nothing sent yet: the bootstrap in _connect is all there is to go on
            return
        leaders = {cluster.leader_for_partition(TopicPartition(topic, p)) for p in partitions}
        reachable = True
        for node in leaders:
            if node is None or node < 0:  # a partition without a leader takes no records
                reachable = False
                break
            try:
                if not await asyncio.wait_for(producer.client.ready(node), _IDLE_POLL_S):
                    reachable = False
                    break
            except Exception:  # timed out, or anything else: a check must not reset the producer
                reachable = False
                break
        self.core.connected = reachable

    async def _close_producer(self, abandon: str | None) -> None:
        producer, self._producer = self._producer, None
        self.core.connected = False
        if producer is not None:
            await _stop_quietly(producer, abandon)

    async def _flush(self) -> None:
        if self._producer is not None:
            try:
                await self._producer.flush()
            except Exception as exc:
                self.core.log.warning("flush", "mirror: flush failed: %r", exc)

    async def close(self) -> None:
        """Stop the producer after ``run`` returned or was cancelled; what it still holds is
        counted as failed{reason="shutdown"}."""
        await self._close_producer(abandon="shutdown")

    async def _idle(self) -> None:
        core = self.core
        self._wakeup.clear()
        core.sender_idle = True
        if core.buffer or self._stopping:  # appended before the flag was seen: don't sleep
            core.sender_idle = False
            return
        try:
            await asyncio.wait_for(self._wakeup.wait(), _IDLE_POLL_S)
        except TimeoutError:
            pass
        finally:
            core.sender_idle = False

    async def _sleep(self, seconds: float) -> None:
        self._wakeup.clear()
        if self._stopping:
            seconds = min(seconds, 0.2)  # closing: retry briefly until the close deadline
        try:
            await asyncio.wait_for(self._wakeup.wait(), seconds)
        except TimeoutError:
            pass


async def _stop_quietly(producer: AIOKafkaProducer, abandon: str | None) -> None:
    """Stop a producer without waiting on the broker: records it still holds fail with
    ``Abandoned(abandon)`` first (aiokafka's stop() would otherwise wait to deliver them)."""
    if abandon is not None:
        accumulator = getattr(producer, "_message_accumulator", None)  # aiokafka has no public abort
        if accumulator is not None:
            accumulator.fail_all(Abandoned(abandon))
    try:
        await asyncio.wait_for(producer.stop(), 2.0)
    except asyncio.CancelledError:
        raise
    except Exception:
        pass


async def drain_and_stop(core: MirrorCore, sender: KafkaSender, task: asyncio.Task | None, timeout_s: float) -> None:
    """Stop taking records, deliver what is buffered within ``timeout_s``, then stop the producer.

    Every record taken and not delivered by then (the broker down or slow) is lost to the shutdown:
    failed{reason="shutdown"}, whether it was still buffered here or already held by the producer.
    ``dropped`` stays what publish refused (buffer full, client closed).
    """
    with core.counters.lock:
        core.closed = True
    sender.request_stop()
    if task is not None and not task.done():
        try:
            await asyncio.wait_for(asyncio.shield(task), max(0.0, timeout_s))
        except TimeoutError:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        except Exception:
            pass
    with core.counters.lock:
        left = len(core.buffer) + len(core.pending)
        core.buffer.clear()
        core.pending.clear()
        core.counters.failed["shutdown"] += left
    if left:
        logger.warning("mirror: closed with %d records not delivered within the %.1f s deadline (Kafka at %s "
                       "unreachable or slow); counted as failed{reason=\"shutdown\"}", left, timeout_s,
                       core.config.bootstrap)
    await sender.close()
