"""The candidate registry's records: what the compacted ``[kafka] candidates_topic`` holds.

Two kinds of record, told apart by their key:

- ``model/candidate`` (and ``model/candidate@v<N>`` for a superseded version N): a
  ``CandidateRecord``, written by operators (``shadowlens candidates``, the API) and by the first
  worker start (the TOML's ``[[candidates]]`` seed it). It says what to replay and over which mirror
  offsets: every replay process scores the candidate for a mirror message iff the message's offset is
  at or after ``start_offsets[partition]`` and before ``stop_offsets[partition]`` (a partition absent
  from a map: 0, i.e. it was created later). ``pending`` marks a record whose offsets are being
  recorded: replay waits for them (the second write of the same command).
- ``model/candidate#status``: a ``CandidateStatus``, written by replay processes (loading, shadowing,
  refused with a reason). Separate keys, so a process never overwrites an operator's write.
- ``model/pair#verdict``: a ``CandidateVerdict``, written by the judge when a pair's verdict turns to
  promote or rollback (or away from them): the ``promoted`` / ``rolled_back`` states. Keyed by the
  pair id (``name@v<N>``), so a later version never shows an older version's verdict.

Versioned (``schema_version``): a reader refuses a version it does not know instead of guessing.
Depends on nothing of streams (layers: schemas <- scorers <- streams).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

REGISTRY_SCHEMA_VERSION = 1
RegistryState = Literal["registered", "loading", "shadowing", "promoted", "rolled_back", "retired", "refused"]
STATUS_SUFFIX = "#status"
VERDICT_SUFFIX = "#verdict"


class CandidateRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = REGISTRY_SCHEMA_VERSION
    model: str = Field(min_length=1)
    candidate: str = Field(min_length=1, description="the candidate's name; its pair id adds @v<N> from version 2")
    path: str = Field(min_length=1, description="the artifact: a local file path (file:// accepted)")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    runtime: Literal["onnx", "torch"]
    kind: str = "classification"
    kind_params: dict[str, Any] = Field(default_factory=dict)
    adapter: dict[str, Any] = Field(default_factory=dict)
    cast: Literal["no", "safe", "same_kind"] = "same_kind"
    output: str = "probabilities"
    baseline_output: str = "probabilities"
    from_logits: bool = False
    policy: dict[str, Any] = Field(default_factory=dict)
    noise_reference: bool = False
    version: int = Field(default=1, ge=1, description="artifact version: a new SHA-256 or input/output spec")
    policy_version: int = Field(default=1, ge=1, description="bumped by each policy change")
    state: RegistryState = "registered"
    reason: str = ""
    pending: bool = False
    start_offsets: dict[int, int] = Field(default_factory=dict)
    stop_offsets: dict[int, int] | None = None
    updated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    updated_by: str = ""

    @property
    def key(self) -> str:
        return f"{self.model}/{self.candidate}"

    @property
    def pair(self) -> str:
        """The candidate id its diff rows and verdicts carry: evidence of two versions never mixes."""
        return self.candidate if self.version == 1 else f"{self.candidate}@v{self.version}"

    @property
    def verdict_key(self) -> str:
        """Where the judge's verdict state of this version is: by pair id, so versions never share it."""
        return f"{self.model}/{self.pair}{VERDICT_SUFFIX}"

    def scores(self, partition: int, offset: int) -> bool:
        """Whether the candidate is replayed for the mirror message at (partition, offset)."""
        if offset < self.start_offsets.get(partition, 0):
            return False
        return self.stop_offsets is None or offset < self.stop_offsets.get(partition, 0)

    def replay_spec(self) -> tuple:
        """What the replay depends on: a change here is a new version, never the same evidence."""
        return (self.path, self.sha256, self.runtime, self.kind, sorted(self.kind_params.items()), self.adapter,
                self.cast, self.output, self.baseline_output, self.from_logits, self.noise_reference)  # fmt: skip


class _VersionState(BaseModel):
    """A state reported for one version of a candidate, under a key of its own beside the operator's record."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = REGISTRY_SCHEMA_VERSION
    model: str
    candidate: str
    version: int
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class CandidateStatus(_VersionState):
    """What a replay process made of one version of a candidate."""

    state: Literal["loading", "shadowing", "refused"]
    reason: str = ""
    replica: str = ""


class CandidateVerdict(_VersionState):
    """What the judge's verdict makes of one version: a display state only (ClickHouse's verdicts
    are the source); ``shadowing`` when a promote or rollback was followed by another verdict."""

    state: Literal["promoted", "rolled_back", "shadowing"]
    verdict: str = ""
