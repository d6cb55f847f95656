"""The candidate registry: a compacted Kafka topic is the source of truth for what is replayed.

Records and keys: schemas/registry.py. This module reads and writes the topic;
streams/registry/commands.py holds the operators' commands (``shadowlens candidates
add|retire|reset``, the same over the API) and streams/registry/follow.py follows the topic inside
the worker and hot-reloads the replay processes.

Start and stop positions are recorded in two writes, so that every replay process decides the same
way for every mirror message (no request lost, none scored twice):

1. the record is written with ``pending = true`` and acknowledged;
2. the mirror topic's end offsets are read (every message at or past them was appended after step 1);
3. the record is written again with those offsets as ``start_offsets`` (or ``stop_offsets``).

A replay process catches up with the registry topic before each micro-batch; a message past the
end offsets of step 2 was appended after step 1, so the process knows of the record, and while a
record is pending it waits (``/readyz`` says so) until its offsets arrive. Then the candidate is
scored for the message iff ``record.scores(partition, offset)``.

What wins: the TOML's ``[[candidates]]`` are written to an empty registry by the first worker start;
from then on the registry wins (a candidate added to the TOML later is only logged: add it with
``shadowlens candidates add``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from schemas import describe_validation_error
from schemas.registry import STATUS_SUFFIX, VERDICT_SUFFIX, CandidateRecord, CandidateStatus, CandidateVerdict
from streams.config import CandidateConfig, ConfigError, Settings

log = logging.getLogger("shadowlens.registry")
# Fields of a record an operator may give to `add`; the others are the registry's own.
SPEC_FIELDS = ("path", "sha256", "runtime", "kind", "kind_params", "adapter", "cast", "output", "baseline_output",
               "from_logits", "policy", "noise_reference")  # fmt: skip


class RegistryError(ValueError):
    """An operator's registry command cannot be done; the message is one line naming cause and fix."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def local_path(path: str) -> Path:
    """The artifact's local path; ``file://`` is a local path too. Other URIs are refused: nothing
    here fetches artifacts (mount them, or copy them to every replay box)."""
    if path.startswith("file://"):
        return Path(path[len("file://"):])
    if "://" in path:
        raise RegistryError(f"path {path!r}: only local files (or file:// paths) can be registered; copy or mount "
                            "the artifact on every replay machine and register its path")  # fmt: skip
    return Path(path)


def record_from_config(cfg: CandidateConfig, by: str = "config seed") -> CandidateRecord:
    """A TOML candidate as the registry's version 1, scored from the start of every partition."""
    return CandidateRecord(
        model=cfg.model, candidate=cfg.name, path=str(cfg.path), sha256=sha256_file(cfg.path), runtime=cfg.runtime,
        kind=cfg.kind, kind_params=dict(cfg.kind_params), adapter=cfg.adapter.model_dump(exclude_defaults=True),
        cast=cfg.cast, output=cfg.output, baseline_output=cfg.baseline_output, from_logits=cfg.from_logits,
        policy=dict(cfg.policy), noise_reference=cfg.noise_reference, updated_by=by,
    )  # fmt: skip


def config_from_record(rec: CandidateRecord, need_file: bool = True) -> CandidateConfig:
    """The record as the worker's candidate, named by its pair id. Raises ``ConfigError`` (one line).
    ``need_file=False`` (the judge, which may run where the artifact is not): the file is not checked."""
    data = {"name": rec.pair, "model": rec.model, "path": str(local_path(rec.path)), "runtime": rec.runtime,
            "kind": rec.kind, "kind_params": rec.kind_params, "adapter": rec.adapter, "cast": rec.cast,
            "output": rec.output, "baseline_output": rec.baseline_output, "policy": rec.policy,
            "noise_reference": rec.noise_reference}  # fmt: skip
    if "from_logits" not in rec.kind_params:
        data["from_logits"] = rec.from_logits
    try:
        if need_file:
            return CandidateConfig.model_validate(data)
        # Validated against the artifact's path only where it is loaded; the rest as a replay box would.
        with _placeholder() as stand_in:
            cfg = CandidateConfig.model_validate({**data, "path": stand_in})
        return cfg.model_copy(update={"path": Path(data["path"])})
    except ValidationError as exc:
        raise ConfigError(f"candidate {rec.key} v{rec.version}: {describe_validation_error(exc)}") from exc


