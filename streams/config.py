"""Worker configuration: one TOML file, validated by pydantic, overridable by environment.

Environment wins over the file: ``KAFKA_BOOTSTRAP`` and ``SHADOWLENS_CLICKHOUSE_DSN`` are read
directly (they are what compose.yaml and CI set); any other field can be set as
``SHADOWLENS_<SECTION>__<FIELD>`` (e.g. ``SHADOWLENS_WINDOWS__SIZE_S=30``).

Why not pydantic-settings: its environment source cannot alias a nested field to an unprefixed
variable (``KAFKA_BOOTSTRAP`` -> ``kafka.bootstrap``), and model paths must resolve against the
config file's folder; the twenty lines below do both with plain pydantic validation.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from schemas import describe_validation_error
from streams.candidate_config import CandidateConfig, Section
from streams.config_tokens import long_tokens, split_tokens
from streams.ingest.config import IngestConfig


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or invalid; the message names the field."""




class KafkaConfig(Section):
    bootstrap: str = "127.0.0.1:19092"
    topic: str = "shadowlens.mirror"
    dead_letter_topic: str = "shadowlens.mirror.dlq"
    group_id: str = "shadowlens-worker"
    partitions: int = Field(default=4, ge=1, description="partitions of topics the worker creates")
    session_timeout_s: float = Field(
        default=30.0, ge=6, description="a worker silent this long leaves the group; its partitions move"
    )
    diffs_topic_name: str = Field(
        default="", alias="diffs_topic", description="internal: replay stage -> judge stage; empty: '<topic>.diffs'"
    )
    diffs_partitions: int = Field(default=4, ge=1, description="judge processes scale up to this many")
    judge_group_id: str = Field(default="", description="judge consumer group; empty: '<group_id>-judge'")
    progress_interval_s: float = Field(default=1.0, gt=0, description="how often replay reports its progress")
    exactly_once: bool = Field(
        default=True,
        description="replay writes diffs and dead letters and commits its mirror offsets in one Kafka transaction; "
        "read the dead-letter topic with isolation.level=read_committed",
    )
    transaction_timeout_s: float = Field(
        default=10.0, ge=1, description="a replay process killed mid-batch holds its partitions' readers this long"
    )

    @property
    def diffs_topic(self) -> str:
        return self.diffs_topic_name or f"{self.topic}.diffs"

    candidates_topic_name: str = Field(default="", alias="candidates_topic",
                                       description="the candidate registry (compacted); empty: '<topic>.candidates'")

    @property
    def candidates_topic(self) -> str:
        return self.candidates_topic_name or f"{self.topic}.candidates"

    @property
    def judge_group(self) -> str:
        return self.judge_group_id or f"{self.group_id}-judge"

    @property
    def changelog_topic(self) -> str:
        return f"{self.judge_group}-pair-state"


class ClickHouseConfig(Section):
    dsn: str = Field(default="chdb:///./shadowlens-data/chdb", description="chdb:///path or http://host:8123")
    database: str = "shadowlens"
    retention_days: int = Field(default=30, ge=1, description="request_diffs rows older than this are dropped (TTL)")
    insert_linger_s: float = Field(
        default=0.25, ge=0,
        description="the judge gathers diff records this long (or 64 records) before one insert: fewer, larger inserts",
    )  # fmt: skip

    @field_validator("dsn")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(("chdb:", "http://", "https://")):
            raise ValueError(f"{value!r}: use chdb:///<data dir> (embedded) or http(s)://host:8123 (server)")
        return value


class WindowConfig(Section):
    size_s: float = Field(default=60.0, gt=0, description="tumbling window length, event time")
    grace_s: float = Field(default=5.0, ge=0, description="how late an event may be before its window closes")
    idle_close_s: float = Field(default=10.0, gt=0, description="close open windows after this long without events")
    dedup_horizon_s: float = Field(default=3600.0, gt=0, description="how long request ids are remembered")
    partition_idle_s: float = Field(
        default=30.0, gt=0, description="a mirror partition read to its end and silent this long stops holding windows open; "
        "also how long idle closing waits after a broker outage, while producers flush what they buffered"
    )
    max_open_windows: int = Field(default=16, ge=1, description="per pair; beyond it the oldest close early (logged)")
    progress_fresh_s: float = Field(
        default=5.0, gt=0, description="replay reports older than this mean 'maybe lagging': no idle closing"
    )


class ReplayConfig(Section):
    # 1,024: each micro-batch is one Kafka transaction (its diffs, dead letters and offsets) and one
    # judge record per candidate; with 256 the transactions' round trips and per-batch costs held
    # one replay + one judge process near 7,000-8,700 requests/s end to end, with 1,024 at
    # 12,000-13,400 (bench/bench_stages.py, README). In bytes a batch is bounded by what the
    # consumer holds fetched (streams.kafka_io: 16 MiB a partition, 64 MiB a fetch), so big
    # tensors make smaller batches whatever this says; lower it if a candidate's memory is short.
    batch_size: int = Field(default=2048, ge=1, description="micro-batch size (requests)")
    batch_within_s: float = Field(default=0.5, gt=0, description="flush a partial micro-batch after this long")
    timing: Literal["sampled", "per_request", "batched"] = Field(
        default="sampled",
        description="'sampled': one batched call per micro-batch and candidate, and a sample of the requests "
        "(timing_sample) also run alone and timed, the others' latency NaN; 'per_request': every request run "
        "alone and timed; 'batched': one call, each request attributed the batch time / its rows",
    )
    timing_sample: float = Field(
        default=0.02, ge=0, le=1,
        description="sampled timing: the fraction of requests also run alone and timed, chosen by request id "
        "hash (the same requests for every candidate and the noise reference, and on redelivery)",
    )  # fmt: skip
    timing_min_per_window: int = Field(
        default=1, ge=0,
        description="sampled timing: at least this many requests of each event-time window in each micro-batch "
        "are timed (the next id hashes above the sample's), so every window has latencies",
    )  # fmt: skip
    providers: list[str] = Field(
        default_factory=list,
        description="onnxruntime providers; empty = CUDA if present else CPU. torch candidates run on CUDA when "
        "torch sees a device and this is empty or lists CUDAExecutionProvider",
    )  # fmt: skip


