"""Verdicts API: read-only HTTP for promotion gates and people.

Argo Rollouts' ``web`` metric provider treats a non-2xx answer as a measurement *error*, not a
failure, so a known pair always answers 200 with the verdict in the body and gates key on
``result.verdict``; an unknown pair is 404. The typed core is ``ClickHouseSink``; this module
is only the transport.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Response
from pydantic import BaseModel

from schemas import Verdict, WindowSummary
from streams.sink import ClickHouseSink


class Health(BaseModel):
    status: str


def create_app(sink: ClickHouseSink, health: Any = None) -> FastAPI:
    """``health``: the worker's ``streams.kafka_io.Health`` when served from a worker process."""
    app = FastAPI(
        title="shadowlens verdicts API",
        version="1",
        description="Latest promote / hold / rollback verdict per (model, candidate), with its evidence.",
    )

    @app.get("/healthz", response_model=Health, tags=["ops"])
    def healthz() -> Health:
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, tags=["ops"])
    def readyz() -> Health:
        if health is not None and not health.ready:
            # The worker is waiting out a failure (database full or down, broker away); it keeps
            # serving the last verdicts meanwhile.
            raise HTTPException(status_code=503, detail="; ".join(health.reasons()))
        try:
            sink.query("SELECT 1")
        except Exception as exc:  # any database failure means not ready
            raise HTTPException(status_code=503, detail=f"clickhouse not reachable: {exc}") from exc
        return Health(status="ready")

    @app.get("/v1/verdicts", response_model=list[Verdict], tags=["verdicts"])
    def list_verdicts() -> list[Verdict]:
        """The latest verdict of every (model, candidate) pair."""
        return sink.latest_verdicts()

    @app.get(
        "/v1/verdicts/{model}/{candidate}",
        response_model=Verdict,
        tags=["verdicts"],
        responses={404: {"description": "no traffic has been scored for this pair"}},
    )
    def get_verdict(model: str, candidate: str) -> Verdict:
        """Latest verdict. Argo Rollouts: ``successCondition: result.verdict == "promote"``,
        ``failureCondition: result.verdict == "rollback"``; hold is inconclusive."""
        verdict = sink.latest_verdict(model, candidate)
        if verdict is not None:
            return verdict
        if sink.pair_known(model, candidate):
            # Scored but no window closed yet: 200 with hold, so a gate waits instead of erroring.
            now = datetime.now(UTC)
            return Verdict(
                model=model, candidate=candidate, verdict="hold", metrics=[], samples=0,
                reasons=["traffic is being scored but no window has closed yet"],
                window_start=now, window_end=now, updated_at=now,
            )  # fmt: skip
        raise HTTPException(status_code=404, detail=f"unknown pair {model}/{candidate}: no scored traffic")

    def gate(model: str, candidate: str, response: Response, passes_on: str) -> Verdict:
        # Flagger advances (or, for a rollback hook, rolls back) on any 2xx and halts otherwise.
        verdict = get_verdict(model, candidate)
        if verdict.verdict != passes_on:
            response.status_code = 412
        return verdict

    not_now = {412: {"description": "the verdict is something else; it is in the body"}}

    @app.post("/v1/gates/flagger/{model}/{candidate}", response_model=Verdict, tags=["gates"], responses=not_now)
    def flagger_confirm_promotion(model: str, candidate: str, response: Response) -> Verdict:
        """Flagger ``confirm-promotion`` webhook: 200 only on promote, else 412 halts the canary."""
        return gate(model, candidate, response, passes_on="promote")

    @app.post(
        "/v1/gates/flagger-rollback/{model}/{candidate}", response_model=Verdict, tags=["gates"], responses=not_now
    )
    def flagger_rollback(model: str, candidate: str, response: Response) -> Verdict:
        """Flagger ``rollback`` webhook: 200 (which rolls the canary back) only on rollback."""
        return gate(model, candidate, response, passes_on="rollback")

    @app.get("/v1/windows/{model}/{candidate}", response_model=list[WindowSummary], tags=["windows"])
    def get_windows(model: str, candidate: str, limit: int = 100) -> list[dict[str, Any]]:
        """Closed windows, newest first."""
        return sink.windows(model, candidate, limit=limit)

    return app


def serve_in_loop(app: FastAPI, host: str, port: int) -> uvicorn.Server:
    """A uvicorn server to run as a task inside another asyncio program (the worker),
    leaving signal handling to the host program."""

    class EmbeddedServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    return EmbeddedServer(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
