"""Hot reload on a replay process: the registry's candidates loaded in the background and swapped
into ``ReplayCore`` between micro-batches (a double buffer).

Before each micro-batch the replay stage calls ``HotReload.prepare(spans)`` (the batch's offsets per partition):

1. catch up with the registry (``RegistryFollower.sync``); while a record is ``pending`` (its
   offsets are being recorded) wait for them — ``/readyz`` and ``shadowlens_component_up`` say so;
2. start loading, on a thread of its own, every candidate that is scored from now on and not yet
   loaded: the artifact's SHA-256 checked against the record (a mismatch, a missing file, a model
   that does not load: *refused*, with the reason in ``candidates show`` and in the metric
   ``shadowlens_candidate{state="refused"}``), loaded, warmed up with one call;
3. if the micro-batch reaches into a candidate's [start, stop) offsets and it is not loaded yet,
   wait for its load (the same on every process: the decision depends on offsets only);
4. return a new candidate table when it changed; the stage swaps it in on the core's own thread.

A retired candidate, or a superseded version, leaves the table once no micro-batch needs it; a
process that replays an old backlog loads it again for the messages before its stop offsets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from prometheus_client.core import GaugeMetricFamily

from schemas.registry import STATUS_SUFFIX, CandidateRecord, CandidateStatus
from streams import kafka_io
from streams.config import Settings
from streams.kafka_io import Health
from streams.registry.store import config_from_record, local_path, record_from_config, sha256_file
from streams.registry.follow import COMPONENT, RegistryFollower
from streams.replay.core import Candidate

log = logging.getLogger("shadowlens.registry")


class Refused(Exception):
    """A candidate version this process will not replay; the message is the one-line reason."""


class HotReload:
    def __init__(self, settings: Settings, follower: RegistryFollower, health: Health, replica: str,
                 preloaded: dict[str, list[Candidate]] | None = None):  # fmt: skip
        self.settings, self.follower, self.health, self.replica = settings, follower, health, replica
        self.loaded: dict[str, tuple[tuple, Candidate]] = {}  # model/pair -> (identity, candidate)
        for cands in (preloaded or {}).values():  # the TOML's, loaded at start-up: reused when the registry agrees
            for cand in cands:
                rec = record_from_config(cand.config)
                self.loaded[f"{rec.model}/{rec.pair}"] = (_identity(rec), cand)
        self.loads: dict[str, tuple[tuple, asyncio.Future, tuple]] = {}  # -> (identity, load, attempt)
        self.refused: dict[str, tuple[tuple, str]] = {}  # -> (attempt, reason): a reset (new start) tries again
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="candidate-load")
        self.producer = kafka_io.Producer(settings, health, COMPONENT)
        self._writes: set[asyncio.Task] = set()
        self._table: tuple | None = None
        self._waiting, self._since = False, 0.0

    async def prepare(self, spans: dict[int, tuple[int, int]]) -> dict[str, list[Candidate]] | None:
        """The candidate table for a micro-batch whose offsets are ``spans`` (partition -> first and
        last offset) when it differs from the last one, else None."""
        await self.follower.sync()
        while pending := [r for r in self.follower.by_pair().values() if r.pending]:
            self._wait(f"{pending[0].key}: waiting for its recorded offsets (a registry command is writing them; if "
                       f"it stopped half-way, run `shadowlens candidates reset --model {pending[0].model} "
                       f"--candidate {pending[0].candidate}`)")  # fmt: skip
            await asyncio.sleep(0.05)
            await self.follower.sync()
        wanted = self.follower.by_pair()
        self._settle()
        needed = []
        for key, rec in wanted.items():
            ident = _identity(rec)
            if self.refused.get(key, (None,))[0] == _attempt(rec):
                continue
            hit = _overlaps(rec, spans)
            if hit or rec.stop_offsets is None:
                self._start_load(key, rec, ident)
            if hit:
                needed.append(key)
        for key in needed:
            _, future, _ = self.loads.get(key, (None, None, None))
            while future is not None and not future.done():
                self._wait(f"candidate {key}: loading; this micro-batch reaches its start offsets")
                await asyncio.wait([future], timeout=1.0)
        self._settle()
        if self._waiting:
            self._waiting = False
            self.health.recovered(COMPONENT)
        return self._build(wanted, set(needed))

    def idle(self) -> None:
        """Between micro-batches while none arrives: finished loads settled, new candidates loading."""
        self._settle()
        for key, rec in self.follower.by_pair().items():
            ident = _identity(rec)
            if rec.stop_offsets is None and not rec.pending and self.refused.get(key, (None,))[0] != _attempt(rec):
                self._start_load(key, rec, ident)

    def _build(self, wanted: dict[str, CandidateRecord], needed: set[str]) -> dict[str, list[Candidate]] | None:
        table: dict[str, list[Candidate]] = defaultdict(list)
        signature = []
        for key, rec in wanted.items():
            table[rec.model]  # a model whose candidates all retired: its messages are no unknown model  # noqa: B018
            entry = self.loaded.get(key)
            if entry is None or entry[0] != _identity(rec):
                continue
            if rec.stop_offsets is not None and key not in needed:
                self.loaded.pop(key)  # retired and not needed by this batch: unloaded (loaded again if a backlog needs it)
                continue
            table[rec.model].append(dataclasses.replace(entry[1], start=rec.start_offsets, stop=rec.stop_offsets))
            signature.append((key, entry[0], sorted(rec.start_offsets.items()),
                              None if rec.stop_offsets is None else sorted(rec.stop_offsets.items())))  # fmt: skip
        if tuple(signature) == self._table:
            return None
        self._table = tuple(signature)
        log.info("candidate table: %s", ", ".join(k for k, *_ in signature) or "empty")
        return table

    def _wait(self, why: str) -> None:
        """Replay waits: said on /readyz and in the log once it lasts (a pending write takes milliseconds)."""
        now = time.monotonic()
        if not self._waiting:
            self._waiting, self._since = True, now
        elif now - self._since >= 1.0:
            self.health.failing(COMPONENT, why)

    def _start_load(self, key: str, rec: CandidateRecord, ident: tuple) -> None:
        if self.loaded.get(key, (None,))[0] == ident or self.loads.get(key, (None,))[0] == ident:
            return
        future = asyncio.get_running_loop().run_in_executor(self.pool, self._load, rec)
        self.loads[key] = (ident, future, _attempt(rec))
        self._status(rec, "loading")

    def _load(self, rec: CandidateRecord) -> Candidate:
        """On the loading thread: verify, load and warm up one version (raises ``Refused``)."""
        path = local_path(rec.path)
        if not path.is_file():
            raise Refused(f"{path}: no such artifact on this replay machine ({self.replica}); copy or mount it here")
        digest = sha256_file(path)
        if digest != rec.sha256:
            raise Refused(f"sha256 mismatch: {path} has {digest}, the registry says {rec.sha256}; register the file "
                          "you mean (shadowlens candidates add) and reset the candidate")  # fmt: skip
        try:
            cand = Candidate.load(config_from_record(rec), self.settings.replay.providers)
        except Exception as exc:  # noqa: BLE001 - whatever the runtime says, in one line
            raise Refused(" ".join(f"{type(exc).__name__}: {exc}".split())[:400]) from exc
        _warm_up(cand)
        return cand

    def _settle(self) -> None:
        """Loads that finished: into ``loaded``, or refused (logged, reported on the registry topic)."""
        for key, (ident, future, attempt) in list(self.loads.items()):
            if not future.done():
                continue
            del self.loads[key]
            rec = self.follower.by_pair().get(key)
            exc = future.exception()
            if exc is not None:
                reason = str(exc) if isinstance(exc, Refused) else f"{type(exc).__name__}: {exc}"
                self.refused[key] = (attempt, reason)
                log.error("candidate %s refused: %s", key, reason)
                if rec is not None:
                    self._status(rec, "refused", reason)
                continue
            self.loaded[key] = (ident, future.result())
            log.info("candidate %s loaded and warmed up", key)
            if rec is not None:
                self._status(rec, "shadowing")

    def _status(self, rec: CandidateRecord, state: str, reason: str = "") -> None:
        """What this process made of the version, on the registry topic (``candidates show``). A refusal
        another process reported for the same version is not covered over."""
        known = self.follower.statuses.get(rec.key)
        if state != "refused" and known is not None and known.version == rec.version and known.state == "refused":
            return
        status = CandidateStatus(model=rec.model, candidate=rec.candidate, version=rec.version, state=state,
                                 reason=reason, replica=self.replica)  # fmt: skip
        record = dict(topic=self.settings.kafka.candidates_topic, key=f"{rec.key}{STATUS_SUFFIX}".encode(),
                      value=status.model_dump_json().encode(), partition=0)  # fmt: skip
        task = asyncio.create_task(self.producer.send_all([record]))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    def collect(self):
        """``shadowlens_candidate{model,candidate,version,state,reason}``: 1 per version this process knows."""
        family = GaugeMetricFamily("shadowlens_candidate", "candidate versions on this replay process, by state",
                                   labels=["model", "candidate", "version", "state", "reason"])  # fmt: skip
        refused, loaded, loads = dict(self.refused), dict(self.loaded), dict(self.loads)  # the loop changes them
        for key, rec in self.follower.by_pair().items():
            ident = _identity(rec)
            if refused.get(key, (None,))[0] == _attempt(rec):
                state, reason = "refused", refused[key][1][:200]
            elif loaded.get(key, (None,))[0] == ident:
                state, reason = ("shadowing" if rec.stop_offsets is None else "retired"), ""
            elif loads.get(key, (None,))[0] == ident:
                state, reason = "loading", ""
            else:
                state, reason = rec.state, ""
            family.add_metric([rec.model, rec.candidate, str(rec.version), state, reason], 1)
        yield family

    async def stop(self) -> None:
        await asyncio.gather(*self._writes, return_exceptions=True)
        await self.producer.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)


def _identity(rec: CandidateRecord) -> tuple:
    return (rec.version, rec.replay_spec())


def _attempt(rec: CandidateRecord) -> tuple:
    """A refusal holds for the version until a reset records new start offsets."""
    return (_identity(rec), tuple(sorted(rec.start_offsets.items())))


def _overlaps(rec: CandidateRecord, spans: dict[int, tuple[int, int]]) -> bool:
    """Whether a message of these offset spans may be scored by the record (over-approximated)."""
    for p, (lo, hi) in spans.items():
        start = rec.start_offsets.get(p, 0)
        stop = None if rec.stop_offsets is None else rec.stop_offsets.get(p, 0)
        if hi >= start and (stop is None or lo < stop):
            return True
    return False


def _warm_up(cand: Candidate) -> None:
    """One call on zeros of the declared input shapes (free dimensions 1), so the first micro-batch
    does not pay the runtime's lazy initialisation. Best effort: a model it does not fit is not refused."""
    try:
        feeds = {}
        for name, meta in cand.runner.inputs.items():
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in meta.shape]
            feeds[name] = np.zeros(shape, dtype=cand.runner.input_dtypes.get(name) or np.float32)
        cand.runner.run_stacked(feeds, 1, cand.config.output, "batched")
    except Exception:  # noqa: BLE001 - warming up is an optimisation
        log.debug("warm-up of %s skipped", cand.config.name, exc_info=True)
