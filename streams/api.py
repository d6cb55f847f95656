"""Verdicts API: read-only HTTP for promotion gates and people; the transport over VerdictBoard.

Status codes are chosen for the controllers that poll them (deploy/README.md has the manifests):

- Argo Rollouts' ``web`` provider counts a non-2xx answer as a measurement *error* (4 in a row abort
  the rollout by default), so every configured pair answers 200 and the decision is in the body:
  ``verdict`` promote / hold / rollback, ``state`` and ``age_s`` saying what it rests on. 404 only
  for a pair neither configured nor ever seen.
- Flagger's webhooks pass on 200-202 and fail otherwise and cannot send headers: the gate
  endpoints answer 200 or 412, and take the bearer token from the payload's ``metadata.token``.

Verdict endpoints answer from memory (streams/board.py): no database call, nothing shared with the
worker's writes. A worker serves this app from a process of its own (streams/api_process.py);
``/v1/windows`` is a database read, in the thread pool, never on an event loop.
"""

from __future__ import annotations

import contextlib
import hmac
import socket
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field

from schemas import MAX_NAME_CHARS, Verdict, WindowSummary
from streams.board import VerdictBoard

MAX_WINDOWS = 1000
Name = Annotated[str, PathParam(min_length=1, max_length=MAX_NAME_CHARS)]


class Health(BaseModel):
    status: str


def create_app(
    board: VerdictBoard, sink: Any = None, health: Any = None, tokens: Sequence[str] = ()
) -> FastVerdicts:
    """``board``: the verdicts to serve; ``sink``: ClickHouseSink for windows and readiness (None:
    those answer 503); ``health``: the worker's ``streams.kafka_io.Health`` when served from a
    worker; ``tokens``: accepted bearer tokens (empty: no authentication)."""
    app = FastAPI(
        title="shadowlens verdicts API",
        version="1.1",
        description="Latest promote / hold / rollback verdict per (model, candidate), with its evidence, its age "
        "and the state it rests on.",
    )
    accepted = [t.encode() for t in tokens]
    bearer = HTTPBearer(auto_error=False, description="one of [api] tokens (SHADOWLENS_API_TOKENS)")

    async def authorize(request: Request, credentials=Depends(bearer)) -> None:  # noqa: B008 - FastAPI idiom
        if not accepted:
            return
        offered = credentials.credentials if credentials is not None else None
        if offered is None and request.method == "POST":
            # Flagger webhooks cannot set headers: the token rides in the payload's metadata.
            with contextlib.suppress(Exception):
                body = await request.json()
                meta = body.get("metadata") if isinstance(body, dict) else None
                offered = meta.get("token") if isinstance(meta, dict) else None
        if isinstance(offered, str) and any(hmac.compare_digest(offered.encode(), t) for t in accepted):
            return
        raise HTTPException(
            status_code=401, headers={"WWW-Authenticate": "Bearer"},
            detail="missing or wrong token: send 'Authorization: Bearer <token>' (Flagger: metadata.token) "
                   "with one of the API's [api] tokens",
        )  # fmt: skip

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @app.get("/healthz", response_model=Health, tags=["ops"])
    async def healthz() -> Health:
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, tags=["ops"])
    def readyz() -> Health:
        if health is not None and not health.ready:
            # The worker is waiting out a failure (database full or down, broker away); it keeps
            # serving the last verdicts meanwhile, and their age shows it.
            raise HTTPException(status_code=503, detail="; ".join(health.reasons()))
        if sink is None or health is not None:  # a worker's health already covers its database
            return Health(status="ready")
        try:
            sink.query("SELECT 1")
        except Exception as exc:  # any database failure means not ready
            raise HTTPException(status_code=503, detail=f"clickhouse not reachable: {exc}") from exc
        return Health(status="ready")

    @v1.get("/verdicts", response_model=list[Verdict], tags=["verdicts"])
    async def list_verdicts(
        all: bool = Query(False, description="also pairs that are not configured (retired, other workers')"),  # noqa: A002
    ) -> list[Verdict]:
        """The latest verdict of every configured pair (hold while waiting for traffic)."""
        return board.verdicts(include_all=all)

    @v1.get(
        "/verdicts/{model}/{candidate}",
        response_model=Verdict,
        tags=["verdicts"],
        responses={404: {"description": "neither configured nor ever scored"}},
    )
    async def get_verdict(model: Name, candidate: Name) -> Verdict:
        """Latest verdict. Argo Rollouts: ``successCondition: result.verdict == "promote"``,
        ``failureCondition: result.verdict == "rollback"``; hold is inconclusive."""
        verdict = board.verdict(model, candidate)
        if verdict is None:
            raise HTTPException(
                status_code=404,
                detail=f"unknown pair {model}/{candidate}: not configured in [[candidates]] and never scored",
            )
        return verdict

    async def gate(model: str, candidate: str, response: Response, passes_on: str) -> Verdict:
        verdict = await get_verdict(model, candidate)
        if verdict.verdict != passes_on:
            response.status_code = 412
        return verdict

    not_now = {412: {"description": "the verdict is something else; it is in the body"}}

    @v1.post("/gates/flagger/{model}/{candidate}", response_model=Verdict, tags=["gates"], responses=not_now)
    async def flagger_confirm_promotion(model: Name, candidate: Name, response: Response) -> Verdict:
        """Flagger ``confirm-promotion`` webhook: 200 only on promote; 412 halts the canary at maxWeight."""
        return await gate(model, candidate, response, passes_on="promote")

    @v1.post("/gates/flagger-rollback/{model}/{candidate}", response_model=Verdict, tags=["gates"], responses=not_now)
    async def flagger_rollback(model: Name, candidate: Name, response: Response) -> Verdict:
        """Flagger ``rollback`` webhook: 200 (which rolls the canary back) only on rollback."""
        return await gate(model, candidate, response, passes_on="rollback")

    @v1.get("/windows/{model}/{candidate}", response_model=list[WindowSummary], tags=["windows"])
    def get_windows(
        model: Name, candidate: Name, limit: int = Query(100, ge=1, le=MAX_WINDOWS, description="newest first")
    ) -> list[dict[str, Any]]:
        """Closed windows, newest first (read from ClickHouse in the thread pool)."""
        if sink is None:
            raise HTTPException(status_code=503, detail="no database attached to this API")
        return sink.windows(model, candidate, limit=limit)

    @v1.post("/query", response_model=QueryResult, tags=["query"],
              responses={400: {"description": "ClickHouse refused the query; its message is the detail"}})
    def run_query(body: QueryRequest) -> dict[str, Any]:
        """A read-only SQL query (ClickHouse ``readonly``, at most 10,000 rows and 10 s), for analysts
        while the worker holds a chDB data path (``shadowlens query`` falls back to it). In the thread
        pool; behind the same bearer token as every /v1 path."""
        if sink is None:
            raise HTTPException(status_code=503, detail="no database attached to this API")
        try:
            return sink.readonly_query(body.sql)
        except Exception as exc:  # noqa: BLE001 - the server's first line is the useful part
            text = str(exc).strip()
            line = next((x for x in text.splitlines() if "Code:" in x), text.splitlines()[0] if text else "")
            raise HTTPException(status_code=400, detail=line[:500]) from None

    app.include_router(v1)
    return FastVerdicts(app, board, accepted)


