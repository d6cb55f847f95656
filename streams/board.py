"""The verdict board: the latest verdict of every pair, in memory, as gates should read it.

The judge publishes each verdict here right after writing it to ClickHouse, and marks the pairs
whose traffic it scores; the API answers from here, so polling the API never queries the database
and never waits on the worker. A standalone API (``shadowlens api`` with an ``http://`` ClickHouse)
fills its board from the database every ``[api] refresh_s`` instead.

What a gate reads (``VerdictBoard.verdict``), by state (``schemas.VerdictState``):

- ``judged``: the judge's latest decision, younger than the stale limit; ``age_s`` says how old.
- ``waiting_for_traffic``: the pair is configured and nothing has been scored for it: 200 hold,
  so Argo counts an inconclusive measurement instead of an error and Flagger keeps waiting.
- ``scoring``: traffic is scored, no window has closed yet: 200 hold.
- ``stale``: the latest decision is older than ``stale_after_s`` (the worker or the traffic stopped):
  served as hold, the decision it replaces in ``last_decision``. A promote a day old says nothing
  about the candidate that runs now.
- ``retired``: the pair has verdicts but is not configured any more: hold, marked, and listed only
  when asked for all pairs.

Unknown pairs (neither configured nor ever seen) are ``None``: the API answers 404.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime

from schemas import Verdict

log = logging.getLogger("shadowlens.board")
Pair = tuple[str, str]


class VerdictBoard:
    def __init__(self, configured: Iterable[Pair], stale_after_s: float, clock: Callable[[], float] = time.time):
        self.configured = set(configured)
        self.stale_after_s = float(stale_after_s)
        self.clock = clock
        self._latest: dict[Pair, Verdict] = {}
        self._scoring: set[Pair] = set()
        self._json: dict[Pair, bytes] = {}  # latest verdict's JSON body, age_s null
        self._subscribers: list[Callable[[tuple], None]] = []
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings) -> VerdictBoard:
        w = settings.windows
        stale = settings.api.stale_after_windows * w.size_s + w.grace_s
        return cls(((c.model, c.name) for c in settings.candidates), stale)

    # -- written by the judge (or a refresher) ------------------------------------------------
    def subscribe(self, send: Callable[[tuple], None]) -> None:
        """``send(("publish", [verdict JSON, ...]))`` and ``send(("scoring", [new pairs]))``: the
        board's content now, then every change: how the worker's API process
        (streams/api_process.py) keeps its board current."""
        with self._lock:
            raws, scoring = list(self._json.values()), sorted(self._scoring)
            self._subscribers.append(send)
        if raws:  # what the board holds already (loaded at startup)
            send(("publish", raws))
        if scoring:
            send(("scoring", scoring))

    def publish(self, verdicts: Sequence[Verdict]) -> None:
        raws = []
        with self._lock:
            for v in verdicts:
                key = (v.model, v.candidate)
                old = self._latest.get(key)
                if old is None or v.updated_at >= old.updated_at:
                    self._latest[key] = v
                    self._json[key] = v.model_copy(update={"age_s": None}).model_dump_json().encode()
                    raws.append(self._json[key])
                self._scoring.add(key)
        for send in self._subscribers if raws else ():
            send(("publish", raws))

    def mark_scoring(self, pairs: Iterable[Pair]) -> None:
        with self._lock:
            new = set(pairs) - self._scoring
            self._scoring.update(new)
        for send in self._subscribers if new else ():
            send(("scoring", sorted(new)))

    def load(self, sink) -> None:
        """Fill the board from the database (a restarted worker, a standalone API)."""
        self.publish(sink.latest_verdicts())
        self.mark_scoring(sink.scored_pairs())

    # -- read by the API ----------------------------------------------------------------------
    def verdict(self, model: str, candidate: str) -> Verdict | None:
        key = (model, candidate)
        with self._lock:
            latest, scoring = self._latest.get(key), key in self._scoring
        return self._served(key, latest, scoring)

    def verdict_json(self, model: str, candidate: str) -> bytes | None:
        """``verdict()`` as the API's JSON body; a fresh judged verdict costs no serialisation (its
        JSON is made once, when published, and only ``age_s`` is filled in)."""
        key = (model, candidate)
        with self._lock:
            latest, scoring, raw = self._latest.get(key), key in self._scoring, self._json.get(key)
        if latest is not None and raw is not None and key in self.configured:
            age = max(0.0, self.clock() - latest.updated_at.timestamp())
            if age <= self.stale_after_s:
                return raw.replace(b'"age_s":null', b'"age_s":%.3f' % age, 1)
        served = self._served(key, latest, scoring)
        return None if served is None else served.model_dump_json().encode()

    def verdicts(self, include_all: bool = False) -> list[Verdict]:
        with self._lock:
            keys = set(self._latest) | self._scoring
            keys = sorted(keys | self.configured if include_all else self.configured)
            snapshot = [(k, self._latest.get(k), k in self._scoring) for k in keys]
        served = (self._served(k, latest, scoring) for k, latest, scoring in snapshot)
        return [v for v in served if v is not None]

    def _served(self, key: Pair, latest: Verdict | None, scoring: bool) -> Verdict | None:
        now = self.clock()
        configured = key in self.configured
        if latest is None:
            if not configured and not scoring:
                return None
            if not configured:
                state, why = "retired", "retired: not configured in this worker any more, and no verdict was written"
            elif scoring:
                state, why = "scoring", "scoring: traffic is being scored but no window has closed yet"
            else:
                state, why = "waiting_for_traffic", (
                    "waiting for traffic: the candidate is configured and no mirrored request has been scored for "
                    "it yet; check that the producer mirrors this model to the worker's topic")  # fmt: skip
            stamp = datetime.fromtimestamp(now, UTC)
            return Verdict(model=key[0], candidate=key[1], verdict="hold", reasons=[f"Hold: {why}."], metrics=[],
                           samples=0, window_start=stamp, window_end=stamp, updated_at=stamp, state=state,
                           age_s=0.0)  # fmt: skip
        age = max(0.0, now - latest.updated_at.timestamp())
        if not configured:
            return _as_hold(latest, "retired", age, f"Hold: retired: {key[0]}/{key[1]} is not configured in this "
                            f"worker any more; its last decision was {latest.verdict}.")  # fmt: skip
        if age > self.stale_after_s:
            return _as_hold(latest, "stale", age, (
                f"Hold: stale: the last verdict ({latest.verdict}) is {age:.0f} s old, over the {self.stale_after_s:.0f} s "
                "limit ([api] stale_after_windows x [windows] size_s): the worker or the mirrored traffic stopped; "
                "check the worker's /readyz and the producer."))  # fmt: skip
        return latest.model_copy(update={"age_s": round(age, 3)})


def _as_hold(latest: Verdict, state: str, age: float, reason: str) -> Verdict:
    return latest.model_copy(update={
        "verdict": "hold", "state": state, "age_s": round(age, 3), "last_decision": latest.verdict,
        "reasons": [reason, *latest.reasons], "requests_needed": None,
    })  # fmt: skip


class BoardRefresher:
    """Keeps a standalone API's board current from ClickHouse, off the event loop."""

    def __init__(self, board: VerdictBoard, sink, every_s: float):
        self.board, self.sink, self.every_s = board, sink, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="board-refresh", daemon=True)

    def start(self) -> None:
        self.board.load(self.sink)  # the first fill before serving: a failure here is the caller's
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.board.load(self.sink)
            except Exception as exc:  # noqa: BLE001 - the board keeps its last content; age grows to stale
                log.warning("verdict board not refreshed (%s); serving the last verdicts", exc)
