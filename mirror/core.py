"""The caller-side half of a mirror client: checks, sampling, the bounded buffer, counters.

Everything ``publish`` does happens here, on the caller's thread, and is cheap: sampling hash,
dtype/shape checks, one append under a lock. Encoding and Kafka I/O happen on the sender
(mirror.sender), which drains the buffer from an asyncio loop.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from mirror.config import MirrorConfig
from mirror.encoding import BufferedRecord
from mirror.errors import MirrorError
from mirror.logs import RateLimitedLog, rate_limit_kafka_logs
from mirror.metrics import Counters, MirrorStats
from mirror.sampling import Sampler
from mirror.validation import check_sample_key, check_scalars, check_tensors
from schemas.events import MAX_REQUEST_ID_CHARS


def _no_wake() -> None:
    pass


class MirrorCore:
    def __init__(self, config: MirrorConfig) -> None:
        self.config = config
        self.sampler = Sampler(config.default_sample_rate, config.sample_rates)
        self.counters = Counters()
        self.log = RateLimitedLog(config.log_interval_s)
        rate_limit_kafka_logs(config.log_interval_s)
        self.buffer: deque[BufferedRecord] = deque()
        self.pending: deque[BufferedRecord] = deque()  # taken by the sender, not yet handed to Kafka
        self.closed = False
        # Whether the broker is reachable now (not just that a producer exists); kept by the
        # sender: set on connect and delivery, cleared on close and on failures that mean the
        # broker is gone (see mirror.sender). A plain bool: stats() reads it from any thread.
        self.connected = False
        # Set by the sender when it is about to sleep; publish then calls wake() once.
        self.sender_idle = False
        self.wake: Callable[[], None] = _no_wake

    def publish(
        self,
        request_id: str,
        model: str,
        version: str,
        inputs: Mapping[str, Any] | Any,
        outputs: Mapping[str, Any] | Any,
        latency_ms: float,
        attributes: Mapping[str, str] | None = None,
        *,
        sample_key: str | None = None,
        label: int | float | None = None,
        sent_at: datetime | float | None = None,
    ) -> bool:
        """Buffer one request for mirroring; True if it was taken, False if sampled out/dropped/invalid."""
        counters = self.counters
        try:
            # The sample key is the sampling key, the Kafka key and the record's sample_key field;
            # without one (None or ""), the request id is the sampling and Kafka key.
            if sample_key is not None and (type(sample_key) is not str or not sample_key
                                           or len(sample_key) > MAX_REQUEST_ID_CHARS):
                sample_key = check_sample_key(sample_key)
            key = request_id if sample_key is None else sample_key
            if type(key) is not str:
                key = str(key)
            strict = self.config.strict
            # Lenient: sample first, so skipped calls cost only the hash. Strict (development):
            # check every call, so a bad call fails whatever the rate.
            if not strict and not self.sampler.keep(model, key):
                with counters.lock:
                    counters.sampled_out += 1
                return False
            record = self._check(request_id, model, version, inputs, outputs, latency_ms,
                                 attributes, key, label, sent_at, sample_key)
            if strict and not self.sampler.keep(model, key):
                with counters.lock:
                    counters.sampled_out += 1
                return False
        except MirrorError as exc:
            with counters.lock:
                counters.failed["invalid"] += 1
            if self.config.strict:
                raise
            self.log.warning("invalid", "mirror: publish ignored a bad call: %s", exc)
            return False
        except Exception as exc:  # a bug of ours must not reach production code
            with counters.lock:
                counters.failed["internal"] += 1
            if self.config.strict:
                raise
            self.log.warning("internal", "mirror: publish failed unexpectedly: %r", exc)
            return False

        with counters.lock:
            if self.closed or len(self.buffer) + len(self.pending) >= self.config.buffer_size:
                counters.dropped += 1
                taken = False
            else:
                self.buffer.append(record)
                counters.accepted += 1
                taken = True
        if not taken:
            self.log.warning("dropped", "mirror: %s; records are being dropped (%d so far)",
                             "client is closed" if self.closed else f"buffer full ({self.config.buffer_size})",
                             counters.dropped)
            return False
        if self.sender_idle:
            self.sender_idle = False
            try:
                self.wake()
            except Exception:  # loop already closed: the record stays buffered and is counted at close
                pass
        return True

    def _check(self, request_id, model, version, inputs, outputs, latency_ms, attributes, key, label,
               sent_at, sample_key=None) -> BufferedRecord:
        latency = check_scalars(request_id, model, version, latency_ms, label)
        signature = self.config.signatures.get(model)
        copy = self.config.copy_arrays
        ins = check_tensors("inputs", inputs, "input", (signature.inputs or None) if signature else None, copy)
        outs = check_tensors("outputs", outputs, "output", (signature.outputs or None) if signature else None, copy)
        if attributes is not None and not isinstance(attributes, Mapping):
            raise MirrorError("attributes", f"{type(attributes).__name__} is not a mapping",
                              "pass a dict of str -> str (values are converted with str())")
        if sent_at is None:
            sent = time.time()
        elif isinstance(sent_at, datetime):
            # Naive means UTC, as in schemas/ (datetime.timestamp() would take it as local time).
            sent = (sent_at if sent_at.tzinfo else sent_at.replace(tzinfo=UTC)).timestamp()
        else:
            sent = float(sent_at)
        return BufferedRecord(request_id, model, version, ins, outs, latency, attributes, key, label, sent,
                              sample_key)

    def take(self, limit: int) -> int:
        """Move up to ``limit`` buffered records to ``pending``; returns how many moved."""
        moved = 0
        buffer, pending = self.buffer, self.pending
        while moved < limit and buffer:
            pending.append(buffer.popleft())  # deque ops are thread-safe; publish only appends
            moved += 1
        return moved

    def count(self, what: str, n: int = 1) -> None:
        with self.counters.lock:
            if what in self.counters.failed:
                self.counters.failed[what] += n
            else:
                setattr(self.counters, what, getattr(self.counters, what) + n)

    def stats(self) -> MirrorStats:
        c = self.counters
        with c.lock:
            return MirrorStats(
                accepted=c.accepted,
                published=c.published,
                sampled_out=c.sampled_out,
                dropped=c.dropped,
                failed_by_reason=dict(c.failed),
                buffer_depth=len(self.buffer) + len(self.pending),
                in_flight=c.in_flight,
                connected=self.connected,
            )
