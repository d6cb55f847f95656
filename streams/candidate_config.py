"""One ``[[candidates]]`` entry of the worker's configuration: the model file, its runtime and output
kind, what it is compared with, and the judge's policy for it. The registry (streams/registry/)
stores and replays the same fields; streams/config.py loads the file around them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from streams.replay.adapter import AdapterConfig


class Section(BaseModel):
    """A configuration section: an unknown key is an error, never ignored."""

    model_config = ConfigDict(extra="forbid")


class CandidateConfig(Section):
    name: str = Field(min_length=1, description="candidate id, e.g. 'digits-v2'")
    model: str = Field(min_length=1, description="the logical model (MirroredRequest.model) it shadows")
    path: Path = Field(description="model file: ONNX (.onnx), TorchScript (.pt, .pth, .ts) or torch.export (.pt2)")
    runtime: Literal["onnx", "torch"] | None = Field(
        default=None,
        description="runs the model: 'onnx' (onnxruntime) or 'torch' (TorchScript / torch.export, the torch "
        "extra); empty: from the file's suffix (.pt, .pth, .pt2, .ts, .torchscript: torch; else onnx)",
    )
    output: str = Field(default="probabilities", description="candidate output compared with the baseline's")
    baseline_output: str = Field(default="probabilities", description="name in MirroredRequest.baseline_output")
    from_logits: bool = False
    kind: str = Field(
        default="classification",
        description="what the model answers (scorers.kinds): classification, regression, multilabel, ranking or "
        "embedding; it decides how the candidate's answer is compared with the baseline's",
    )
    kind_params: dict[str, Any] = Field(
        default_factory=dict,
        description="the kind's parameters, e.g. { abs_tolerance = 0.5 } for regression (README, Output kinds); "
        "from_logits may be given here or above, not both differently",
    )
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    cast: Literal["no", "safe", "same_kind"] = Field(
        default="same_kind",
        description="inputs whose dtype the model does not take, after the adapter: numpy's casting rule for "
        "casting them to the model's dtype ('no': never; 'safe': value-preserving only; 'same_kind': also "
        "float64 -> float32, int64 -> int32, int -> float). Other dtypes are input_dtype dead letters "
        "(streams/replay/blame.py)",
    )
    policy: dict[str, Any] = Field(default_factory=dict, description="scorers.judge.JudgePolicy fields")
    noise_reference: bool = Field(
        default=False, description="this 'candidate' is the baseline model replayed: its diffs measure the noise floor"
    )
    _kind: Any = PrivateAttr(default=None)  # scorers.kinds.OutputKind, built by _kind_params_fit

    @field_validator("path")
    @classmethod
    def _exists(cls, value: Path) -> Path:
        if not value.is_file():
            raise ValueError(f"{value}: no such model file; build it or fix the path")
        return value

    @model_validator(mode="after")
    def _runtime_from_suffix(self) -> CandidateConfig:
        if self.runtime is None:
            self.runtime = infer_runtime(self.path)
        return self

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        from scorers.kinds import KIND_NAMES

        if value not in KIND_NAMES:
            raise ValueError(f"{value!r} is not an output kind; use one of {', '.join(KIND_NAMES)}")
        return value

    @model_validator(mode="after")
    def _kind_params_fit(self) -> CandidateConfig:
        """``from_logits`` has two spellings, the field or ``kind_params.from_logits``: when both say it
        they must agree (neither wins silently); a kind without logits refuses it. Builds the kind once."""
        from scorers.kinds import make_kind

        where = "kind_params.from_logits"
        if "from_logits" in self.kind_params:
            given = self.kind_params["from_logits"]
            if not isinstance(given, bool):
                raise ValueError(f"{where}: {given!r} is not true or false")
            if "from_logits" in self.model_fields_set and given != self.from_logits:
                raise ValueError(f"from_logits = {str(self.from_logits).lower()} but {where} = {str(given).lower()}; "
                                 "set it in one place")
            self.from_logits = given
        if self.from_logits and self.kind not in FROM_LOGITS_KINDS:
            raise ValueError(f"from_logits: kind {self.kind!r} has no logits (only {', '.join(FROM_LOGITS_KINDS)} "
                             "do); remove from_logits")
        try:
            self._kind = make_kind(self.kind, self.kind_arguments())
        except ValueError as exc:
            raise ValueError(f"kind_params ({self.kind}): {exc}") from exc
        return self

    def kind_arguments(self) -> dict[str, Any]:
        """``kind_params``, and ``from_logits`` for the kinds that read it."""
        params = dict(self.kind_params)
        if self.kind in FROM_LOGITS_KINDS:
            params["from_logits"] = self.from_logits
        return params

    def output_kind(self):
        """The candidate's output kind (``scorers.kinds.OutputKind``), built once at validation."""
        return self._kind

    @field_validator("policy")
    @classmethod
    def _policy_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        from scorers.judge import JudgePolicy

        try:
            JudgePolicy.from_dict(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{exc}; see scorers.judge.JudgePolicy for the fields") from exc
        return value

    def judge_policy(self):
        from scorers.judge import JudgePolicy

        return JudgePolicy.from_dict(self.policy)


# Kinds whose answers may be logits (``from_logits``): softmax per row, or a sigmoid per label.
FROM_LOGITS_KINDS = ("classification", "multilabel")
TORCH_SUFFIXES = (".pt", ".pth", ".pt2", ".ts", ".torchscript")


def infer_runtime(path: str | Path) -> Literal["onnx", "torch"]:
    """A candidate's runtime from its file's suffix: torch for TorchScript and torch.export files, else onnx."""
    return "torch" if Path(path).suffix.lower() in TORCH_SUFFIXES else "onnx"