class _placeholder:
    """An empty file standing in for an artifact the judge's machine need not have."""

    def __enter__(self) -> str:
        import tempfile

        self.f = tempfile.NamedTemporaryFile(suffix=".onnx")
        return self.f.name

    def __exit__(self, *exc) -> None:
        self.f.close()


def decode(key: bytes | None, value: bytes | None) -> tuple[str, CandidateRecord | CandidateStatus | None] | None:
    """(key, record) of one registry message; None for a foreign or unreadable one (logged)."""
    if key is None:
        return None
    text = key.decode(errors="replace")
    if value is None:
        return text, None
    try:
        if text.endswith(STATUS_SUFFIX):
            return text, CandidateStatus.model_validate_json(value)
        if text.endswith(VERDICT_SUFFIX):
            return text, CandidateVerdict.model_validate_json(value)
        return text, CandidateRecord.model_validate_json(value)
    except ValidationError as exc:
        log.error("registry record %s skipped: %s (written by a newer shadowlens?)", text, describe_validation_error(exc))
        return None


async def read_all(settings: Settings) -> tuple[dict[str, CandidateRecord], dict[str, CandidateStatus]]:
    """Every record of the registry topic, the last per key: (specs by key, statuses by spec key)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap, enable_auto_commit=False,
                                request_timeout_ms=15000)  # fmt: skip
    specs: dict[str, CandidateRecord] = {}
    statuses: dict[str, CandidateStatus] = {}
    await _start(consumer)
    try:
        # Never created by reading it: a broker that auto-creates topics would make it uncompacted.
        if settings.kafka.candidates_topic not in await consumer.topics():
            raise RegistryError(f"the candidate registry topic {settings.kafka.candidates_topic!r} does not exist on "
                                f"{settings.kafka.bootstrap}: start a worker once (it creates the topics and seeds "
                                "the registry from the config), or fix [kafka] candidates_topic")  # fmt: skip
        tp = TopicPartition(settings.kafka.candidates_topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        while await consumer.position(tp) < end:
            for msgs in (await consumer.getmany(timeout_ms=1000)).values():
                for m in msgs:
                    apply(specs, statuses, decode(m.key, m.value))
    finally:
        await consumer.stop()
    return specs, statuses


def apply(specs: dict, statuses: dict, item) -> None:
    if item is None:
        return
    key, rec = item
    if key.endswith(VERDICT_SUFFIX):  # kept whole: statuses[record.verdict_key] (never a spec)
        statuses.pop(key, None) if rec is None else statuses.__setitem__(key, rec)
    elif key.endswith(STATUS_SUFFIX):
        statuses.pop(key[: -len(STATUS_SUFFIX)], None) if rec is None else statuses.__setitem__(
            key[: -len(STATUS_SUFFIX)], rec)  # fmt: skip
    elif rec is None:
        specs.pop(key, None)
    else:
        specs[key] = rec


async def write(settings: Settings, records: list[tuple[str, Any]]) -> None:
    """Write records (acknowledged by every in-sync replica), in order."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap, acks="all", enable_idempotence=True,
                                request_timeout_ms=15000)  # fmt: skip
    await _start(producer)
    try:
        for key, rec in records:
            await (await producer.send(settings.kafka.candidates_topic, key=key.encode(),
                                       value=rec.model_dump_json().encode(), partition=0))  # fmt: skip
    finally:
        await producer.stop()


async def _start(client) -> None:
    """Start an aiokafka client; one that cannot start is closed again (no 'Unclosed' warning)."""
    try:
        await client.start()
    except BaseException:
        await client.stop()
        raise


