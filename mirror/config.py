"""Settings of a mirror client. Defaults suit production: lenient, lz4, small linger."""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from aiokafka import codec

from mirror.errors import MirrorError
from mirror.validation import ModelSignature

DEFAULT_TOPIC = "shadowlens.mirror"

_COMPRESSION_LIBS = {"gzip": codec.has_gzip, "lz4": codec.has_lz4, "zstd": codec.has_zstd, "snappy": codec.has_snappy}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class MirrorConfig:
    """How a client buffers, samples, validates and talks to Kafka.

    bootstrap: Kafka bootstrap servers, "host:port[,host:port]" (default: env KAFKA_BOOTSTRAP, else
        127.0.0.1:19092), the name the worker's config, the CLI and the README use;
        ``bootstrap_servers`` (aiokafka's name) is accepted as an alias, and readable.
    strict: raise ``MirrorError`` from ``publish`` on a bad call (development). Off by default
        (production): the call is counted as failed{reason="invalid"} and logged, rate-limited.
        Also switched on by the environment variable ``SHADOWLENS_MIRROR_STRICT=1``.
    buffer_size: records held between ``publish`` and the producer; when full, new records are
        dropped and counted. Memory bound: buffer_size x the size of one request's arrays.
    sample_rates / default_sample_rate: fraction of keys mirrored, per model name.
    signatures: optional per-model declared tensors; ``publish`` checks calls against them.
    copy_arrays: copy numpy arrays in ``publish``. Off by default: arrays are encoded later on
        the sender, so a caller that reuses (writes into) an array after publishing must turn it on.
    compression: "lz4" (default), "zstd", "gzip", "snappy" or None. lz4/zstd need ``cramjam``.
    linger_ms / max_batch_size: Kafka producer batching.
    delivery_timeout_ms: how long a record may wait for the broker before it counts as failed.
    reconnect_backoff_max_s: upper bound of the wait between reconnect attempts in an outage.
    close_timeout_s: default deadline of ``close()`` to flush what is buffered.
    log_interval_s: at most one warning per kind of problem per interval.
    registry: prometheus_client registry to export counters to (a private one when None).
    """

    bootstrap: str = field(default_factory=lambda: os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:19092"))
    topic: str = DEFAULT_TOPIC
    client_id: str = "shadowlens-mirror"
    strict: bool = field(default_factory=lambda: _env_flag("SHADOWLENS_MIRROR_STRICT"))
    buffer_size: int = 10_000
    default_sample_rate: float = 1.0
    sample_rates: Mapping[str, float] = field(default_factory=dict)
    signatures: Mapping[str, ModelSignature] = field(default_factory=dict)
    copy_arrays: bool = False
    compression: str | None = "lz4"
    linger_ms: int = 5
    max_batch_size: int = 64 * 1024
    max_request_size: int = 1024 * 1024
    delivery_timeout_ms: int = 10_000
    reconnect_backoff_max_s: float = 5.0
    close_timeout_s: float = 5.0
    log_interval_s: float = 10.0
    registry: object | None = None  # prometheus_client.CollectorRegistry

    def __post_init__(self) -> None:
        if self.buffer_size < 1:
            raise MirrorError("buffer_size", f"{self.buffer_size} is not positive", "use at least 1")
        if self.compression is not None:
            has_lib = _COMPRESSION_LIBS.get(self.compression)
            if has_lib is None:
                raise MirrorError("compression", f"{self.compression!r} is unknown",
                                  "use lz4, zstd, gzip, snappy or None")
            if not has_lib():
                raise MirrorError("compression", f"{self.compression} needs the cramjam package",
                                  "pip install cramjam, or set compression=None/'gzip'")
        for name in ("linger_ms", "max_batch_size", "delivery_timeout_ms"):
            if getattr(self, name) < 0:
                raise MirrorError(name, "must not be negative")
        if not self.topic:
            raise MirrorError("topic", "is empty", f"use e.g. {DEFAULT_TOPIC!r}")
        if not isinstance(self.bootstrap, str) or not self.bootstrap.strip():
            raise MirrorError("bootstrap", f"{self.bootstrap!r} is not a bootstrap address",
                              "pass 'host:port' (several: 'a:9092,b:9092')")

    @property
    def bootstrap_servers(self) -> str:
        """Alias of ``bootstrap`` (aiokafka's name for it)."""
        return self.bootstrap

    @bootstrap_servers.setter
    def bootstrap_servers(self, value: str) -> None:
        self.bootstrap = value

    def producer_kwargs(self) -> dict:
        """Arguments for ``aiokafka.AIOKafkaProducer`` (the design notes' delivery settings)."""
        return {
            "bootstrap_servers": self.bootstrap,
            "client_id": self.client_id,
            "acks": "all",
            "enable_idempotence": True,
            "compression_type": self.compression,
            "linger_ms": self.linger_ms,
            "max_batch_size": self.max_batch_size,
            "max_request_size": self.max_request_size,
            "request_timeout_ms": max(1, self.delivery_timeout_ms),
            "retry_backoff_ms": 100,
        }


# Accepted alias -> setting. Only names a user may reasonably reach for: aiokafka's own.
ALIASES = {"bootstrap_servers": "bootstrap"}


class MirrorSettingError(MirrorError, TypeError):
    """An unknown keyword for ``MirrorConfig`` / ``MirrorClient`` / ``AsyncMirrorClient``: one line that
    names the right settings. A ``TypeError`` too, as a wrong keyword argument always was."""


def setting_names() -> list[str]:
    return [f.name for f in fields(MirrorConfig)]


def normalize_settings(settings: Mapping[str, Any], where: str = "MirrorConfig") -> dict[str, Any]:
    """Keyword settings with aliases resolved (``bootstrap_servers`` -> ``bootstrap``); an unknown
    name, or a setting given twice under two names, raises ``MirrorSettingError`` in one line."""
    known = setting_names()
    out: dict[str, Any] = {}
    for key, value in settings.items():
        name = ALIASES.get(key, key)
        if name not in known:
            close = difflib.get_close_matches(key, [*known, *ALIASES], n=1, cutoff=0.6)
            hint = f"did you mean {ALIASES.get(close[0], close[0])}? " if close else ""
            raise MirrorSettingError(
                key, f"not a setting of {where}()",
                f"{hint}settings: {', '.join(known)} (bootstrap_servers is an alias of bootstrap)")
        if name in out and out[name] != value:
            raise MirrorSettingError(key, f"{where}() got both {name} and its alias {key}", f"pass {name} only")
        out[name] = value
    return out


_generated_init = MirrorConfig.__init__


@functools.wraps(_generated_init)
def _init(self, *args: Any, **kwargs: Any) -> None:
    _generated_init(self, *args, **normalize_settings(kwargs))


MirrorConfig.__init__ = _init  # type: ignore[method-assign]
