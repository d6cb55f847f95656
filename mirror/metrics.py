"""Counters of a mirror client, readable in code and exportable to Prometheus.

Counters are plain ints updated under the client's lock (a few hundred ns), not
prometheus_client metrics: those would add their own lock per update on the caller's path.
A collector reads them at scrape time instead.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily

FAILURE_REASONS = ("invalid", "encode", "delivery", "shutdown", "internal")


@dataclass(frozen=True)
class MirrorStats:
    """A snapshot of a client's counters.

    accepted: records taken into the buffer by ``publish``.
    published: records the broker acknowledged (acks=all).
    sampled_out: calls skipped by sampling.
    dropped: records ``publish`` refused: buffer full, or the client already closed.
    failed: records lost to an error, by reason: invalid (bad call, lenient mode), encode,
        delivery (broker timeout/error), shutdown (taken but not delivered by the close deadline:
        still buffered, or held by the producer, e.g. with the broker down), internal.
    buffer_depth: records buffered now, not yet handed to the Kafka producer.
    in_flight: records handed to the producer and not yet acknowledged or failed.
    """

    accepted: int = 0
    published: int = 0
    sampled_out: int = 0
    dropped: int = 0
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    buffer_depth: int = 0
    in_flight: int = 0
    connected: bool = False

    @property
    def failed(self) -> int:
        return sum(self.failed_by_reason.values())


class Counters:
    """Mutable counters; callers hold ``lock`` while updating (see MirrorCore)."""

    __slots__ = ("accepted", "published", "sampled_out", "dropped", "failed", "in_flight", "lock")

    def __init__(self) -> None:
        self.accepted = 0
        self.published = 0
        self.sampled_out = 0
        self.dropped = 0
        self.failed = dict.fromkeys(FAILURE_REASONS, 0)
        self.in_flight = 0
        self.lock = threading.Lock()


_PREFIX = "shadowlens_mirror_"


class _RegistryCollector:
    """One per registry; reports every live client registered with it, labelled by client name."""

    def __init__(self) -> None:
        self._sources: dict[str, Callable[[], MirrorStats]] = {}
        self._refs: dict[str, weakref.ref] = {}

    def add(self, name: str, owner: object, stats: Callable[[], MirrorStats]) -> str:
        base, n = name, 1
        while name in self._refs and self._refs[name]() is not None:  # two live clients, one name
            n += 1
            name = f"{base}-{n}"
        self._sources[name] = stats
        self._refs[name] = weakref.ref(owner)
        return name

    def describe(self) -> Iterator:
        return iter(())  # names are fixed; skip the registry's duplicate check against a live read

    def collect(self) -> Iterator:
        counters = {name: CounterMetricFamily(_PREFIX + name, help_, labels=["client"])
                    for name, help_ in (("accepted", "records taken into the buffer"),
                                        ("published", "records acknowledged by the broker"),
                                        ("sampled_out", "publish calls skipped by sampling"),
                                        ("dropped", "records refused by publish: buffer full or client closed"))}
        failed = CounterMetricFamily(_PREFIX + "failed", "records lost to an error", labels=["client", "reason"])
        depth = GaugeMetricFamily(_PREFIX + "buffer_depth", "records buffered, not yet sent", labels=["client"])
        in_flight = GaugeMetricFamily(_PREFIX + "in_flight", "records sent, not yet acknowledged", labels=["client"])
        connected = GaugeMetricFamily(_PREFIX + "connected", "1 while a Kafka producer is up", labels=["client"])
        for name in list(self._sources):
            if self._refs[name]() is None:
                del self._sources[name], self._refs[name]
                continue
            s = self._sources[name]()
            counters["accepted"].add_metric([name], s.accepted)
            counters["published"].add_metric([name], s.published)
            counters["sampled_out"].add_metric([name], s.sampled_out)
            counters["dropped"].add_metric([name], s.dropped)
            for reason, count in s.failed_by_reason.items():
                failed.add_metric([name, reason], count)
            depth.add_metric([name], s.buffer_depth)
            in_flight.add_metric([name], s.in_flight)
            connected.add_metric([name], 1.0 if s.connected else 0.0)
        yield from counters.values()
        yield from (failed, depth, in_flight, connected)


_collectors: "weakref.WeakKeyDictionary[CollectorRegistry, _RegistryCollector]" = weakref.WeakKeyDictionary()
_collectors_lock = threading.Lock()


def register_client(registry: CollectorRegistry, name: str, owner: object,
                    stats: Callable[[], MirrorStats]) -> str:
    """Export ``stats()`` under ``client=name`` in ``registry``; returns the label used (made unique)."""
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = _collectors[registry] = _RegistryCollector()
            registry.register(collector)
        return collector.add(name, owner, stats)