async def mirror_end_offsets(settings: Settings) -> dict[int, int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap, request_timeout_ms=15000)
    await _start(consumer)
    try:
        parts = consumer.partitions_for_topic(settings.kafka.topic) or set()
        if not parts:
            await consumer._client.force_metadata_update()  # noqa: SLF001 - a fresh client knows no topics yet
            parts = consumer.partitions_for_topic(settings.kafka.topic) or set()
        if not parts:
            raise RegistryError(f"mirror topic {settings.kafka.topic!r} does not exist on {settings.kafka.bootstrap}; "
                                "start a worker once (it creates the topics) or fix [kafka] topic")  # fmt: skip
        ends = await consumer.end_offsets([TopicPartition(settings.kafka.topic, p) for p in sorted(parts)])
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        await consumer.stop()


async def recorded(settings: Settings, pending: list[tuple[str, CandidateRecord]], start: list[str],
                    stop: list[str]) -> dict[str, CandidateRecord]:  # fmt: skip
    """The module docstring's three steps: ``pending`` written, the mirror's end offsets read, then
    the same records with those offsets as start (keys in ``start``) or stop (keys in ``stop``)."""
    await write(settings, [(k, r.model_copy(update={"pending": True})) for k, r in pending])
    ends = await mirror_end_offsets(settings)
    done = {}
    for key, rec in pending:
        update: dict[str, Any] = {"pending": False}
        if key in start:
            update["start_offsets"] = dict(ends)
        if key in stop:
            update["stop_offsets"] = dict(ends)
        done[key] = rec.model_copy(update=update)
    await write(settings, list(done.items()))
    return done


async def seed(settings: Settings) -> int:
    """Write the TOML's candidates into an empty registry (the first start); returns how many.
    Later starts only log TOML candidates the registry lacks (the registry wins)."""
    specs, _ = await read_all(settings)
    if specs:
        known = {(r.model, r.candidate) for r in specs.values()}
        for cfg in settings.candidates:
            if (cfg.model, cfg.name) not in known:
                log.warning("candidate %s/%s is in the config but not in the registry %s, which wins after the "
                            "first start: add it with `shadowlens candidates add`", cfg.model, cfg.name,
                            settings.kafka.candidates_topic)  # fmt: skip
        return 0
    await write(settings, [(f"{c.model}/{c.name}", record_from_config(c)) for c in settings.candidates])
    log.info("seeded the candidate registry %s with the config's %d candidates", settings.kafka.candidates_topic,
             len(settings.candidates))  # fmt: skip
    return len(settings.candidates)


def effective_state(rec: CandidateRecord, status: CandidateStatus | None,
                    verdict: CandidateVerdict | None = None) -> str:  # fmt: skip
    """The state to show: the operator's, refined by what the replay processes report for this
    version, then by the judge's verdict (promoted / rolled_back); retired and refused always win."""
    state = rec.state
    if rec.state == "registered" and status is not None and status.version == rec.version:
        state = status.state
    live = state in ("registered", "loading", "shadowing") and verdict is not None and verdict.version == rec.version
    return verdict.state if live and verdict.state != "shadowing" else state


def describe(rec: CandidateRecord, status: CandidateStatus | None, verdict: CandidateVerdict | None = None) -> dict:
    """A record as ``candidates show`` and the API print it."""
    out = json.loads(rec.model_dump_json())
    out["pair"] = rec.pair
    out["state"] = effective_state(rec, status, verdict)
    if status is not None and status.version == rec.version and status.state == "refused":
        out["reason"] = status.reason
    if status is not None:
        out["status"] = json.loads(status.model_dump_json())
    if verdict is not None and verdict.version == rec.version:
        out["verdict_state"] = json.loads(verdict.model_dump_json())
    return out


def run(coro):
    """A registry command from synchronous code (the CLI, the API's thread pool): Kafka's failures as
    one line."""
    from aiokafka.errors import KafkaError

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # it logs each failed connection; we say it once
    try:
        return asyncio.run(coro)
    except KafkaError as exc:
        raise RegistryError(f"the registry on Kafka is unreachable ({exc}); is a broker "
                            "running at [kafka] bootstrap? (bash scripts/kafka.sh start)") from exc
