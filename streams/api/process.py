"""The worker's verdicts API in a process of its own.

Why a process and not a thread: the API thread of the worker shared its GIL, and the worker holds
the GIL in long C calls (decoding a micro-batch, serialising pair state), so a poll could wait tens
of milliseconds (bench/bench_api.py: p99 54 ms at 1,000 polls/s on 2 cores; a separate process:
under 10 ms). The child serves the same app (streams/api/app.py) from a board of its own:

- the judge's board forwards every verdict and newly scored pair over a pipe (``BoardFeed``);
- the worker sends its health every second; ``/readyz`` answers 503 with the worker's reasons, or
  when no report arrived for ``STALE_HEALTH_S`` (the worker hangs or died);
- ``/v1/windows``, ``/v1/query`` and retirements are asked of the worker over a second pipe (with
  chDB only the worker may open the data path). The pipe multiplexes: each request carries an id,
  the worker answers each in a thread of a small pool (never on its event loop), and the child
  routes each answer to the caller waiting for that id. Locks guard only a send or a receive, never
  a round trip, so a ten-second analyst query does not make /v1/windows wait behind it.

The child gets the socket the worker bound, so a port in use is still the worker's startup error.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from schemas import Verdict
from streams.api.app import Unavailable

log = logging.getLogger("shadowlens.api")
STALE_HEALTH_S = 5.0
# Worker threads answering the API's requests: people's queries, not gates' polls; bounded so a
# burst of analyst SQL cannot take the worker's CPU from replay and judging.
QUERY_THREADS = 4
# Longer than any query may run (analyst SQL stops at 10 s): past it the worker is hung or gone.
ANSWER_TIMEOUT_S = 60.0


class ApiProcess:
    """Started by the worker's judge role; ``feed`` and ``report`` are called from the worker."""

    def __init__(self, settings, board, sink, sock: socket.socket):
        ctx = multiprocessing.get_context("spawn")  # never fork a process with Kafka and chDB threads
        child_updates, self._updates = ctx.Pipe(duplex=False)  # (receiving end, sending end)
        self._queries, child_queries = ctx.Pipe()
        self.process = ctx.Process(target=_child, args=(settings.model_dump(mode="json", by_alias=True), sock, child_updates,
                                                        child_queries), name="verdicts-api", daemon=True)  # fmt: skip
        self.sink, self.board = sink, board
        self._send_lock, self._answer_lock = threading.Lock(), threading.Lock()
        self._pool = ThreadPoolExecutor(QUERY_THREADS, thread_name_prefix="api-query")
        self._receiver = threading.Thread(target=self._receive_queries, name="api-queries", daemon=True)
        board.subscribe(self._send)
        self._sock = sock

    def start(self) -> None:
        self.process.start()
        self._sock.close()  # the child holds its own copy
        self._receiver.start()

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def report(self, health) -> None:
        self._send(("health", health.ready, health.reasons()))

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            try:
                self._updates.send(message)
            except (BrokenPipeError, OSError):  # the child is gone; the worker's check says so
                pass

    def _receive_queries(self) -> None:
        while True:
            try:
                request_id, kind, args = self._queries.recv()
            except (EOFError, OSError):
                return
            try:
                self._pool.submit(self._answer, request_id, kind, args)
            except RuntimeError:  # the pool is shut down: the worker is stopping
                return

    def _answer(self, request_id: int, kind: str, args: tuple) -> None:
        from streams.judge.retire import NothingToRetire, retire_pair

        try:
            if kind == "windows":
                answer: Any = self.sink.windows(*args[:2], limit=args[2])
            elif kind == "retire":  # written, then published: the child's board and this one's
                answer = retire_pair(self.sink, *args, board=self.board).model_dump_json()
            else:  # "sql": an analyst's read-only query (the API checked the token)
                answer = self.sink.readonly_query(args[0])
        except NothingToRetire as exc:
            answer = exc
        except Exception as exc:  # noqa: BLE001 - the API answers with it
            answer = QueryRefused(str(exc)) if kind == "sql" else Unavailable(f"clickhouse: {exc}")
        with self._answer_lock:
            try:
                self._queries.send((request_id, answer))
            except (BrokenPipeError, OSError):  # the child is gone; the worker's check says so
                pass


