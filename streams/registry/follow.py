"""Following the candidate registry inside a worker: every replay and judge process reads the
registry topic from its beginning, in the background, and keeps the last record per key.

``RegistryFollower.sync()`` returns once everything written to the topic before the call has been
read: the replay stage calls it before each micro-batch (one ListOffsets round trip when nothing
changed), which is what makes the start and stop offsets of streams/registry/store.py exact on every
process. The judge's side is ``JudgeRegistry``: candidates and policy changes into ``JudgeCore``'s
configs, a retired candidate's verdict made final. The replay side is streams/registry/reload.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.registry import CandidateRecord
from streams.config import ConfigError, Settings
from streams.kafka_io import Health, until_done
from streams.registry.store import apply, config_from_record, decode

log = logging.getLogger("shadowlens.registry")
COMPONENT = "candidate registry"

JOURNAL_MAX = 10_000  # registry records kept for the history table between two judge looks


class RegistryFollower:
    def __init__(self, settings: Settings, health: Health):
        self.settings, self.health = settings, health
        self.specs: dict[str, CandidateRecord] = {}
        self.statuses: dict = {}
        # Every record read, in order (the latest per key is in specs / statuses): what the registry's
        # history in ClickHouse is written from, so a record superseded before the judge looked (an
        # add and a retire in quick succession) is not lost from it. Bounded: replay processes never read it.
        self.journal: deque = deque(maxlen=JOURNAL_MAX)
        self.position = 0
        self._moved = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.tp = TopicPartition(settings.kafka.candidates_topic, 0)

    async def start(self) -> None:
        """Start following and read what the topic holds now."""
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka.bootstrap, enable_auto_commit=False,
                                         request_timeout_ms=15000)  # fmt: skip
        await until_done(COMPONENT, self.health, self.consumer.start)
        # The topic's end offset comes from a client of its own: on the following consumer's
        # connection it would queue behind the fetch that long-polls the broker (fetch_max_wait_ms,
        # 500 ms), and every micro-batch would wait that long for it.
        self.offsets = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka.bootstrap, enable_auto_commit=False,
                                        request_timeout_ms=15000)  # fmt: skip
        await until_done(COMPONENT, self.health, self.offsets.start)
        self.consumer.assign([self.tp])
        await self.consumer.seek_to_beginning(self.tp)
        self._task = asyncio.create_task(self._follow(), name="registry")
        await self.sync()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for client in (getattr(self, "consumer", None), getattr(self, "offsets", None)):
            if client is not None:
                await client.stop()

    async def _follow(self) -> None:
        while True:
            try:
                fetched = await self.consumer.getmany(self.tp, timeout_ms=200)
                for m in fetched.get(self.tp, []):
                    item = decode(m.key, m.value)
                    apply(self.specs, self.statuses, item)
                    if item is not None and item[1] is not None:
                        self.journal.append(item[1])
                self.position = await self.consumer.position(self.tp)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the broker away: sync() waits, /readyz says so
                self.health.failing(COMPONENT, exc)
                await asyncio.sleep(1.0)
                continue
            self._moved.set()

    async def sync(self) -> None:
        """Until every record written before this call has been read."""
        ends = await until_done(COMPONENT, self.health, lambda: self.offsets.end_offsets([self.tp]))
        while self.position < ends[self.tp]:
            if self._task is not None and self._task.done():
                raise RuntimeError("the registry follower stopped") from self._task.exception()
            self._moved.clear()
            try:
                await asyncio.wait_for(self._moved.wait(), 1.0)
            except TimeoutError:
                pass

    def by_pair(self) -> dict[str, CandidateRecord]:
        """Every version's record by ``model/pair`` (the current one and the superseded ones; while a
        version change is written, the newest write of a pair wins)."""
        out: dict[str, CandidateRecord] = {}
        for rec in list(self.specs.values()):  # a copy: the metrics thread reads it too
            key = f"{rec.model}/{rec.pair}"
            if key not in out or rec.updated_at >= out[key].updated_at:
                out[key] = rec
        return out


class JudgeRegistry:
    """The judge's view of the registry: each pair's config (kind, policy, noise reference) from its
    record; a retired pair's verdict made final once (streams/judge/retire.py's retirement row); the
    promoted / rolled_back states and the registry's history in ClickHouse (streams/registry/events.py)."""

    def __init__(self, follower: RegistryFollower, core, sink):
        from streams.registry.events import CandidateEvents, VerdictStates

        self.follower, self.core, self.sink = follower, core, sink
        self.seen: dict[str, tuple] = {}
        self.verdict_states = VerdictStates(follower.settings, follower)
        self.events = CandidateEvents(follower, sink)

    async def refresh(self, sync: bool = False) -> None:
        if sync:
            await self.follower.sync()
        for key, rec in self.follower.by_pair().items():
            ident = (rec.version, rec.replay_spec(), rec.policy_version, rec.state, rec.stop_offsets is None)
            if self.seen.get(key) == ident:
                continue
            self.seen[key] = ident
            try:
                self.core.configs[key] = config_from_record(rec, need_file=False)
            except ConfigError as exc:
                log.error("registry: %s", exc)
                continue
            log.info("registry: %s version %d, policy version %d, %s", key, rec.version, rec.policy_version, rec.state)
            if rec.state == "retired" and rec.stop_offsets is not None:
                self._final(rec)
        # The verdicts published since the last refresh (JudgeCore.close_due runs right after it).
        self.verdict_states.update(self.core.board)
        self.events.update()

    def _final(self, rec: CandidateRecord) -> None:
        from streams.judge.retire import NothingToRetire, retire_pair

        key = f"{rec.model}/{rec.pair}"
        if key in self.core.final:
            return
        self.core.final.add(key)
        latest = self.sink.latest_verdict(rec.model, rec.pair)
        if latest is None or latest.state == "retired":
            return
        try:
            retire_pair(self.sink, rec.model, rec.pair, f"retired in the registry: {rec.reason}",
                        rec.updated_by or "registry", board=self.core.board)  # fmt: skip
        except NothingToRetire:
            pass
