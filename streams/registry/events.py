"""What the judge writes about the candidate registry, besides its verdicts.

- ``VerdictStates``: the ``promoted`` / ``rolled_back`` states of ``candidates show`` and the API.
  When a pair's latest verdict turns to promote or rollback (or away from them), the judge writes
  a ``CandidateVerdict`` under ``model/pair#verdict`` (schemas/registry.py): a key of its own, so it
  never overwrites an operator's record nor the replay processes' ``#status``. A display state only:
  the verdicts in ClickHouse are the source, so a write that fails is logged (once) and tried again
  at a later refresh, never waited for.
- ``CandidateEvents``: the registry's history in ClickHouse (``candidate_events``) for analysts:
  the compacted topic keeps only the last record per key, the table every record the judge saw.

Both run from ``JudgeRegistry.refresh`` (streams/registry/follow.py), about once a second.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from schemas.registry import CandidateRecord, CandidateStatus, CandidateVerdict
from streams.config import Settings

log = logging.getLogger("shadowlens.registry")
STATES = {"promote": "promoted", "rollback": "rolled_back"}  # any other verdict: back to shadowing
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class VerdictStates:
    def __init__(self, settings: Settings, follower):
        self.settings, self.follower = settings, follower
        self.sent: dict[str, tuple[int, str]] = {}  # verdict key -> (version, state) written, not read back yet
        self._task: asyncio.Task | None = None
        self._warned = False

    def update(self, board) -> None:
        due: list[tuple[str, CandidateVerdict]] = []
        for rec in self.follower.by_pair().values():
            if rec.pending or rec.state in ("retired", "refused"):  # those states win over any verdict
                continue
            latest = board.stored(rec.model, rec.pair)
            state = STATES.get(latest.verdict, "shadowing") if latest is not None else "shadowing"
            known = self.follower.statuses.get(rec.verdict_key)
            shown = known.state if known is not None and known.version == rec.version else "shadowing"
            if state == shown:
                self.sent.pop(rec.verdict_key, None)
            elif self.sent.get(rec.verdict_key) != (rec.version, state):
                due.append((rec.verdict_key, CandidateVerdict(model=rec.model, candidate=rec.candidate,
                                                              version=rec.version, state=state,
                                                              verdict=latest.verdict if latest else "")))  # fmt: skip
        if due and (self._task is None or self._task.done()):  # one write at a time; the rest next refresh
            for key, v in due:
                self.sent[key] = (v.version, v.state)
            self._task = asyncio.create_task(self._write(due), name="registry verdict states")

    async def _write(self, records: list[tuple[str, CandidateVerdict]]) -> None:
        from streams.registry.store import write

        try:
            await write(self.settings, records)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a display state: the judge goes on, a later refresh retries
            for key, _ in records:
                self.sent.pop(key, None)
            if not self._warned:
                self._warned = True
                log.warning("registry: could not write the promoted / rolled_back states (%s); `candidates show` "
                            "lags until the broker takes them (the verdicts are in ClickHouse)", exc)  # fmt: skip
            return
        self._warned = False


class CandidateEvents:
    def __init__(self, follower, sink):
        self.follower, self.sink = follower, sink
        self.seen: set[tuple] | None = None  # identities in the table; read once, then kept up to date

    def update(self) -> None:
        # Every record read since the last look (the journal), and the latest of each key (what was read
        # before this judge first looked); the identities below keep each row once.
        journal = self.follower.journal
        read = [journal.popleft() for _ in range(len(journal))]
        read += list(self.follower.specs.values()) + list(self.follower.statuses.values())
        rows = [record_row(r) if isinstance(r, CandidateRecord) else status_row(r)
                for r in read if not (isinstance(r, CandidateRecord) and r.pending)]  # pending: half-written
        if self.seen is None:
            self.seen = {(m, c, v, _ms(at), src, st) for m, c, v, at, src, st in self.sink.query(
                f"SELECT model, candidate, version, at, source, state FROM {self.sink.database}.candidate_events")}
        new = {_ident(r): r for r in rows if _ident(r) not in self.seen}
        if new:
            self.sink.insert_candidate_events(list(new.values()))
            self.seen.update(new)


def record_row(rec: CandidateRecord) -> dict[str, Any]:
    return dict(at=rec.updated_at, model=rec.model, candidate=rec.candidate, version=rec.version, pair=rec.pair,
                source="record", state=rec.state, sha256=rec.sha256, path=rec.path,
                policy_version=rec.policy_version, policy=json.dumps(rec.policy, sort_keys=True),
                by=rec.updated_by, reason=rec.reason, start_offsets=json.dumps(rec.start_offsets),
                stop_offsets=json.dumps(rec.stop_offsets))  # fmt: skip


def status_row(s: CandidateStatus | CandidateVerdict) -> dict[str, Any]:
    verdict = isinstance(s, CandidateVerdict)
    return dict(at=s.at, model=s.model, candidate=s.candidate, version=s.version,
                pair=s.candidate if s.version == 1 else f"{s.candidate}@v{s.version}",
                source="verdict" if verdict else "status", state=s.state, sha256="", path="", policy_version=0,
                policy="", by="judge" if verdict else s.replica, reason=s.verdict if verdict else s.reason,
                start_offsets="", stop_offsets="")  # fmt: skip


def _ms(at: datetime) -> int:
    """Whole milliseconds since the epoch: the table keeps DateTime64(3), the registry microseconds."""
    return ((at if at.tzinfo else at.replace(tzinfo=UTC)) - EPOCH) // timedelta(milliseconds=1)


def _ident(row: dict[str, Any]) -> tuple:
    return (row["model"], row["candidate"], row["version"], _ms(row["at"]), row["source"], row["state"])
