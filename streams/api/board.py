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
- ``stale``: the latest decision is older than ``stale_after_s`` (the worker or the traffic stopped).
  A stale promote or hold is served as hold, the decision it replaces in ``last_decision``: a
  promote a day old says nothing about the candidate that runs now. A stale **rollback stays
  rollback** (its reason says it is old but stands): evidence that a candidate is worse does not
  expire, and a gate that saw it turn into hold would let the candidate through (Flagger's rollback
  hook 200 -> 412, Argo's ``failureCondition`` never firing). It stands across idle periods and
  restarts (``load``) until the judge writes a newer verdict for the pair, or an operator retires
  it (``shadowlens verdicts retire``, streams/judge/retire.py).
- ``retired``: an operator retired the pair: the stored row (a hold naming who and why, the
  decision it replaced in ``last_decision``) is served as it is, at any age.

A stored verdict is served by these rules whether or not the pair is in this process's
``[[candidates]]``: a standalone API or a worker with another config must never turn someone's
rollback into a hold. Unknown pairs (neither configured nor ever seen) are ``None``: 404.
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
        (streams/api/process.py) keeps its board current."""
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

    def load_recent(self, sink, within_s: float) -> None:
        """Publish verdicts written in the database's last ``within_s`` seconds that are newer than
        the board's: how a judge on a shared ClickHouse sees what others wrote (an operator's
        retirement, other judges' pairs) without re-reading every verdict body."""
        rows = sink.query(f"SELECT body FROM {sink.database}.verdicts "
                          "WHERE updated_at > now64(3) - toIntervalMillisecond(%(ms)s)", {"ms": int(within_s * 1000)})
        fresh = [Verdict.model_validate_json(body) for (body,) in rows]
        with self._lock:
            fresh = [v for v in fresh if (old := self._latest.get((v.model, v.candidate))) is None
                     or v.updated_at > old.updated_at]  # fmt: skip
        self.publish(fresh)

    # -- read by the API ----------------------------------------------------------------------
    def verdict(self, model: str, candidate: str) -> Verdict | None:
        key = (model, candidate)
        with self._lock:
            latest, scoring = self._latest.get(key), key in self._scoring
        return self._served(key, latest, scoring)

    def stored(self, model: str, candidate: str) -> Verdict | None:
        """The latest verdict as written (no staleness applied), or None."""
        with self._lock:
            return self._latest.get((model, candidate))

    def verdict_json(self, model: str, candidate: str) -> bytes | None:
        """``verdict()`` as the API's JSON body; a verdict served as stored costs no serialisation
        (its JSON is made once, when published, and only ``age_s`` is filled in)."""
        key = (model, candidate)
        with self._lock:
            latest, scoring, raw = self._latest.get(key), key in self._scoring, self._json.get(key)
        if latest is not None and raw is not None:
            age = max(0.0, self.clock() - latest.updated_at.timestamp())
            if _as_stored(latest, age, self.stale_after_s):
                return raw.replace(b'"age_s":null', b'"age_s":%.3f' % age, 1)
        served = self._served(key, latest, scoring)
        return None if served is None else served.model_dump_json().encode()

    def verdicts(self, include_all: bool = False) -> list[Verdict]:
        """Configured pairs and every pair whose latest verdict is a rollback (a rollback is listed
        wherever it is served); ``include_all``: every pair seen."""
        with self._lock:
            seen = set(self._latest) | self._scoring
            rollbacks = {k for k, v in self._latest.items() if v.verdict == "rollback"}
            keys = sorted(seen | self.configured if include_all else self.configured | rollbacks)
            snapshot = [(k, self._latest.get(k), k in self._scoring) for k in keys]
        served = (self._served(k, latest, scoring) for k, latest, scoring in snapshot)
        return [v for v in served if v is not None]

    def _served(self, key: Pair, latest: Verdict | None, scoring: bool) -> Verdict | None:
        now = self.clock()
        configured = key in self.configured
        if latest is None:
            if not configured and not scoring:
                return None
            if scoring:
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
        if _as_stored(latest, age, self.stale_after_s):
            return latest.model_copy(update={"age_s": round(age, 3)})
        limit = f"the {self.stale_after_s:.0f} s limit ([api] stale_after_windows x [windows] size_s + grace_s)"
        if latest.verdict == "rollback":
            return latest.model_copy(update={
                "state": "stale", "age_s": round(age, 3), "last_decision": "rollback", "reasons": [
                    f"Rollback stands: the last verdict is {age:.0f} s old, over {limit}, but a rollback does not "
                    "expire (no newer evidence has cleared it); a newer verdict from the judge replaces it, or an "
                    "operator clears it with `shadowlens verdicts retire`.", *latest.reasons]})  # fmt: skip
        return _as_hold(latest, "stale", age, (
            f"Hold: stale: the last verdict ({latest.verdict}) is {age:.0f} s old, over {limit}: the worker or the "
            "mirrored traffic stopped; check the worker's /readyz and the producer."))  # fmt: skip


def _as_stored(latest: Verdict, age: float, stale_after_s: float) -> bool:
    """Served exactly as written (only ``age_s`` filled in): fresh, or an operator's retirement."""
    return age <= stale_after_s or latest.state == "retired"


def _as_hold(latest: Verdict, state: str, age: float, reason: str) -> Verdict:
    return latest.model_copy(update={
        "verdict": "hold", "state": state, "age_s": round(age, 3), "last_decision": latest.verdict,
        "reasons": [reason, *latest.reasons], "requests_needed": None,
    })  # fmt: skip


class BoardRefresher:
    """Keeps a board current from ClickHouse, off the event loop: a standalone API's (every verdict
    each time), or a judge's on a shared ClickHouse (``recent_only``: what others wrote lately)."""

    def __init__(self, board: VerdictBoard, sink, every_s: float, recent_only: bool = False):
        self.board, self.sink, self.every_s, self.recent_only = board, sink, every_s, recent_only
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="board-refresh", daemon=True)

    def start(self) -> None:
        if not self.recent_only:
            self.board.load(self.sink)  # the first fill before serving: a failure here is the caller's
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.every_s):
            try:
                if self.recent_only:  # since the last success, with a minute's overlap (clock skew)
                    self.board.load_recent(self.sink, within_s=time.monotonic() - last_ok + 60.0)
                else:
                    self.board.load(self.sink)
                last_ok = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - the board keeps its last content; age grows to stale
                log.warning("verdict board not refreshed (%s); serving the last verdicts", exc)
