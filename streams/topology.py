"""The worker's topology, in one place.

    mirror topic ──(replay stage: any number of processes, consumer group <group_id>)──┐
        decode → adapter → one stacked onnxruntime call per candidate → columnar paired diffs
        │                                                                                │
        └─▶ dead-letter topic (reason, bounded payload)        diffs topic (key = model/candidate)
                                                                   │  + progress records
                         (judge stage: consumer group <group_id>-judge; a pair on one judge)
        dedup → ClickHouse request_diffs → pair state (changelog topic) → windows on the minimum
        watermark over all mirror partitions → window_stats + verdicts → verdicts API

Roles (``shadowlens worker --role``): ``replay`` needs Kafka and the model files only (GPU boxes
without database access); ``judge`` needs Kafka and ClickHouse, and serves the API when
``[api] enabled``; ``all`` (default) runs both in one process, the embedded experience. With a
``chdb://`` DSN exactly one judge process holds the data path; with ``http://`` judges scale with
the diffs topic's partitions and ``shadowlens api`` runs anywhere.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Literal

from streams.config import Settings
from streams.doctor.checks import startup_checks
from streams.heap import tune_collector
from streams.kafka_io import Health, ensure_topics, until_done
from streams.metrics import WorkerMetrics, health_collector, judge_collector

log = logging.getLogger("shadowlens.worker")
Role = Literal["all", "replay", "judge"]


async def run_worker_async(settings: Settings, role: Role = "all") -> None:
    tasks: list[asyncio.Task] = []
    try:
        await _run(settings, role, tasks)
    finally:
        # Stopped while starting (a signal, an error): the stage tasks already running close their
        # consumers and producers here. Left to asyncio.run, they would be cancelled together with
        # aiokafka's own tasks, and closing a client then fails half-way ("Unclosed AIOKafka...").
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _run(settings: Settings, role: Role, tasks: list[asyncio.Task]) -> None:
    health = Health.for_settings(settings)
    # SIGTERM / SIGINT while starting (waiting for the broker or the database) stop the start-up
    # where it is: the stages' consumers and producers close (run_worker_async cancels their tasks).
    stop, starting, main = asyncio.Event(), asyncio.Event(), asyncio.current_task()
    starting.set()

    def on_signal() -> None:
        stop.set()
        if starting.is_set():
            main.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, on_signal)
    sock = None
    if role in ("judge", "all") and settings.api.enabled:
        from streams.api.app import bind
        from streams.config import ConfigError

        if (problem := settings.api.exposure_problem()) is not None:  # before listening: verdicts to anyone
            raise ConfigError(problem)
        sock = bind(settings.api.host, settings.api.port)  # before anything: a port in use is a startup error
    metrics = WorkerMetrics()
    metrics.add_collector(health_collector(health))
    metrics_port = None
    if settings.metrics.enabled:
        metrics_port = metrics.serve(settings.metrics.host, settings.metrics.port)
    # Before a topic, a consumer or a database exists: a model that does not load, an output it
    # lacks, a chDB path another process holds are one line and exit 2, not a traceback later.
    loaded = startup_checks(settings, role)
    partitions = await until_done("kafka", health, lambda: ensure_topics(settings))
    # The candidate registry (streams/registry/store.py): the TOML seeds it on the first start; every
    # process follows it from its beginning, in the background.
    from streams.registry.store import seed
    from streams.registry.follow import JudgeRegistry, RegistryFollower

    await until_done("kafka", health, lambda: seed(settings))
    follower = RegistryFollower(settings, health)
    tasks.append(asyncio.create_task(_closing(follower), name="registry"))  # closed however the worker stops
    await follower.start()
    sink = replay = judge = None
    if role in ("replay", "all"):
        from streams.registry.reload import HotReload
        from streams.replay.core import ReplayCore
        from streams.replay.stage import ReplayStage

        replay = ReplayStage(settings, ReplayCore(settings, loaded), health, partitions)
        replay.reload = HotReload(settings, follower, health, replay.replica, loaded)
        metrics.add_collector(replay.reload.collect)
        replay.metrics = metrics
        tasks.append(asyncio.create_task(replay.run(), name="replay"))
    api = refresher = None
    if role in ("judge", "all"):
        from streams.judge.core import JudgeCore
        from streams.sink import ClickHouseSink, DataPathInUse
        from streams.judge.stage import JudgeStage

        ch = settings.clickhouse
        sink = await until_done("clickhouse", health, lambda: asyncio.to_thread(
            ClickHouseSink, ch.dsn, ch.database, ch.retention_days, analyst_rows_per_s=settings.api.analyst_rows_per_s),
            give_up=(DataPathInUse,))  # fmt: skip
        core = JudgeCore(settings, sink)
        # The last verdicts survive a restart, with their true age (a stale promote is a hold; a rollback stands).
        await until_done("clickhouse", health, lambda: asyncio.to_thread(core.board.load, sink))
        judge = JudgeStage(settings, core, health)
        judge.registry = JudgeRegistry(follower, core, sink)
        await until_done("clickhouse", health, judge.registry.refresh)
        metrics.add_collector(judge_collector(core.board, core, judge))
        tasks.append(asyncio.create_task(judge.run(), name="judge"))
        if sock is not None:
            from streams.api.process import ApiProcess

            api = ApiProcess(settings, core.board, sink, sock)
            api.start()
            write_api_sidecar(settings)
            tasks.append(asyncio.create_task(_watch_api(api, health), name="api"))
            if not sink.dsn.startswith("chdb:"):
                # A shared ClickHouse: serve what others write too (an operator's retirement, other
                # judges' pairs), read off the event loop; with chDB nobody else can write.
                from streams.api.board import BoardRefresher

                refresher = BoardRefresher(core.board, sink, settings.api.refresh_s, recent_only=True)
                refresher.start()
    tune_collector()  # models, sessions and imports are loaded: keep full collections off them
    _startup_summary(settings, role, api is not None, metrics_port)
    tasks.append(asyncio.create_task(_progress(settings, metrics, replay if role != "judge" else None,
                                               judge if role != "replay" else None), name="progress"))
    starting.clear()
    stopper = asyncio.create_task(stop.wait(), name="stop")
    try:
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopper and task.exception() is not None:
                raise task.exception()
    finally:
        # Cancelling is safe at any point: nothing is committed that is not durably handled.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if refresher is not None:
            refresher.stop()
        if api is not None:
            api.stop()
            write_api_sidecar(settings, remove=True)
        if replay is not None:
            await replay.reload.stop()
        if sink is not None:
            sink.close()
        log.info("worker stopped")


async def _closing(follower) -> None:
    """Holds the registry follower until cancelled, then closes it (also when stopped while starting)."""
    try:
        await asyncio.Event().wait()
    finally:
        await follower.stop()


def _startup_summary(settings: Settings, role: str, api: bool, metrics_port: int | None) -> None:
    k, ch = settings.kafka, settings.clickhouse
    log.info("worker started: role %s; Kafka %s, mirror topic %s, dead letters %s, diffs topic %s", role,
             k.bootstrap, k.topic, k.dead_letter_topic, k.diffs_topic)  # fmt: skip
    for c in settings.candidates:
        log.info("  candidate %s/%s: %s (output %s vs baseline %s)%s", c.model, c.name, c.path, c.output,
                 c.baseline_output, " [noise reference]" if c.noise_reference else "")  # fmt: skip
    if role != "replay":
        log.info("  database %s (database %r), windows of %g s", ch.dsn.split("@")[-1], ch.database,
                 settings.windows.size_s)  # fmt: skip
    if api:
        log.info("  verdicts API on http://%s:%d%s", settings.api.host, settings.api.port,
                 " (bearer token required)" if settings.api.tokens else "")  # fmt: skip
    if metrics_port is not None:
        log.info("  Prometheus metrics on http://%s:%d/metrics", settings.metrics.host, metrics_port)


async def _progress(settings: Settings, metrics: WorkerMetrics, replay, judge) -> None:
    """A progress line every [metrics] progress_s; a warning when the mirror topic stays silent."""
    every, silent_warn = settings.metrics.progress_s, settings.metrics.no_traffic_warn_s
    last_replayed, last_t, warned = 0, time.monotonic(), False
    while True:
        await asyncio.sleep(every)
        now, parts = time.monotonic(), []
        if replay is not None:
            rate = (replay.replayed - last_replayed) / max(now - last_t, 1e-9)
            last_replayed = replay.replayed
            lag = {s.labels["partition"]: int(s.value) for fam in metrics.lag.collect() for s in fam.samples}
            lag_text = ", ".join(f"p{p}={v}" for p, v in sorted(lag.items(), key=lambda kv: int(kv[0]))) or "-"
            parts.append(f"replayed {replay.replayed} ({rate:.0f}/s), lag {lag_text}, "
                         f"dead letters {replay.dead_letters}")
            quiet = time.time() - (replay.last_message_wall or metrics.started_wall)
            if quiet >= silent_warn and not warned:
                warned = True
                log.warning("nothing has arrived on mirror topic %r for %.0f s: are the producers publishing to it? "
                            "(the mirror's topic setting / `mirror backfill --topic` must match [kafka] topic here)",
                            settings.kafka.topic, quiet)  # fmt: skip
            elif quiet < silent_warn:
                warned = False
        if judge is not None:
            open_windows = sum(len(pw.open_windows) for pw in judge.core.pairs().values())
            verdicts = ", ".join(f"{v.candidate}={v.verdict}" for v in judge.core.board.verdicts()) or "none yet"
            parts.append(f"{judge.rows} diff rows written ({judge.core.lookups} ids looked up as possible retries), "
                         f"{open_windows} open windows, verdicts {verdicts}")
        last_t = now
        log.info("progress: %s", "; ".join(parts))


def write_api_sidecar(settings: Settings, remove: bool = False) -> None:
    """With chDB the process serving the API (a worker, or a standalone ``shadowlens api``) alone
    can open the data path; ``<path>.api.json`` tells ``shadowlens query`` and ``shadowlens verdicts
    retire`` where to send their requests instead (POST /v1/query, POST .../retire)."""
    import json
    import os

    from streams.sink import chdb_path, resolve_dsn

    path = chdb_path(resolve_dsn(settings.clickhouse.dsn))
    if path is None:
        return
    sidecar = f"{path.rstrip('/')}.api.json"
    try:
        if remove:
            os.remove(sidecar)
        else:
            host = "127.0.0.1" if settings.api.host in ("0.0.0.0", "::") else settings.api.host
            with open(sidecar, "w") as f:
                json.dump({"url": f"http://{host}:{settings.api.port}", "pid": os.getpid()}, f)
    except OSError:
        pass  # a convenience: query then says to pass --api


async def _watch_api(api, health: Health) -> None:
    """Report health to the API process each second; its death stops the worker (loudly), so a
    supervisor restarts both instead of gates polling a dead port."""
    while True:
        if not api.alive:
            raise RuntimeError(f"the verdicts API process exited (code {api.process.exitcode}); see its log above")
        api.report(health)
        await asyncio.sleep(1.0)


def run_worker(settings: Settings, role: Role = "all", loglevel: str = "info", replica: str | None = None) -> None:
    """``replica``: 'i/N' for one of the replay processes of ``worker --processes N`` (each line says which)."""
    where = f" [replay {replica}]" if replica else ""
    logging.basicConfig(level=loglevel.upper(), format=f"%(asctime)s %(levelname)s{where} %(name)s: %(message)s")

    # aiokafka logs every failed connection attempt at ERROR, and urllib3 (under clickhouse-connect)
    # each retry at WARNING; the worker reports an outage itself, once, naming the cause and the
    # fix (Health.failing), then a reminder a minute, and /readyz says it while it lasts.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    try:
        asyncio.run(run_worker_async(settings, role))
    except asyncio.CancelledError:  # stopped by a signal while starting: nothing was committed
        log.info("worker stopped while starting")
