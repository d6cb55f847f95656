"""Verdict history: what the judge records beside each verdict, and the changes a person reads.

Two things are written with every verdict the judge stores (``verdicts.policy_hash`` and
``verdicts.evidence``, schemas/clickhouse.py):

- ``policy_hash``: the first 12 hex digits of the SHA-256 of the pair's ``JudgePolicy`` as
  canonical JSON (sorted keys, no spaces). Two verdicts with the same hash were judged under the
  same margins and levels; a change of hash in the history is a policy change.
- ``evidence``: what the verdict rested on besides the diff rows, so that ``shadowlens rejudge``
  (streams/judge/rejudge.py) can replay the stored rows through the judge look by look and land on the
  same verdicts: the mirror offset per partition up to which the pair's rows were counted (and the
  noise reference's, when its diffs were the noise floor), the requests routed to the candidate,
  the unscorable ones by reason, the inputs cast, which close of the judge it came from (``look``,
  the wall time of that close) and the event-time clock at which that close ended the pair's
  clusters (the watermark; ``null``: every cluster, the traffic had stopped; ``-1``: no watermark
  yet). These are counts and positions, not the statistics: the statistics are recomputed.

The changes are a view, ``verdict_changes`` (schemas/clickhouse.py: every row whose verdict differs
from the pair's previous one, and the first), read by ``GET /v1/verdicts/{model}/{candidate}/history``,
the Grafana dashboard and the notebook.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from schemas.clickhouse import sql_literal
from streams.judge.windows import pair_key

EVIDENCE_VERSION = 1
HISTORY_COLUMNS = ("model", "candidate", "from_verdict", "to_verdict", "changed_at", "samples", "decided_by",
                   "policy_hash", "state", "reason", "look")  # fmt: skip
VerdictName = Literal["promote", "hold", "rollback"]


def policy_hash(policy) -> str:
    """12 hex digits naming a ``JudgePolicy``: SHA-256 of its ``to_dict`` as canonical JSON."""
    text = json.dumps(policy.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def provenance(core, pw, clock: int | None, look: float) -> tuple[str, str]:
    """(policy_hash, evidence JSON) of the verdict ``core`` (a ``streams.judge.core.JudgeCore``) has just
    judged for pair ``pw`` in the close made at wall time ``look``, its clusters ended at ``clock``."""
    cfg = core.configs[pair_key(pw.model, pw.candidate)]
    noise = None
    if not cfg.noise_reference:  # the judge's own rule (JudgeCore._verdict): a noise floor when it has the pair
        ref = next((c for c in core.configs.values() if c.model == pw.model and c.noise_reference), None)
        ref_pw = core.pairs().get(pair_key(pw.model, ref.name)) if ref is not None else None
        if ref_pw is not None:
            noise = {"candidate": ref.name, "applied": {str(p): o for p, o in ref_pw.applied_offsets.items()}}
    evidence = {
        "v": EVIDENCE_VERSION, "look": look, "clock": clock,
        "applied": {str(p): o for p, o in pw.applied_offsets.items()}, "received": pw.received,
        "unscorable": dict(pw.unscorable), "cast": dict(pw.cast), "noise": noise,
    }  # fmt: skip
    return policy_hash(cfg.judge_policy()), json.dumps(evidence, separators=(",", ":"))


class VerdictChange(BaseModel):
    """One change of a pair's verdict (or its first verdict), from the ``verdict_changes`` view."""

    model: str
    candidate: str
    from_verdict: VerdictName | None = Field(description="the verdict before; null for the pair's first verdict")
    to_verdict: VerdictName
    changed_at: datetime = Field(description="when the judge (or an operator, state retired) wrote it")
    samples: int = Field(description="scored requests the new verdict rested on")
    decided_by: str | None = Field(description="rollback: the failing metric (or 'slices'); hold: the metric or data "
                                   "check it waits for ('retired': an operator); promote: 'all_gating'")
    policy_hash: str = Field(description="the JudgePolicy it was judged under (12 hex of SHA-256); empty for an "
                             "operator's retirement or a verdict written before policy hashes")
    state: str = Field(description="judged, or retired")
    reason: str = Field(description="the verdict's first reason")
    look: int = Field(description="which of the pair's stored verdicts this is (1: its first)")

    @field_validator("changed_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:  # ClickHouse's DateTime64(3, 'UTC') reads back naive
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def history_sql(model: str, candidate: str, limit: int) -> str:
    """The pair's changes, newest first. Plain table name: an analyst session resolves it in the
    project's database (streams/api/analyst_sql.py), both embedded and on a server."""
    return (f"SELECT {', '.join(HISTORY_COLUMNS)} FROM verdict_changes WHERE model = {sql_literal(model)} "
            f"AND candidate = {sql_literal(candidate)} ORDER BY changed_at DESC, look DESC LIMIT {int(limit)}")


def read_history(sink: Any, model: str, candidate: str, limit: int = 100) -> list[VerdictChange]:
    """Through ``sink.readonly_query``: the API's read-only session, which a worker's API process
    forwards to the worker (streams/api/process.py), so the history needs no pipe of its own."""
    answer = sink.readonly_query(history_sql(model, candidate, limit))
    return [VerdictChange.model_validate(dict(zip(answer["columns"], row, strict=True))) for row in answer["rows"]]
