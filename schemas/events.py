"""Event and verdict contracts (schema version 1).

Every model here is what travels between the parts: the mirror SDK produces
``MirroredRequest`` to Kafka, the streams worker writes ``RequestDiff``, ``WindowStats``
and ``Verdict`` rows to ClickHouse, and the verdicts API serves ``Verdict``.
Bumping a field's meaning means bumping ``SCHEMA_VERSION`` and accepting both.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas.tensors import Tensor, clip

SCHEMA_VERSION = 1

# Limits of a MirroredRequest (the SDK's mirror/validation.py checks the same ones before
# publishing). They bound what one message can cost the worker and its state: attributes become
# slice tables and ClickHouse map columns, tensor names become dict keys in every diff.
MAX_REQUEST_ID_CHARS = 256
MAX_NAME_CHARS = 128  # model and baseline_version
MAX_TENSORS = 64  # per map: inputs, baseline_output
MAX_TENSOR_NAME_CHARS = 128
MAX_ATTRIBUTES = 32
MAX_ATTRIBUTE_KEY_CHARS = 64
MAX_ATTRIBUTE_VALUE_CHARS = 256


VerdictName = Literal["promote", "hold", "rollback"]
# judged: the judge's latest decision; waiting_for_traffic: configured, nothing scored yet (hold);
# scoring: traffic scored, no window closed yet (hold); stale: the latest decision is older than the
# API's limit (hold, decision in last_decision); retired: the pair is not configured any more (hold).
VerdictState = Literal["judged", "waiting_for_traffic", "scoring", "stale", "retired"]
Decision = Literal["pass", "fail", "inconclusive"]


def _utc(value: datetime) -> datetime:
    # Naive timestamps are taken as UTC (documented): producers in other zones must send an offset.
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:00-12:00 has no UTC datetime; not a ValueError, so convert
        raise ValueError(f"{value.isoformat()} is out of range in UTC; "
                         "send a timestamp between years 1 and 9999") from None


def _check_tensor_map(value: Any) -> Any:
    # Runs before the tensors are validated, so a message with 100k tensors is refused cheaply.
    if isinstance(value, dict):
        if len(value) > MAX_TENSORS:
            raise ValueError(f"{len(value)} tensors exceed the limit of {MAX_TENSORS}; "
                             "mirror only the tensors the candidates need")
        for name in value:
            if isinstance(name, str) and len(name) > MAX_TENSOR_NAME_CHARS:
                raise ValueError(f"tensor name {clip(repr(name), 40)} has {len(name)} characters, over the "
                                 f"limit of {MAX_TENSOR_NAME_CHARS}; use the model's (short) input/output names")
    return value


def _check_attributes(value: Any) -> Any:
    # Non-str keys and values are left to the field's own type check, which names them.
    if isinstance(value, dict):
        if len(value) > MAX_ATTRIBUTES:
            raise ValueError(f"{len(value)} entries exceed the limit of {MAX_ATTRIBUTES}; "
                             f"send at most {MAX_ATTRIBUTES} slice keys")
        for key, item in value.items():
            if isinstance(key, str) and len(key) > MAX_ATTRIBUTE_KEY_CHARS:
                raise ValueError(f"key {clip(repr(key), 40)} has {len(key)} characters, over the limit of "
                                 f"{MAX_ATTRIBUTE_KEY_CHARS}; use a shorter slice key")
            if isinstance(item, str) and len(item) > MAX_ATTRIBUTE_VALUE_CHARS:
                raise ValueError(f"key {clip(repr(key), 40)}: value has {len(item)} characters, over the limit of "
                                 f"{MAX_ATTRIBUTE_VALUE_CHARS}; attributes are slice values (e.g. a country), "
                                 "not payloads")
    return value


class MirroredRequest(BaseModel):
    """One production request as mirrored by the SDK: inputs, the baseline's output and latency.

    Limits (module constants): ``request_id`` 1..``MAX_REQUEST_ID_CHARS`` characters, ``model``
    and ``baseline_version`` 1..``MAX_NAME_CHARS``; ``inputs`` and ``baseline_output`` 1..``MAX_TENSORS``
    tensors each, names up to ``MAX_TENSOR_NAME_CHARS``; ``attributes`` up to ``MAX_ATTRIBUTES``
    entries, keys up to ``MAX_ATTRIBUTE_KEY_CHARS``, values up to ``MAX_ATTRIBUTE_VALUE_CHARS``;
    ``sample_key`` (optional) 1..``MAX_REQUEST_ID_CHARS``; ``label`` must fit a float64. What the
    worker further needs to *score* a valid request (non-empty tensors, finite inputs) is
    ``schemas.decode.check_scorable``; read messages with ``schemas.decode_request``, which applies
    both and never raises.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: str = Field(min_length=1, max_length=MAX_REQUEST_ID_CHARS, description="unique per request; dedup key")
    model: str = Field(min_length=1, max_length=MAX_NAME_CHARS, description="logical model name, e.g. 'digits'")
    baseline_version: str = Field(min_length=1, max_length=MAX_NAME_CHARS, description="production model version")
    sent_at: datetime = Field(description="when production answered (UTC; naive means UTC)")
    inputs: dict[str, Tensor] = Field(min_length=1, description="model inputs by name")
    baseline_output: dict[str, Tensor] = Field(min_length=1, description="production outputs by name")
    baseline_latency_ms: float = Field(ge=0, description="production model latency in milliseconds")
    attributes: dict[str, str] = Field(default_factory=dict, description="slice keys, e.g. country")
    sample_key: str | None = Field(
        default=None, min_length=1, max_length=MAX_REQUEST_ID_CHARS,
        description="what makes requests dependent (a user, a session, a device): the judge treats requests sharing "
                    "a sample key within cluster_gap_s as one cluster; never the Kafka key, which only orders and "
                    "partitions")
    label: int | float | None = Field(default=None, description="ground truth, when known")

    _sent_at_utc = field_validator("sent_at")(_utc)
    _tensor_maps = field_validator("inputs", "baseline_output", mode="before")(_check_tensor_map)
    _attributes = field_validator("attributes", mode="before")(_check_attributes)

    @property
    def sent_ms(self) -> int:
        """``sent_at`` in epoch milliseconds (what ``schemas.fast_path.PlainRequest`` carries too)."""
        return int(self.sent_at.timestamp() * 1000)

    @field_validator("baseline_latency_ms")
    @classmethod
    def _finite_latency(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number of milliseconds")
        return value

    @field_validator("label")
    @classmethod
    def _float_label(cls, value: int | float | None) -> int | float | None:
        # The worker stores float(label); a 400-digit int would raise OverflowError mid-batch.
        # NaN stays accepted (it reads as "no label" downstream), as before.
        if isinstance(value, int):
            try:
                float(value)
            except OverflowError:
                raise ValueError(f"a {value.bit_length()}-bit integer does not fit a float64; "
                                 "send the label as a number within float range, or null") from None
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
    kind: str = "classification"  # the candidate's output kind (scorers.kinds); ``metrics`` holds its own metrics
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
    kind: str = Field(default="classification", description="the candidate's output kind (scorers.kinds)")
    metrics: dict[str, float] = Field(
        default_factory=dict, description="the window's mean of each of the output kind's own metrics (not gating)"
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
    # Added in 1.1 (all optional, so 1.0 readers and rows stay valid):
    state: VerdictState = Field(default="judged", description="what the verdict rests on; see VerdictState")
    age_s: float | None = Field(default=None, description="seconds since the judge wrote it, when served")
    last_decision: VerdictName | None = Field(
        default=None, description="the judge's own decision when the served verdict is a stale/retired hold"
    )
    blocking_metric: str | None = Field(default=None, description="hold: the metric the decision waits for")
    failed_slices: int = Field(default=0, description="slices confidently above their margin (e-BH)")
    unscorable: int = Field(
        default=0, description="requests that could not be compared (producer payload or config; dead letters)"
    )
    cast: dict[str, int] = Field(
        default_factory=dict, description="requests whose inputs the candidate's cast policy converted, by "
        "'input from->to' (e.g. 'pixels float64->float32'): the producer's dtype, scored after the cast",
    )  # fmt: skip
    kind: str = Field(
        default="classification", description="the candidate's output kind (scorers.kinds): what label_flip_rate "
        "(its disagreement rate) and abs_confidence_delta (its mean severity) measure; the reasons say it",
    )  # fmt: skip

    _utc = field_validator("window_start", "window_end", "updated_at")(_utc)


_TENSOR_FIELD = re.compile(r"(dtype|shape|data): ")


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem: the field path and what was expected, for logs and dead letters.

    Path parts are cut to 64 characters (a path may hold a hostile dict key); a tensor's own
    ``dtype:``/``shape:``/``data:`` prefix joins the path: ``inputs.pixels.shape: ...``.
    """
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(clip(str(p), 64) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        field = _TENSOR_FIELD.match(msg)
        if field:
            loc, msg = f"{loc}.{field.group(1)}" if loc else field.group(1), msg[field.end():]
        parts.append(f"{loc or '(message)'}: {msg}")
    return "; ".join(parts)
