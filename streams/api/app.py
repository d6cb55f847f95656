"""Verdicts API: read-only HTTP for promotion gates and people; the transport over VerdictBoard.

Status codes are chosen for the controllers that poll them (deploy/README.md has the manifests):

- Argo Rollouts' ``web`` provider counts a non-2xx answer as a measurement *error* (4 in a row abort
  the rollout by default), so every configured pair answers 200 and the decision is in the body:
  ``verdict`` promote / hold / rollback, ``state`` and ``age_s`` saying what it rests on. 404 only
  for a pair neither configured nor ever seen.
- Flagger's webhooks pass on 200-202 and fail otherwise and cannot send headers: the gate
  endpoints answer 200 or 412, and take the bearer token from the payload's ``metadata.token``.
  A caller the rollback hook cannot authenticate gets 200 ("rolling back"), never 401: Flagger
  reads any non-2xx as "not yet", so a wrong token would otherwise hide a rollback for ever.

Authentication (``[api] tokens``): every /v1 path needs a bearer token when tokens are set; SQL
(``POST /v1/query``) and writes (retiring a verdict) need one always, and answer 403 while none is
set. /healthz and /readyz stay open for kubelet probes; /openapi.json stays open, as it is the
contract (paths and schemas) and holds no data.

Verdict endpoints answer from memory (streams/api/board.py): no database call, nothing shared with the
worker's writes. A worker serves this app from a process of its own (streams/api/process.py);
``/v1/windows`` is a database read, in the thread pool, never on an event loop.
"""

from __future__ import annotations

import contextlib
import hmac
import socket
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse
from fastapi.security import HTTPAuthorizationCredentials
from fastapi import Path as PathParam
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field

from schemas import MAX_NAME_CHARS, Verdict, WindowSummary
from streams.api.board import VerdictBoard
from streams.judge.history import VerdictChange, read_history
from streams.report import CSP, report_html

MAX_WINDOWS = 1000
Name = Annotated[str, PathParam(min_length=1, max_length=MAX_NAME_CHARS)]


class Health(BaseModel):
    status: str


class Unavailable(RuntimeError):
    """What is behind this API (the worker, the database) cannot answer now: a 503."""


