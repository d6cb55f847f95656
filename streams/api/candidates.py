"""The candidate registry over the verdicts API (``/v1/candidates``): the same commands as
``shadowlens candidates`` (streams/registry/commands.py), for tools that speak HTTP.

Reads are data reads like /v1/verdicts (behind a token when the API has tokens); every write
always needs a token, as retiring a verdict does (403 while the API has no tokens). The handlers
are plain functions, so FastAPI runs them in its thread pool: each talks to Kafka in its own
event loop, never on the server's.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, ConfigDict, Field


class CandidateRequest(BaseModel):
    """``candidates add``'s fields; those left out keep the registered values."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = None
    sha256: str | None = None
    runtime: str | None = None
    kind: str | None = None
    kind_params: dict[str, Any] | None = None
    adapter: dict[str, Any] | None = None
    cast: str | None = None
    output: str | None = None
    baseline_output: str | None = None
    from_logits: bool | None = None
    policy: dict[str, Any] | None = None
    noise_reference: bool | None = None
    by: str = Field(default="", max_length=200, description="who changes it (default: an unnamed caller)")


class RegistryRetire(BaseModel):
    reason: str = Field(default="retired through the API", max_length=1000)
    by: str = Field(default="", max_length=200)


def add_routes(v1: APIRouter, settings, token_required) -> None:
    from streams.config import ConfigError
    from streams.registry.commands import add, reset, retire
    from streams.registry.store import RegistryError, describe, read_all, run

    write = [Depends(token_required("changing the candidate registry"))]
    errors = {403: {"description": "this API has no [api] tokens: writes are off"},
              422: {"description": "the change was refused; the one-line reason is the detail"}}  # fmt: skip

    def call(coro):
        try:
            return run(coro)
        except (RegistryError, ConfigError) as exc:
            status = 503 if "unreachable" in str(exc) else 404 if "not registered" in str(exc) else 422
            raise HTTPException(status_code=status, detail=" ".join(str(exc).split())) from None

    @v1.get("/candidates", tags=["candidates"])
    def list_candidates() -> list[dict]:
        """Every candidate's current version, state (refused: with the reason) and offsets."""
        specs, statuses = call(read_all(settings))
        return [describe(r, statuses.get(k), statuses.get(r.verdict_key))
                for k, r in sorted(specs.items()) if "@v" not in k]

    @v1.get("/candidates/{model}/{candidate}", tags=["candidates"])
    def show_candidate(model: str, candidate: str) -> dict:
        specs, statuses = call(read_all(settings))
        key = f"{model}/{candidate}"
        if key not in specs:
            raise HTTPException(status_code=404, detail=f"{key} is not registered")
        out = describe(specs[key], statuses.get(key), statuses.get(specs[key].verdict_key))
        out["earlier_versions"] = [describe(r, None) for k, r in sorted(specs.items()) if k.startswith(f"{key}@v")]
        return out

    @v1.post("/candidates/{model}/{candidate}", tags=["candidates"], dependencies=write, responses=errors)
    def add_candidate(model: str, candidate: str, body: CandidateRequest) -> dict:
        """Register or change a candidate (``shadowlens candidates add``). Always behind a token."""
        fields = body.model_dump(exclude={"by"})
        rec = call(add(settings, model, candidate, fields, body.by or "an unnamed caller of the API"))
        return describe(rec, None)

    @v1.post("/candidates/{model}/{candidate}/retire", tags=["candidates"], dependencies=write, responses=errors)
    def retire_candidate(model: str, candidate: str, body: RegistryRetire) -> dict:
        """Stop replaying it from the mirror's end offsets now; its verdict becomes final. Always behind a token."""
        return describe(call(retire(settings, model, candidate, body.reason, body.by or "the API")), None)

    @v1.post("/candidates/{model}/{candidate}/reset", tags=["candidates"], dependencies=write, responses=errors)
    def reset_candidate(model: str, candidate: str) -> dict:
        """Back to registered from now on (``shadowlens candidates reset``). Always behind a token."""
        return describe(call(reset(settings, model, candidate, "the API")), None)
