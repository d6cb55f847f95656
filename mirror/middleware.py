"""ASGI middleware for Starlette / FastAPI model servers: mirror each request to Kafka.

    app.add_middleware(
        MirrorMiddleware, client=mirror, model="digits", version="v3",
        inputs=lambda ex: {"x": ex.request_json()["features"]},
        outputs=lambda ex: {"probs": ex.response_json()["probs"]},
    )

Why a pure ASGI middleware and not ``BaseHTTPMiddleware``: it passes the app's messages through
unchanged (streaming, background tasks and exceptions behave exactly as without it) and only
keeps references to the body chunks it sees. It adds no error path: the app's own calls to
``receive``/``send`` and its exceptions pass through untouched, and everything the middleware
does itself (capture, the user's extract functions, publish) is inside ``try``, counted and
logged (rate-limited), never raised. Mirroring happens after the response's last byte was
sent, so the client does not wait for it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from mirror.client import AsyncMirrorClient, MirrorClient
from mirror.errors import MirrorError


@dataclass
class Exchange:
    """One request/response pair as seen by the middleware, handed to the extract functions."""

    method: str
    path: str
    query_string: bytes
    headers: dict[str, str]  # request headers, lower-case names
    request_body: bytes = b""
    status: int = 0
    response_headers: dict[str, str] = field(default_factory=dict)
    response_body: bytes = b""
    latency_ms: float = 0.0  # middleware entry to the response's last byte

    def request_json(self) -> Any:
        return json.loads(self.request_body)

    def response_json(self) -> Any:
        return json.loads(self.response_body)


Extract = Callable[[Exchange], Any]


class MirrorMiddleware:
    """Mirror requests of a model server through a ``MirrorClient`` or ``AsyncMirrorClient``.

    model, version: strings, or functions of the ``Exchange``.
    inputs, outputs: functions of the ``Exchange`` returning name -> array (or list); return
        None to skip mirroring that request.
    attributes: function returning slice keys, e.g. ``{"country": ex.headers["x-country"]}``.
    request_id: function; default the ``x-request-id`` header, else a random UUID.
    sample_key: function returning the request's sample key (a user, session or device id), e.g.
        ``lambda ex: ex.headers.get("x-user-id")``: written into the record's ``sample_key`` (the
        judge's cluster key) and used for sampling and as the Kafka key,
        so one user is always in or always out; None or "" for a request without one (then the
        request id is the sampling key and the record has no sample key).
    latency_ms: function; default the time the app took to answer (entry to last byte).
    paths: mirror only these path prefixes (default all); methods: only these (default POST);
    statuses: only these response statuses (default 2xx: errors are not model outputs).
    max_body_bytes: larger request or response bodies are not mirrored (counted as invalid).
    """

    def __init__(
        self,
        app: Callable,
        client: MirrorClient | AsyncMirrorClient,
        *,
        model: str | Extract,
        version: str | Extract,
        inputs: Extract,
        outputs: Extract,
        attributes: Extract | None = None,
        request_id: Extract | None = None,
        sample_key: Extract | None = None,
        latency_ms: Extract | None = None,
        paths: Collection[str] | None = None,
        methods: Collection[str] = ("POST",),
        statuses: Collection[int] = range(200, 300),
        max_body_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.app = app
        self.client = client
        self._model = model if callable(model) else (lambda _ex, m=model: m)
        self._version = version if callable(version) else (lambda _ex, v=version: v)
        self._inputs, self._outputs, self._attributes = inputs, outputs, attributes
        self._request_id = request_id or _default_request_id
        self._sample_key = sample_key
        self._latency_ms = latency_ms
        self._paths = tuple(paths) if paths is not None else None
        self._methods = frozenset(m.upper() for m in methods)
        self._statuses = frozenset(statuses)
        self._max_body = max_body_bytes
        self._core = client._core  # counters and the rate-limited log shared with the client

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if not self._wanted(scope):
            await self.app(scope, receive, send)
            return
        capture = _Capture(time.perf_counter(), self._max_body)

        async def receive_and_capture() -> dict:
            message = await receive()
            capture.request(message)
            return message

        async def capture_and_send(message: dict) -> None:
            capture.response(message)
            await send(message)

        await self.app(scope, receive_and_capture, capture_and_send)
        self._mirror(scope, capture)

    def _wanted(self, scope: dict) -> bool:
        if scope.get("type") != "http" or scope.get("method", "") not in self._methods:
            return False
        return self._paths is None or scope.get("path", "").startswith(self._paths)

    def _mirror(self, scope: dict, capture: _Capture) -> None:
        try:
            if capture.status not in self._statuses or not capture.complete:
                return
            if capture.too_large:
                self._core.count("invalid")
                self._core.log.warning("mw_body", "mirror middleware: body over %d bytes on %s, not mirrored",
                                       self._max_body, scope.get("path"))
                return
            exchange = capture.exchange(scope)
            model, request_id = self._model(exchange), self._request_id(exchange)
            sample_key = self._sample_key(exchange) if self._sample_key else None
            if sample_key == "":  # none for this request (a header that is not there); publish checks the rest
                sample_key = None
            key = request_id if sample_key is None else sample_key
            if not self._core.sampler.keep(model, str(key)):  # skip the extract functions' cost
                self._core.count("sampled_out")
                return
            inputs, outputs = self._inputs(exchange), self._outputs(exchange)
            if inputs is None or outputs is None:
                return
            attributes = self._attributes(exchange) if self._attributes else None
            latency = self._latency_ms(exchange) if self._latency_ms else exchange.latency_ms
            self.client.publish(request_id, model, self._version(exchange), inputs, outputs, latency,
                                attributes, sample_key=sample_key)
        except MirrorError as exc:  # strict mode: publish counted it; the response is already sent
            self._core.log.warning("mw_invalid", "mirror middleware: bad call for %s: %s", scope.get("path"), exc)
        except Exception as exc:  # the user's extract functions
            self._core.count("invalid")
            self._core.log.warning("mw_extract", "mirror middleware: could not mirror %s: %r", scope.get("path"), exc)


def _default_request_id(exchange: Exchange) -> str:
    return exchange.headers.get("x-request-id") or uuid.uuid4().hex


class _Capture:
    """Collects the request and response as they pass; never raises (a bug here must not
    become the app's error)."""

    __slots__ = ("started", "max_body", "request_chunks", "request_size", "status", "response_headers",
                 "response_chunks", "response_size", "complete", "too_large", "ended")

    def __init__(self, started: float, max_body: int) -> None:
        self.started = started
        self.max_body = max_body
        self.request_chunks: list[bytes] = []
        self.response_chunks: list[bytes] = []
        self.request_size = self.response_size = 0
        self.status = 0
        self.response_headers: list = []
        self.complete = self.too_large = False
        self.ended = started

    def request(self, message: dict) -> None:
        try:
            if message.get("type") == "http.request":
                body = message.get("body", b"")
                self.request_size += len(body)
                if self.request_size > self.max_body:
                    self.too_large = True
                elif body:
                    self.request_chunks.append(body)
        except Exception:
            self.too_large = True

    def response(self, message: dict) -> None:
        try:
            kind = message.get("type")
            if kind == "http.response.start":
                self.status = message.get("status", 0)
                self.response_headers = message.get("headers", [])
            elif kind == "http.response.body":
                body = message.get("body", b"")
                self.response_size += len(body)
                if self.response_size > self.max_body:
                    self.too_large = True
                elif body:
                    self.response_chunks.append(body)
                if not message.get("more_body", False):
                    self.complete = True
                    self.ended = time.perf_counter()
        except Exception:
            self.too_large = True

    def exchange(self, scope: Mapping) -> Exchange:
        return Exchange(
            method=scope.get("method", ""),
            path=scope.get("path", ""),
            query_string=scope.get("query_string", b""),
            headers={k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])},
            request_body=b"".join(self.request_chunks),
            status=self.status,
            response_headers={k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self.response_headers},
            response_body=b"".join(self.response_chunks),
            latency_ms=(self.ended - self.started) * 1000.0,
        )