class QueryRequest(BaseModel):
    sql: str = Field(min_length=1, max_length=100_000, description="one read-only ClickHouse statement")


class QueryResult(BaseModel):
    columns: list[str]
    rows: list[list[Any]]


class FastVerdicts:
    """ASGI fast path for the one endpoint gates poll, ``GET /v1/verdicts/{model}/{candidate}``:
    the same status and body as the FastAPI route (tests compare them), straight from the board's
    cached JSON, without routing, dependency injection or response-model validation (~10x less
    CPU per poll; the API thread shares the GIL with the worker). Anything else, including every
    error answer, goes to the FastAPI app."""

    def __init__(self, app: FastAPI, board: VerdictBoard, accepted: list[bytes]):
        self.app, self.board, self.accepted = app, board, accepted

    def __getattr__(self, name: str) -> Any:  # openapi(), routes, state ... of the FastAPI app
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            parts = scope["path"].split("/")
            if (len(parts) == 5 and parts[1] == "v1" and parts[2] == "verdicts" and 0 < len(parts[3]) <= MAX_NAME_CHARS
                    and 0 < len(parts[4]) <= MAX_NAME_CHARS and self._authorized(scope)):  # fmt: skip
                body = self.board.verdict_json(parts[3], parts[4])
                if body is not None:
                    await send({"type": "http.response.start", "status": 200, "headers": [
                        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                    await send({"type": "http.response.body", "body": body})
                    return
        await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        if not self.accepted:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                offered = value[7:].strip()
                return any(hmac.compare_digest(offered, t) for t in self.accepted)
        return False


class AddressUnavailable(OSError):
    """The API's host:port cannot be bound (in use, or not an address of this machine)."""


def bind(host: str, port: int) -> socket.socket:
    """The API's listening socket, bound before anything else starts, so a port in use is one
    clear error at startup."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise AddressUnavailable(f"API address {host}:{port} is not available ({exc.strerror}): stop the process "
                                 "that uses it, or set [api] port / SHADOWLENS_API__PORT") from exc  # fmt: skip
    sock.listen(2048)
    return sock
