"""Prometheus metrics of one worker process, and the progress line an operator reads in the log.

Every worker process (replay, judge or both) serves ``/metrics`` on ``[metrics] host:port``
(prometheus_client's own HTTP server, in a thread: a scrape never touches the event loop); the
replay processes of ``worker --role replay --processes N`` on ``port + i`` (streams/replay/replicas.py).
deploy/grafana/shadowlens.json is a dashboard of these series.

Replay stage: ``shadowlens_replayed_requests_total``, ``shadowlens_dead_letters_total{reason}``,
``shadowlens_replay_batch_seconds`` (histogram), ``shadowlens_consumer_lag{partition}`` (mirror
messages not yet replayed, per partition this process owns).
Judge stage: ``shadowlens_diff_rows_written_total``, ``shadowlens_windows_closed_total``,
``shadowlens_verdict{model,candidate,verdict,state}`` (1 for the current verdict),
``shadowlens_verdict_age_seconds{model,candidate}``, ``shadowlens_open_windows``. Both:
``shadowlens_component_up{component}`` (0 while the worker waits out a Kafka or ClickHouse outage).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from schemas.dead_letter import DEAD_LETTER_ERROR_TYPES

log = logging.getLogger("shadowlens.worker")


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.replayed = Counter("shadowlens_replayed_requests", "mirrored requests replayed", registry=r)
        self.dead_letters = Counter("shadowlens_dead_letters", "dead letters sent, by reason", ["reason"], registry=r)
        for reason in DEAD_LETTER_ERROR_TYPES:  # every series exists from the start: rate() sees 0, not nothing
            self.dead_letters.labels(reason)
        self.batch_seconds = Histogram("shadowlens_replay_batch_seconds", "replay of one micro-batch (all candidates)",
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.lag = Gauge("shadowlens_consumer_lag", "mirror messages not yet replayed", ["partition"], registry=r)
        self.started_wall = time.time()
        self._dynamic: list[Callable[[], Iterator]] = []
        outer = self

        class _Dynamic(Collector):
            def collect(self):
                for fn in outer._dynamic:
                    yield from fn()

        r.register(_Dynamic())

    def add_collector(self, fn: Callable[[], Iterator]) -> None:
        """``fn`` yields metric families at scrape time (verdicts, health)."""
        self._dynamic.append(fn)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics server; returns the port (useful with 0). Raises MetricsAddressUnavailable."""
        try:
            server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise MetricsAddressUnavailable(
                f"metrics address {host}:{port} is not available ({exc.strerror or exc}): another process (a second "
                f"worker on this machine?) uses it; set [metrics] port (env SHADOWLENS_METRICS__PORT) to a free port, "
                f"0 for any, or [metrics] enabled = false; several replay processes on one box: run one "
                f"`worker --role replay --processes N` (ports port..port+N-1)") from None
        return server.server_address[1] if isinstance(server.server_address, tuple) else port


class MetricsAddressUnavailable(RuntimeError):
    pass


def health_collector(health) -> Callable[[], Iterator]:
    def collect():
        g = GaugeMetricFamily("shadowlens_component_up", "1 unless the worker is waiting out this component's outage",
                              labels=["component"])
        for component in sorted({"kafka", "clickhouse", *health.waiting}):
            g.add_metric([component], 0.0 if component in health.waiting else 1.0)
        yield g
    return collect


def judge_collector(board, core, stage) -> Callable[[], Iterator]:
    def collect():
        rows = CounterMetricFamily("shadowlens_diff_rows_written", "diff rows written to ClickHouse")
        rows.add_metric([], float(stage.rows))
        closed = CounterMetricFamily("shadowlens_windows_closed", "windows closed and written")
        closed.add_metric([], float(core.windows_closed))
        lookups = CounterMetricFamily("shadowlens_dedup_lookups", "request ids looked up in ClickHouse as possible "
                                      "producer retries (fresh traffic needs none; see streams/judge/recent_ids.py)")  # fmt: skip
        lookups.add_metric([], float(core.lookups))
        yield rows
        yield closed
        yield lookups
        verdict = GaugeMetricFamily("shadowlens_verdict", "1 for each pair's current verdict",
                                    labels=["model", "candidate", "verdict", "state"])
        age = GaugeMetricFamily("shadowlens_verdict_age_seconds", "age of each pair's verdict",
                                labels=["model", "candidate"])
        for v in board.verdicts():
            verdict.add_metric([v.model, v.candidate, v.verdict, v.state or "judged"], 1.0)
            if v.age_s is not None:
                age.add_metric([v.model, v.candidate], float(v.age_s))
        opened = GaugeMetricFamily("shadowlens_open_windows", "windows open in this judge")
        opened.add_metric([], float(sum(len(pw.open_windows) for pw in core.pairs().values())))
        yield verdict
        yield age
        yield opened
    return collect