class ApiConfig(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    tokens: list[str] = Field(
        default_factory=list,
        description="bearer tokens accepted on /v1 (several: rotation). Empty: reads need none (loopback only, "
        "unless insecure), SQL and retiring are off. Env: SHADOWLENS_API_TOKENS=a,b",
    )
    insecure: bool = Field(
        default=False,
        description="listen on a non-loopback host without tokens, on purpose (a network where every client is "
        "trusted); /v1/query and retiring still need a token",
    )
    stale_after_windows: float = Field(
        default=3.0, gt=0,
        description="a promote or hold older than this many windows is served as hold (stale); a rollback stands",
    )  # fmt: skip
    refresh_s: float = Field(default=2.0, gt=0, description="standalone API: how often it re-reads the verdicts")
    analyst_rows_per_s: int = Field(
        default=1_000_000, ge=0,
        description="chDB: analyst queries (/v1/query) read at most this many rows a second, so they leave the "
        "worker's cores to ingestion; a query needing more than 10 s of it is cut at the 10 s cap. 0: no budget",
    )  # fmt: skip

    _split = field_validator("tokens", mode="before")(split_tokens)
    _long_enough = field_validator("tokens")(long_tokens)

    def exposure_problem(self) -> str | None:
        """Why this API must not start listening, or None: verdicts and windows served without a token
        to anyone who can reach a non-loopback address is an accident far more often than a choice,
        so the choice is a setting of its own (``insecure``)."""
        if self.tokens or self.insecure or _is_loopback(self.host):
            return None
        return (f"[api] host = {self.host!r} is reachable from other machines and [api] tokens is empty, so "
                "anyone who reaches it could read verdicts and window statistics; set [api] tokens (or "
                "SHADOWLENS_API_TOKENS, e.g. from openssl rand -hex 24), listen on 127.0.0.1, or set "
                "[api] insecure = true on a network you trust")  # fmt: skip


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


class MetricsConfig(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=9464, ge=0, le=65535,
                      description="Prometheus /metrics of this process (0: any free port, logged); one per process")
    progress_s: float = Field(default=30.0, gt=0, description="a progress line in the log this often")
    no_traffic_warn_s: float = Field(default=120.0, gt=0,
                                     description="warn when nothing arrived on the mirror topic for this long")


class Settings(Section):
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    clickhouse: ClickHouseConfig = Field(default_factory=ClickHouseConfig)
    windows: WindowConfig = Field(default_factory=WindowConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    candidates: list[CandidateConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Settings:
        seen = set()
        for c in self.candidates:
            if (c.model, c.name) in seen:
                raise ValueError(f"candidates: ({c.model}, {c.name}) appears twice; names must be unique per model")
            seen.add((c.model, c.name))
        return self


def load_settings(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Read TOML (if given), apply environment and explicit overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"{p}: no such config file") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML ({exc})") from exc
        base = p.parent  # paths in the file are relative to the file: models, and a relative chDB path
        for cand in data.get("candidates", []):
            if isinstance(cand, dict) and "path" in cand and not Path(cand["path"]).is_absolute():
                cand["path"] = str(base / cand["path"])
        ch = data.get("clickhouse")
        if isinstance(ch, dict) and isinstance(ch.get("dsn"), str) and ch["dsn"].startswith("chdb:///."):
            ch["dsn"] = "chdb://" + str((base / ch["dsn"][len("chdb:///"):]).resolve())
    env = _env_overrides()
    _merge(data, env)
    _merge(data, overrides or {})
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{_blame(exc, env, path)}: {describe_validation_error(exc)}") from exc


def _blame(exc: ValidationError, env: dict[str, Any], path) -> str:
    """Name where the bad value came from: an environment variable or the file."""
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ())]
        if len(loc) >= 2 and isinstance(env.get(loc[0]), dict) and loc[1] in env[loc[0]]:
            special = {("kafka", "bootstrap"): "KAFKA_BOOTSTRAP or SHADOWLENS_KAFKA__BOOTSTRAP",
                       ("api", "tokens"): "SHADOWLENS_API_TOKENS", ("clickhouse", "dsn"): "SHADOWLENS_CLICKHOUSE_DSN"}
            name = special.get((loc[0], loc[1]), f"SHADOWLENS_{loc[0].upper()}__{loc[1].upper()}")
            return f"environment variable {name} (not {path or 'the config file'})"
    return str(path or "config")


def _env_overrides() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in os.environ.items():
        if key.startswith("SHADOWLENS_") and "__" in key:
            section, _, field = key[len("SHADOWLENS_") :].lower().partition("__")
            out.setdefault(section, {})[field] = value
    if os.environ.get("KAFKA_BOOTSTRAP"):
        out.setdefault("kafka", {})["bootstrap"] = os.environ["KAFKA_BOOTSTRAP"]
    if os.environ.get("SHADOWLENS_API_TOKENS"):
        out.setdefault("api", {})["tokens"] = os.environ["SHADOWLENS_API_TOKENS"]
    if os.environ.get("SHADOWLENS_CLICKHOUSE_DSN"):
        out.setdefault("clickhouse", {})["dsn"] = os.environ["SHADOWLENS_CLICKHOUSE_DSN"]
    return out


def _merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
