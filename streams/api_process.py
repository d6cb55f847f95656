"""The worker's verdicts API in a process of its own.

Why a process and not a thread: the API thread of the worker shared its GIL, and the worker holds
the GIL in long C calls (decoding a micro-batch, serialising pair state), so a poll could wait tens
of milliseconds (bench/bench_api.py: p99 54 ms at 1,000 polls/s on 2 cores; a separate process:
under 10 ms). The child serves the same app (streams/api.py) from a board of its own:

- the judge's board forwards every verdict and newly scored pair over a pipe (``BoardFeed``);
- the worker sends its health every second; ``/readyz`` answers 503 with the worker's reasons, or
  when no report arrived for ``STALE_HEALTH_S`` (the worker hangs or died);
- ``/v1/windows`` is asked of the worker over a second pipe (with chDB only the worker may read the
  data path); the worker answers from a thread, so the query never runs on its event loop.

The child gets the socket the worker bound, so a port in use is still the worker's startup error.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import socket
import threading
import time
from typing import Any

from schemas import Verdict

log = logging.getLogger("shadowlens.api")
STALE_HEALTH_S = 5.0


class ApiProcess:
    """Started by the worker's judge role; ``feed`` and ``report`` are called from the worker."""

    def __init__(self, settings, board, sink, sock: socket.socket):
        ctx = multiprocessing.get_context("spawn")  # never fork a process with Kafka and chDB threads
        child_updates, self._updates = ctx.Pipe(duplex=False)  # (receiving end, sending end)
        self._queries, child_queries = ctx.Pipe()
        self.process = ctx.Process(target=_child, args=(settings.model_dump(mode="json", by_alias=True), sock, child_updates,
                                                        child_queries), name="verdicts-api", daemon=True)  # fmt: skip
        self.sink = sink
        self._send_lock = threading.Lock()
        self._answerer = threading.Thread(target=self._answer_queries, name="api-queries", daemon=True)
        board.subscribe(self._send)
        self._sock = sock

    def start(self) -> None:
        self.process.start()
        self._sock.close()  # the child holds its own copy
        self._answerer.start()

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def report(self, health) -> None:
        self._send(("health", health.ready, health.reasons()))

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            try:
                self._updates.send(message)
            except (BrokenPipeError, OSError):  # the child is gone; the worker's check says so
                pass

    def _answer_queries(self) -> None:
        while True:
            try:
                request_id, kind, args = self._queries.recv()
            except (EOFError, OSError):
                return
            try:
                if kind == "windows":
                    answer: Any = self.sink.windows(*args[:2], limit=args[2])
                else:  # "sql": an analyst's read-only query (the API checked the token)
                    answer = self.sink.readonly_query(args[0])
            except Exception as exc:  # noqa: BLE001 - the API answers with it
                answer = QueryRefused(str(exc)) if kind == "sql" else RuntimeError(f"clickhouse: {exc}")
            try:
                self._queries.send((request_id, answer))
            except (BrokenPipeError, OSError):
                return


class QueryRefused(ValueError):
    """ClickHouse refused an analyst's query (bad SQL, not read-only, over a limit): a 400."""


class _WorkerState:
    """The child's view of the worker: health reports and window queries."""

    def __init__(self, queries):
        self.ready_flag, self.reasons_list, self.reported = False, ["the worker has not reported yet"], 0.0
        self._queries, self._lock, self._ids = queries, threading.Lock(), itertools.count()

    @property
    def ready(self) -> bool:
        return self.ready_flag and time.monotonic() - self.reported < STALE_HEALTH_S

    def reasons(self) -> list[str]:
        if time.monotonic() - self.reported >= STALE_HEALTH_S:
            return [f"worker: no health report for {STALE_HEALTH_S:g} s (hung or stopped); check its log"]
        return self.reasons_list

    def windows(self, model: str, candidate: str, limit: int) -> list[dict]:
        return self._ask("windows", (model, candidate, limit))

    def readonly_query(self, sql: str) -> dict:
        return self._ask("sql", (sql,))

    def _ask(self, kind: str, args: tuple) -> Any:
        with self._lock:  # one query at a time: windows and SQL are read by people, not polled by gates
            request_id = next(self._ids)
            self._queries.send((request_id, kind, args))
            while True:
                got_id, answer = self._queries.recv()
                if got_id == request_id:
                    break
        if isinstance(answer, Exception):
            raise answer
        return answer


def _child(settings_json: dict, sock: socket.socket, updates, queries) -> None:
    import uvicorn

    from streams.api import create_app
    from streams.board import VerdictBoard
    from streams.config import Settings

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.model_validate(settings_json)
    board = VerdictBoard.from_settings(settings)
    worker = _WorkerState(queries)

    def follow() -> None:
        while True:
            try:
                kind, *payload = updates.recv()
            except (EOFError, OSError):  # the worker is gone: readyz turns 503, verdicts turn stale
                return
            if kind == "publish":
                board.publish([Verdict.model_validate_json(raw) for raw in payload[0]])
            elif kind == "scoring":
                board.mark_scoring(payload[0])
            elif kind == "health":
                worker.ready_flag, worker.reasons_list, worker.reported = payload[0], payload[1], time.monotonic()

    threading.Thread(target=follow, name="board-feed", daemon=True).start()
    app = create_app(board, sink=worker, health=worker, tokens=settings.api.tokens)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
