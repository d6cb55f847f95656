"""The judge's policy: pre-registered margins, levels and cluster settings (``JudgePolicy``), and its
defaults as one table (the README's, and the block ``shadowlens init`` writes). How they are used:
scorers/judge.py."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Literal

from scorers.metric_bounds import ABS_DELTA, ACCURACY, ERROR, FLIP

MEDIAN_Q = 0.5


def latency_metric_name(q: float) -> str:
    """``latency_p99_ratio`` for q = 0.99, ``latency_p999_ratio`` for 0.999."""
    return f"latency_p{q * 100:g}_ratio".replace(".", "")


LATENCY_MEDIAN = latency_metric_name(MEDIAN_Q)  # "latency_p50_ratio"


def _doc(meaning: str, example: str | None = None) -> dict:
    """Field metadata: what the field means (the README table and ``shadowlens init`` print it) and,
    for a field unset by default, a TOML example of setting it."""
    return {"doc": meaning, **({"example": example} if example is not None else {})}


@dataclass(frozen=True)
class JudgePolicy:
    """Pre-registered margins and levels. A margin of None switches that metric off.

    Every field's meaning is in its metadata: ``policy_defaults_table()`` prints them (the README's
    table), and ``shadowlens init`` writes the same defaults into the config it starts.
    """

    label_flip_rate_margin: float | None = field(default=0.02, metadata=_doc(
        "share of scored requests whose top class changes, minus the noise floor"))
    abs_confidence_delta_margin: float | None = field(default=0.05, metadata=_doc(
        "mean |candidate - baseline probability of the baseline's top class|, minus the noise floor"))
    latency_p99_ratio_margin: float | None = field(default=1.5, metadata=_doc(
        "candidate / baseline latency at `latency_quantile` (the metric is named `latency_p<q>_ratio`)"))
    latency_quantile: float = field(default=0.99, metadata=_doc("the latency quantile compared"))
    latency_p50_ratio_margin: float | None = field(default=1.5, metadata=_doc(
        "candidate / baseline median latency (`latency_p50_ratio`), judged like the tail quantile's ratio: "
        "a candidate slower over its whole distribution is caught here even when per-execution spikes "
        "(GC pauses, queueing) keep the tail's ratio undecided"))
    latency_gates_without_reference: bool = field(default=False, metadata=_doc(
        "without a replayed baseline (a `noise_reference` candidate of the same model, judged by the same "
        "process) latency is compared with production's recorded latency, measured on other hardware and "
        "another path: reported only, never a rollback or a held promote. `true`: it gates all the same"))
    accuracy_drop_margin: float | None = field(default=0.01, metadata=_doc(
        "baseline accuracy - candidate accuracy on the labelled requests (paired, McNemar's discordant cells)"))
    min_labelled: int = field(default=200, metadata=_doc(
        "labelled requests before `accuracy_drop` gates (reported only before)"))
    max_error_rate: float = field(default=0.01, metadata=_doc(
        "candidate errors / requests: the margin of `error_rate`"))
    min_samples: int = field(default=500, metadata=_doc("scored requests in closed clusters before any promote"))
    max_missing_fraction: float = field(default=0.05, metadata=_doc(
        "tolerated share of requests missing (sample ratio), not comparable (dead letters), or without a "
        "latency while latency gates; beyond it the verdict holds on data quality"))
    alpha: float = field(default=0.05, metadata=_doc(
        "error level: alpha / 2 for rollbacks (split over the rollback-capable metrics), alpha / 2 for promotes"))
    critical: tuple[str, ...] = field(default=(ERROR,), metadata=_doc(
        "metrics that roll back even while a data check fails"))
    gating: tuple[str, ...] | None = field(default=None, metadata=_doc(
        "metrics that decide the verdict; unset: every configured metric", '["error_rate", "label_flip_rate"]'))
    slice_min_samples: int = field(default=100, metadata=_doc("scored requests of a slice before it is flagged"))
    slice_alpha: float | None = field(default=None, metadata=_doc(
        "false discovery rate of slice flags (e-BH); unset: alpha / 2", "0.025"))
    slice_failure_verdict: Literal["hold", "rollback"] = field(default="hold", metadata=_doc(
        "the verdict while a slice is flagged: `hold` or `rollback`"))
    max_worst_slices: int = field(default=5, metadata=_doc("slices listed in a verdict"))
    slice_min_share: float = field(default=0.02, metadata=_doc(
        "slices with at least this share of the scored requests hold a promote until ..."))
    slice_promote_factor: float = field(default=2.0, metadata=_doc(
        "... their flip rate's upper bound is under this many times the margin"))
    min_span_s: float = field(default=0.0, metadata=_doc(
        "seconds of event time observed before a non-critical rollback, and during which every gating metric "
        "must have passed at every look before a promote (one traffic cycle: 86400)"))
    cluster_key_attribute: str | None = field(default=None, metadata=_doc(
        "the request attribute whose value is the cluster key (e.g. a session id); unset: the record's "
        "`sample_key`, else the input's fingerprint", '"session"'))
    cluster_gap_s: float = field(default=60.0, metadata=_doc(
        "a pause longer than this ends a cluster (requests of one key within it are judged as one dependent unit)"))
    cluster_cap: int = field(default=32, metadata=_doc(
        "at most this many requests per cluster; a longer one is cut (dependence across the cut is not covered)"))
    cluster_max_open: int = field(default=2048, metadata=_doc(
        "open clusters kept per pair (48 bytes each in the state); beyond, the least recently active close early"))

    def __post_init__(self) -> None:
        if not 1 <= self.cluster_cap <= 1024:
            raise ValueError(f"cluster_cap must be within 1..1024, not {self.cluster_cap}")
        if self.cluster_gap_s < 0 or self.cluster_max_open < 1:
            raise ValueError("cluster_gap_s must be >= 0 and cluster_max_open >= 1")
        if self.latency_quantile == MEDIAN_Q and self.latency_p50_ratio_margin is not None:
            raise ValueError("latency_quantile = 0.5 is the median, already judged as latency_p50_ratio "
                             "(latency_p50_ratio_margin): set latency_quantile to a tail quantile such as 0.99")

    @classmethod
    def from_dict(cls, d: dict) -> JudgePolicy:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown judge policy keys: {unknown}; known: {sorted(known)}")
        d = dict(d)
        for k in ("critical", "gating"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def latency_metric(self) -> str:
        """The tail quantile's ratio (``latency_quantile``); the median's is ``LATENCY_MEDIAN``."""
        return latency_metric_name(self.latency_quantile)

    def latency_metrics(self) -> dict[str, tuple[float, float]]:
        """Configured latency metrics, tail first: name -> (quantile, margin)."""
        m = [(self.latency_metric, (self.latency_quantile, self.latency_p99_ratio_margin)),
             (LATENCY_MEDIAN, (MEDIAN_Q, self.latency_p50_ratio_margin))]
        return {k: v for k, v in m if v[1] is not None}

    def margins(self) -> dict[str, float]:
        m = {ERROR: self.max_error_rate, FLIP: self.label_flip_rate_margin, ABS_DELTA: self.abs_confidence_delta_margin,
             **{k: v[1] for k, v in self.latency_metrics().items()}, ACCURACY: self.accuracy_drop_margin}
        return {k: v for k, v in m.items() if v is not None}

    def gating_metrics(self) -> tuple[str, ...]:
        return tuple(self.margins()) if self.gating is None else tuple(g for g in self.gating if g in self.margins())

    def rollback_alpha(self) -> float:
        """Per-metric level of each lower bound: alpha / 2 over the K rollback-capable metrics."""
        k = len(set(self.gating_metrics()) | (set(self.critical) & set(self.margins())))
        return self.alpha / 2 / max(k, 1)

    def promote_alpha(self) -> float:
        return self.alpha / 2


def toml_value(value) -> str:
    """A policy value as TOML (what a config file would say)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def policy_defaults() -> list[tuple[str, str | None, str, str | None]]:
    """(field, default as TOML or None when unset, meaning, TOML example for an unset field) of every
    ``JudgePolicy`` field, in declaration order: the one source of the README's table and of the
    policy block ``shadowlens init`` writes."""
    out = []
    for f in fields(JudgePolicy):
        default = None if f.default is None else toml_value(f.default)
        out.append((f.name, default, f.metadata["doc"], f.metadata.get("example")))
    return out


def policy_defaults_table() -> str:
    """The markdown table of every ``JudgePolicy`` field, its default and meaning (the README's)."""
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for name, default, doc, _ in policy_defaults():
        shown = "unset" if default is None else f"`{default}`"
        rows.append(f"| `{name}` | {shown} | {doc.replace('|', chr(92) + '|')} |")
    return "\n".join(rows) + "\n"
