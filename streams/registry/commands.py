"""The operators' commands on the candidate registry: ``shadowlens candidates add|retire|reset`` and
the same over the API. Each reads the registry, decides, and writes through
streams/registry/store.py's two-step ``recorded`` (start and stop offsets, see there)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from schemas import describe_validation_error
from schemas.registry import STATUS_SUFFIX, CandidateRecord, CandidateStatus
from streams.config import ConfigError, Settings
from streams.registry.store import (RegistryError, config_from_record, effective_state, local_path, read_all,
                                    recorded, sha256_file, write)  # fmt: skip


def _validated(rec: CandidateRecord) -> CandidateRecord:
    try:
        config_from_record(rec)
    except ConfigError as exc:
        raise RegistryError(f"{exc}") from exc
    return rec


async def add(settings: Settings, model: str, candidate: str, fields: dict[str, Any], by: str) -> CandidateRecord:
    """Register a candidate, or change one: fields left out keep the registered values. A change of
    what replay depends on (artifact, SHA-256, runtime, kind, adapter, cast, outputs) is a new
    version scored from now on (the old version stops at the same offsets); a policy change alone is
    a new policy version and leaves the offsets as they are."""
    fields = {k: v for k, v in fields.items() if v is not None}
    key = f"{model}/{candidate}"
    specs, _ = await read_all(settings)
    old = specs.get(key)
    if old is None and "path" not in fields:
        raise RegistryError(f"{key} is not registered: give --path (the artifact) to add it")
    if "path" in fields:
        path = local_path(str(fields["path"]))
        if not path.is_file():
            raise RegistryError(f"{path}: no such artifact file; build it or fix --path")
        fields["path"] = str(path.resolve())
        fields.setdefault("sha256", sha256_file(path))
        if "runtime" not in fields:
            from streams.candidate_config import infer_runtime

            fields["runtime"] = infer_runtime(path)
    if "sha256" in fields:
        fields["sha256"] = str(fields["sha256"]).lower()
    now = datetime.now(UTC)
    base = {} if old is None else old.model_dump(exclude={"updated_at", "updated_by", "reason", "pending"})
    try:
        new = CandidateRecord.model_validate({**base, "model": model, "candidate": candidate, **fields,
                                              "updated_at": now, "updated_by": by})  # fmt: skip
    except ValidationError as exc:
        raise RegistryError(f"{key}: {describe_validation_error(exc)}") from exc
    _validated(new)
    if old is None:
        new = new.model_copy(update={"state": "registered", "version": 1, "stop_offsets": None})
        return (await recorded(settings, [(key, new)], start=[key], stop=[]))[key]
    if old.pending:
        raise RegistryError(f"{key} has pending offsets (an earlier command stopped half-way): run "
                            f"`shadowlens candidates reset --model {model} --candidate {candidate}` first")  # fmt: skip
    if new.replay_spec() == old.replay_spec() and old.state not in ("retired", "refused"):
        if new.policy == old.policy:
            return old
        changed = new.model_copy(update={"policy_version": old.policy_version + 1, "state": old.state})
        await write(settings, [(key, changed)])
        return changed
    return await _new_version(settings, old, new)


async def _new_version(settings: Settings, old: CandidateRecord, new: CandidateRecord) -> CandidateRecord:
    """``new`` as version old+1 from now on; the old version kept under ``<key>@v<N>``, stopped at
    the same offsets (if it was still scored)."""
    key = old.key
    nxt = new.model_copy(update={"version": old.version + 1, "state": "registered", "stop_offsets": None,
                                 "start_offsets": {}, "reason": ""})  # fmt: skip
    old_key = f"{key}@v{old.version}"
    kept = old if old.state == "retired" else old.model_copy(update={
        "state": "retired", "reason": f"superseded by version {nxt.version}", "updated_at": nxt.updated_at,
        "updated_by": nxt.updated_by})  # fmt: skip
    # Still scored: it stops where the new one starts; already stopped: kept as it is, under its own key.
    done = await recorded(settings, [(old_key, kept), (key, nxt)], start=[key],
                           stop=[old_key] if old.stop_offsets is None else [])  # fmt: skip
    return done[key]


async def retire(settings: Settings, model: str, candidate: str, reason: str, by: str) -> CandidateRecord:
    """Stop replaying the candidate from the mirror's end offsets now on; its data stays, and the
    judge that owns the pair makes its verdict final (streams/judge/retire.py's retirement)."""
    key = f"{model}/{candidate}"
    specs, _ = await read_all(settings)
    old = specs.get(key)
    if old is None:
        raise RegistryError(f"{key} is not registered; `shadowlens candidates list` shows what is")
    if old.state == "retired" and not old.pending:
        return old
    rec = old.model_copy(update={"state": "retired", "reason": reason or "retired by an operator",
                                 "updated_at": datetime.now(UTC), "updated_by": by})  # fmt: skip
    if old.stop_offsets is not None:
        await write(settings, [(key, rec)])
        return rec
    return (await recorded(settings, [(key, rec)], start=[], stop=[key]))[key]


async def reset(settings: Settings, model: str, candidate: str, by: str) -> CandidateRecord:
    """Back to registered, scored from now on: a refused candidate keeps its version (it was never
    scored); a retired one becomes a new version (its old evidence is never mixed with the new);
    a pending one (a command stopped between its two writes) gets its offsets now."""
    key = f"{model}/{candidate}"
    specs, statuses = await read_all(settings)
    old = specs.get(key)
    if old is None:
        raise RegistryError(f"{key} is not registered; `shadowlens candidates list` shows what is")
    if old.pending:
        which = "stop" if old.state == "retired" else "start"
        return (await recorded(settings, [(key, old)], start=[key] if which == "start" else [],
                                stop=[key] if which == "stop" else []))[key]  # fmt: skip
    now = datetime.now(UTC)
    if old.state == "retired":
        return await _new_version(settings, old, old.model_copy(update={"updated_at": now, "updated_by": by}))
    status = statuses.get(key)
    if old.state != "refused" and not (status and status.version == old.version and status.state == "refused"):
        raise RegistryError(f"{key} is {effective_state(old, status)}: reset clears a refused or retired candidate")
    rec = old.model_copy(update={"state": "registered", "reason": "", "stop_offsets": None, "updated_at": now,
                                 "updated_by": by})  # fmt: skip
    await write(settings, [(f"{key}{STATUS_SUFFIX}", CandidateStatus(model=model, candidate=candidate,
                                                                     version=old.version, state="loading",
                                                                     reason="reset by " + by))])  # fmt: skip
    return (await recorded(settings, [(key, rec)], start=[key], stop=[]))[key]
