"""Event and verdict contracts (schema version 1).

Every model here is what travels between the parts: the mirror SDK produces
``MirroredRequest`` to Kafka, the streams worker writes ``RequestDiff``, ``WindowStats``
and ``Verdict`` rows to ClickHouse, and the verdicts API serves ``Verdict``.
Bumping a field's meaning means bumping ``SCHEMA_VERSION`` and accepting both.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas.tensors import Tensor

SCHEMA_VERSION = 1

VerdictName = Literal["promote", "hold", "rollback"]
Decision = Literal["pass", "fail", "inconclusive"]


def _utc(value: datetime) -> datetime:
    # Naive timestamps are taken as UTC (documented): producers in other zones must send an offset.
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


class MirroredRequest(BaseModel):
    """One production request as mirrored by the SDK: inputs, the baseline's output and latency."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: str = Field(min_length=1, max_length=256, description="unique per request; dedup key")
    model: str = Field(min_length=1, max_length=128, description="logical model name, e.g. 'digits'")
    baseline_version: str = Field(min_length=1, max_length=128, description="production model version")
    sent_at: datetime = Field(description="when production answered (UTC; naive means UTC)")
    inputs: dict[str, Tensor] = Field(min_length=1, description="model inputs by name")
    baseline_output: dict[str, Tensor] = Field(min_length=1, description="production outputs by name")
    baseline_latency_ms: float = Field(ge=0, description="production model latency in milliseconds")
    attributes: dict[str, str] = Field(default_factory=dict, description="slice keys, e.g. country")
    label: int | float | None = Field(default=None, description="ground truth, when known")

    _sent_at_utc = field_validator("sent_at")(_utc)

    @field_validator("baseline_latency_ms")
    @classmethod
    def _finite_latency(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number of milliseconds")
        return value


class RequestDiff(BaseModel):
    """Per request and candidate: how the candidate's answer differs from production's."""

    model_config = ConfigDict(extra="forbid")

    model: str
    candidate: str
    request_id: str
    baseline_version: str
    sent_at: datetime
    scored_at: datetime
    baseline_label: int = -1
    candidate_label: int = -1
    label_flip: bool = False
    confidence_delta: float = 0.0  # candidate minus baseline probability of the baseline's top class
    l1_distance: float = 0.0
    baseline_confidence: float = 0.0  # the baseline's probability of its own top class
    candidate_confidence: float = 0.0  # the candidate's probability of its own top class
    baseline_latency_ms: float = 0.0
    candidate_latency_ms: float = 0.0
    error: str = ""  # empty when the candidate answered; else the reason (NaN output, shape mismatch, ...)
    label: float | None = None
    attributes: dict[str, str] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)  # further per-row diffs (linf, hellinger, ...)
    source_partition: int = -1  # Kafka position of the mirrored message (-1: not from Kafka)
    source_offset: int = -1

    _utc = field_validator("sent_at", "scored_at")(_utc)


class MetricJudgement(BaseModel):
    """One gating metric as judged: estimate, interval, the margin it is held to, and the outcome."""

    name: str
    estimate: float | None
    lower: float | None
    upper: float | None
    margin: float
    decision: Decision
    samples: int
    critical: bool = False
    detail: str = ""


class SliceJudgement(BaseModel):
    attribute: str
    value: str
    metric: str
    estimate: float | None
    lower: float | None
    upper: float | None
    samples: int
    decision: Decision


class WindowSummary(BaseModel):
    """What one tumbling window of a (model, candidate) pair adds up to (the API's window row)."""

    model: str
    candidate: str
    window_start: datetime
    window_end: datetime
    requests: int
    errors: int
    label_flips: int
    flip_rate: float | None
    mean_abs_confidence_delta: float | None
    baseline_latency_p50_ms: float | None
    baseline_latency_p95_ms: float | None
    baseline_latency_p99_ms: float | None
    candidate_latency_p50_ms: float | None
    candidate_latency_p95_ms: float | None
    candidate_latency_p99_ms: float | None
    duplicates_dropped: int = 0
    divergence: dict[str, float] = Field(
        default_factory=dict, description="distribution statistics of the window (reported, not gating)"
    )
    updated_at: datetime

    _utc = field_validator("window_start", "window_end", "updated_at")(_utc)


class WindowStats(WindowSummary):
    """A window row as stored: the summary plus its mergeable state."""

    state: str = ""  # serialized sufficient statistics and sketches (JSON), mergeable across windows


class Verdict(BaseModel):
    """The answer a promotion gate polls for: promote, hold or rollback, and why."""

    schema_version: Literal[1] = SCHEMA_VERSION
    model: str
    candidate: str
    verdict: VerdictName
    reasons: list[str]
    metrics: list[MetricJudgement]
    samples: int
    window_start: datetime
    window_end: datetime
    updated_at: datetime
    requests_needed: int | None = Field(default=None, description="estimated more requests to decide (hold only)")
    worst_slices: list[SliceJudgement] = Field(default_factory=list)
    example_request_ids: list[str] = Field(default_factory=list, description="largest diffs, to pull from ClickHouse")

    _utc = field_validator("window_start", "window_end", "updated_at")(_utc)


class DeadLetter(BaseModel):
    """What the worker publishes to the dead-letter topic for a message it could not use."""

    reason: str
    error_type: Literal["invalid_json", "invalid_schema", "invalid_tensor", "adapter", "other"]
    topic: str
    partition: int
    offset: int
    payload: str = Field(description="the original message value (utf-8, or base64 when not text)")
    payload_encoding: Literal["utf-8", "base64"] = "utf-8"
    failed_at: datetime


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem: the field path and what was expected, for logs and dead letters."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "(message)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)
