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
from typing import Literal

from streams.config import Settings
from streams.kafka_io import Health, ensure_topics, until_done

log = logging.getLogger("shadowlens.worker")
Role = Literal["all", "replay", "judge"]


async def run_worker_async(settings: Settings, role: Role = "all") -> None:
    health = Health.for_settings(settings)
    sock = None
    if role in ("judge", "all") and settings.api.enabled:
        from streams.api import bind

        sock = bind(settings.api.host, settings.api.port)  # before anything: a port in use is a startup error
    partitions = await until_done("kafka", health, lambda: ensure_topics(settings))
    tasks: list[asyncio.Task] = []
    sink = None
    if role in ("replay", "all"):
        from streams.replay import ReplayCore
        from streams.stages import ReplayStage

        replay = ReplayStage(settings, ReplayCore(settings), health, partitions)
        tasks.append(asyncio.create_task(replay.run(), name="replay"))
    api = None
    if role in ("judge", "all"):
        from streams.judge import JudgeCore
        from streams.sink import ClickHouseSink, DataPathInUse
        from streams.stages import JudgeStage

        ch = settings.clickhouse
        sink = await until_done("clickhouse", health, lambda: asyncio.to_thread(
            ClickHouseSink, ch.dsn, ch.database, ch.retention_days), give_up=(DataPathInUse,))  # fmt: skip
        core = JudgeCore(settings, sink)
        # The last verdicts survive a restart, with their true age (stale if the pause was long).
        await until_done("clickhouse", health, lambda: asyncio.to_thread(core.board.load, sink))
        judge = JudgeStage(settings, core, health)
        tasks.append(asyncio.create_task(judge.run(), name="judge"))
        if sock is not None:
            from streams.api_process import ApiProcess

            api = ApiProcess(settings, core.board, sink, sock)
            api.start()
            tasks.append(asyncio.create_task(_watch_api(api, health), name="api"))
    log.info("worker started: role %s, mirror topic %s, diffs topic %s, %d candidate(s)%s", role,
             settings.kafka.topic, settings.kafka.diffs_topic, len(settings.candidates),
             f", API on {settings.api.host}:{settings.api.port}{' (token required)' if settings.api.tokens else ''}"
             if api is not None else "")  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
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
        if api is not None:
            api.stop()
        if sink is not None:
            sink.close()
        log.info("worker stopped")


async def _watch_api(api, health: Health) -> None:
    """Report health to the API process each second; its death stops the worker (loudly), so a
    supervisor restarts both instead of gates polling a dead port."""
    while True:
        if not api.alive:
            raise RuntimeError(f"the verdicts API process exited (code {api.process.exitcode}); see its log above")
        api.report(health)
        await asyncio.sleep(1.0)


def run_worker(settings: Settings, role: Role = "all", loglevel: str = "info") -> None:
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # aiokafka logs every failed connection attempt at ERROR; the worker reports an outage itself,
    # once, naming the cause and the fix (Health.failing), and /readyz says it while it lasts.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    asyncio.run(run_worker_async(settings, role))