class QueryRefused(ValueError):
    """ClickHouse refused an analyst's query (bad SQL, not read-only, over a limit): a 400."""


class _WorkerState:
    """The child's view of the worker: health reports, and requests over the multiplexed pipe."""

    def __init__(self, queries):
        self.ready_flag, self.reasons_list, self.reported = False, ["the worker has not reported yet"], 0.0
        self._queries, self._ids = queries, itertools.count()
        self._send_lock, self._waiting_lock = threading.Lock(), threading.Lock()  # never held across a round trip
        self._waiting: dict[int, _Answer] = {}
        self._gone: str | None = None  # why nothing can be asked any more
        threading.Thread(target=self._route_answers, name="api-answers", daemon=True).start()

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

    def retire(self, model: str, candidate: str, reason: str, by: str) -> Verdict:
        return Verdict.model_validate_json(self._ask("retire", (model, candidate, reason, by)))

    def _ask(self, kind: str, args: tuple) -> Any:
        answer = _Answer()
        with self._waiting_lock:  # registered before it is sent: the answer may come back at once
            if self._gone is not None:
                raise Unavailable(self._gone)
            request_id = next(self._ids)
            self._waiting[request_id] = answer
        try:
            with self._send_lock:
                self._queries.send((request_id, kind, args))
        except (BrokenPipeError, OSError):
            with self._waiting_lock:
                self._waiting.pop(request_id, None)
            raise Unavailable("the worker stopped; its API answers no database requests") from None
        if not answer.ready.wait(ANSWER_TIMEOUT_S):
            with self._waiting_lock:
                self._waiting.pop(request_id, None)
            raise Unavailable(f"the worker did not answer within {ANSWER_TIMEOUT_S:g} s (hung?); check its log")
        if isinstance(answer.value, Exception):
            raise answer.value
        return answer.value

    def _route_answers(self) -> None:
        """The only reader of the pipe: each answer goes to the caller waiting for its id."""
        while True:
            try:
                request_id, value = self._queries.recv()
            except (EOFError, OSError):  # the worker is gone: fail who waits, and who asks next
                with self._waiting_lock:
                    self._gone = "the worker stopped; its API answers no database requests"
                    waiting, self._waiting = list(self._waiting.values()), {}
                for answer in waiting:
                    answer.set(Unavailable(self._gone))
                return
            with self._waiting_lock:
                answer = self._waiting.pop(request_id, None)
            if answer is not None:  # None: its caller timed out and left
                answer.set(value)


class _Answer:
    def __init__(self):
        self.ready, self.value = threading.Event(), None

    def set(self, value: Any) -> None:
        self.value = value
        self.ready.set()


def _child(settings_json: dict, sock: socket.socket, updates, queries) -> None:
    import uvicorn

    from streams.api.app import create_app
    from streams.api.board import VerdictBoard
    from streams.config import Settings

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.model_validate(settings_json)
    board = VerdictBoard.from_settings(settings)
    worker = _WorkerState(queries)

    def follow() -> None:
        while True:
            try:
                kind, *payload = updates.recv()
            except (EOFError, OSError):  # the worker is gone: readyz turns 503, verdicts age
                return
            if kind == "publish":
                board.publish([Verdict.model_validate_json(raw) for raw in payload[0]])
            elif kind == "scoring":
                board.mark_scoring(payload[0])
            elif kind == "health":
                worker.ready_flag, worker.reasons_list, worker.reported = payload[0], payload[1], time.monotonic()

    def retire(model: str, candidate: str, reason: str, by: str) -> Verdict:
        row = worker.retire(model, candidate, reason, by)
        board.publish([row])  # the feed brings it too, maybe after this answer: serve it from now on
        return row

    threading.Thread(target=follow, name="board-feed", daemon=True).start()
    app = create_app(board, sink=worker, health=worker, tokens=settings.api.tokens, retire=retire,
                     registry=settings)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