def create_app(
    board: VerdictBoard, sink: Any = None, health: Any = None, tokens: Sequence[str] = (),
    retire: Callable[[str, str, str, str], Verdict] | None = None, registry: Any = None,
) -> FastVerdicts:  # fmt: skip
    """``board``: the verdicts to serve; ``sink``: ClickHouseSink for windows and readiness (None:
    those answer 503); ``health``: the worker's ``streams.kafka_io.Health`` when served from a
    worker; ``tokens``: accepted bearer tokens (empty: no authentication, except for SQL and
    writes, which are then off); ``retire(model, candidate, reason, by)``: writes a retirement
    (streams/judge/retire.py; None: 503); ``registry``: the Settings whose candidate registry /v1/candidates
    serves (streams/api/candidates.py; None: no such routes)."""
    app = FastAPI(
        title="shadowlens verdicts API",
        version="1.2",
        description="Latest promote / hold / rollback verdict per (model, candidate), with its evidence, its age "
        "and the state it rests on. A rollback stands until the judge writes a newer verdict or an operator "
        "retires it; it never turns into a hold by age, a restart or a missing configuration.",
    )
    accepted = [t.encode() for t in tokens]
    bearer = HTTPBearer(auto_error=False, description="one of [api] tokens (SHADOWLENS_API_TOKENS)")

    def valid(offered: Any) -> bool:
        return isinstance(offered, str) and any(hmac.compare_digest(offered.encode(), t) for t in accepted)

    async def authenticated(request: Request, credentials: HTTPAuthorizationCredentials | None) -> bool:
        if credentials is not None and valid(credentials.credentials):
            return True
        if request.method == "POST":  # Flagger webhooks cannot set headers: the token rides in metadata
            with contextlib.suppress(Exception):
                body = await request.json()
                meta = body.get("metadata") if isinstance(body, dict) else None
                return valid(meta.get("token") if isinstance(meta, dict) else None)
        return False

    async def authorize(request: Request, credentials=Depends(bearer)) -> None:  # noqa: B008 - FastAPI idiom
        if not accepted or await authenticated(request, credentials):
            return
        raise HTTPException(
            status_code=401, headers={"WWW-Authenticate": "Bearer"},
            detail="missing or wrong token: send 'Authorization: Bearer <token>' (Flagger: metadata.token) "
                   "with one of the API's [api] tokens",
        )  # fmt: skip

    def token_required(what: str) -> Callable[[], None]:
        async def require() -> None:  # runs after ``authorize``: with tokens set, the caller presented one
            if not accepted:
                raise HTTPException(status_code=403, detail=f"{what} needs authentication, and this API has no "
                                    "tokens: set [api] tokens (or SHADOWLENS_API_TOKENS) and restart it, then send "
                                    "'Authorization: Bearer <token>'")  # fmt: skip

        return require

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])
    gates = APIRouter(prefix="/v1")  # the rollback hook authenticates in its body: it fails closed

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
        all: bool = Query(False, description="every pair seen: also retired ones and other workers'"),  # noqa: A002
    ) -> list[Verdict]:
        """The latest verdict of every configured pair (hold while waiting for traffic), and of every
        pair whose latest stored verdict is a rollback, configured here or not: a rollback is listed
        wherever it is served. ``all=true``: every pair with a stored verdict or scored traffic."""
        return board.verdicts(include_all=all)

    @v1.get(
        "/verdicts/{model}/{candidate}",
        response_model=Verdict,
        tags=["verdicts"],
        responses={404: {"description": "neither configured nor ever scored"}},
    )
    async def get_verdict(model: Name, candidate: Name) -> Verdict:
        """Latest verdict. Argo Rollouts: ``successCondition: result.verdict == "promote"``,
        ``failureCondition: result.verdict == "rollback"``; hold is inconclusive. Served for every
        pair with a stored verdict, configured here or not; a stale promote is a hold, a stale
        rollback stays rollback (state ``stale``) until a newer verdict or a retirement."""
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

    @gates.post("/gates/flagger-rollback/{model}/{candidate}", response_model=Verdict | GateRefusal, tags=["gates"],
                responses={**not_now, 200: {"description": "the verdict is rollback (a Verdict), or the caller "
                                            "could not be authenticated (a GateRefusal): Flagger rolls back"}})
    async def flagger_rollback(
        model: Name, candidate: Name, request: Request, response: Response, credentials=Depends(bearer),  # noqa: B008
    ) -> Verdict | GateRefusal:
        """Flagger ``rollback`` webhook: 200 (which rolls the canary back) on rollback, 412 otherwise.

        **Fails closed**: with [api] tokens set, a caller with neither a valid bearer header nor a
        valid ``metadata.token`` gets **200** and a body that says nothing about the verdict, so
        Flagger rolls the canary back. A 401 here would read to Flagger exactly as "not yet", and a
        candidate with a rollback verdict would wait at maxWeight for ever behind a wrong token.
        (confirm-promotion answers 401 to the same caller: never a pass.)"""
        if accepted and not await authenticated(request, credentials):
            return GateRefusal(detail="rolling back: this gate cannot authenticate the caller (missing or wrong "
                               "token), so it fails closed; put one of the API's [api] tokens in the webhook's "
                               "metadata.token (or an 'Authorization: Bearer' header)")  # fmt: skip
        return await gate(model, candidate, response, passes_on="rollback")

    @v1.get("/windows/{model}/{candidate}", response_model=list[WindowSummary], tags=["windows"])
    def get_windows(
        model: Name, candidate: Name, limit: int = Query(100, ge=1, le=MAX_WINDOWS, description="newest first")
    ) -> list[dict[str, Any]]:
        """Closed windows, newest first (read from ClickHouse in the thread pool)."""
        if sink is None:
            raise HTTPException(status_code=503, detail="no database attached to this API")
        try:
            return sink.windows(model, candidate, limit=limit)
        except Unavailable as exc:
            raise HTTPException(status_code=503, detail=str(exc)) from None

    @v1.get("/verdicts/{model}/{candidate}/history", response_model=list[VerdictChange], tags=["verdicts"],
            responses={404: {"description": "neither configured nor ever scored"}})  # fmt: skip
    def get_history(
        model: Name, candidate: Name, limit: int = Query(100, ge=1, le=MAX_WINDOWS, description="newest first")
    ) -> list[VerdictChange]:
        """Every change of the pair's verdict, newest first (its first verdict last, from null): from, to,
        when, samples, the metric that decided and the policy hash (the ``verdict_changes`` view,
        streams/judge/history.py). A data read like /v1/windows: behind a token when the API has tokens."""
        if board.verdict(model, candidate) is None:
            raise HTTPException(status_code=404, detail=f"unknown pair {model}/{candidate}: not configured in "
                                "[[candidates]] and never scored")  # fmt: skip
        if sink is None:
            raise HTTPException(status_code=503, detail="no database attached to this API")
        try:
            return read_history(sink, model, candidate, limit)
        except Exception as exc:  # noqa: BLE001 - the database or the worker cannot answer now
            line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise HTTPException(status_code=503, detail=f"verdict history unavailable: {line}") from None

    @v1.get("/report/{model}/{candidate}", response_class=HTMLResponse, tags=["verdicts"],
            responses={200: {"content": {"text/html": {}}}, 404: {"description": "neither configured nor ever scored"},
                       503: {"description": "no database attached to this API"}})  # fmt: skip
    def get_report(model: Name, candidate: Name) -> HTMLResponse:
        """A shareable HTML page (streams/report): the verdict exactly as the gate endpoints serve it now,
        why, what it is about, its metrics against their margins, windows, verdict history, example
        requests and the candidate's registry records. Self-contained: no script, nothing loaded from
        elsewhere (its Content-Security-Policy says so). A data read: behind a token when the API has tokens."""
        verdict = board.verdict(model, candidate)
        if verdict is None:
            raise HTTPException(status_code=404, detail=f"unknown pair {model}/{candidate}: not configured in "
                                "[[candidates]] and never scored")  # fmt: skip
        if sink is None:
            raise HTTPException(status_code=503, detail="no database attached to this API")
        page = report_html(verdict, sink, "the shadowlens verdicts API")
        return HTMLResponse(page, headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                                           "Cache-Control": "no-store"})  # fmt: skip

    @v1.post("/verdicts/{model}/{candidate}/retire", response_model=Verdict, tags=["verdicts"],
             dependencies=[Depends(token_required("retiring a verdict"))],
             responses={403: {"description": "this API has no [api] tokens: writes are off"},
                        404: {"description": "no verdict is stored for the pair"}})  # fmt: skip
    def retire_verdict(model: Name, candidate: Name, body: RetireRequest) -> Verdict:
        """Retire the pair: how an operator clears a rollback (``shadowlens verdicts retire``). Writes
        a hold with state ``retired`` (the replaced decision in ``last_decision``, who and why in the
        first reason) to ClickHouse and serves it from now on; the judge's next verdict for the pair,
        if its traffic still flows, replaces it. Always behind a token. In the thread pool."""
        if retire is None:
            raise HTTPException(status_code=503, detail="this API cannot write verdicts")
        try:
            return retire(model, candidate, body.reason, body.by or "an unnamed caller of the API")
        except LookupError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        except Unavailable as exc:
            raise HTTPException(status_code=503, detail=str(exc)) from None

    @v1.post("/query", response_model=QueryResult, tags=["query"],
             dependencies=[Depends(token_required("SQL (POST /v1/query)"))],
             responses={400: {"description": "the query was refused; the one-line reason is the detail"},
                        403: {"description": "this API has no [api] tokens: SQL is off"}})  # fmt: skip
    def run_query(body: QueryRequest) -> dict[str, Any]:
        """A read-only SQL query (ClickHouse ``readonly``, at most 10,000 rows and 10 s), for analysts
        while the worker holds a chDB data path (``shadowlens query`` falls back to it). In the thread
        pool. Never without a token: 403 while the API has no [api] tokens."""
        if sink is None:
            raise HTTPException(status_code=503, detail="no database attached to this API")
        try:
            return sink.readonly_query(body.sql)
        except Unavailable as exc:
            raise HTTPException(status_code=503, detail=str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the server's first line is the useful part
            text = str(exc).strip()
            line = next((x for x in text.splitlines() if "Code:" in x), text.splitlines()[0] if text else "")
            raise HTTPException(status_code=400, detail=line[:500]) from None

    if registry is not None:
        from streams.api.candidates import add_routes

        add_routes(v1, registry, token_required)
    app.include_router(v1)
    app.include_router(gates)
    return FastVerdicts(app, board, accepted)


class QueryRequest(BaseModel):
    sql: str = Field(min_length=1, max_length=100_000, description="one read-only ClickHouse statement")


class QueryResult(BaseModel):
    columns: list[str]
    rows: list[list[Any]]
    text: str | None = Field(default=None, description="a query ending in FORMAT <name>: ClickHouse's own output "
                             "(columns and rows are then empty)")  # fmt: skip


class RetireRequest(BaseModel):
    reason: str = Field(min_length=1, max_length=1000, description="why: it goes into the retired row's reason")
    by: str = Field(default="", max_length=200, description="who retires it (the CLI sends user@host)")


class GateRefusal(BaseModel):
    """The rollback hook's answer to a caller it cannot authenticate: 200, and nothing about the verdict."""

    detail: str


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
    # Inherited by every accepted connection: uvicorn writes a response's head and body apart, and with
    # Nagle on, the body waited for the client's delayed ACK (40 ms an answer on Linux; measured with
    # bench/bench_ingest.py: 48 -> 7 ms a POST).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise AddressUnavailable(f"API address {host}:{port} is not available ({exc.strerror}): stop the process "
                                 "that uses it, or set [api] port / SHADOWLENS_API__PORT") from exc  # fmt: skip
    sock.listen(2048)
    return sock
