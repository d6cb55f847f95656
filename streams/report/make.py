"""``shadowlens report``: the page from wherever the data is.

- A ClickHouse server (``http://``) or a chDB path no process holds: read directly, the verdict
  served by the same rules as the API (a ``VerdictBoard`` loaded from the database, with the
  config's stale limit), so the page says what a gate would read now.
- A chDB path a worker holds: ``GET /v1/report/...`` of that worker's API, found through the
  ``<path>.api.json`` it writes (as ``shadowlens query`` does).
"""

from __future__ import annotations

import os
from urllib.parse import quote, urlsplit


class ReportFailed(Exception):
    """One line naming the cause and the fix; exit status 2."""


def make_report(settings, model: str, candidate: str, token: str | None) -> str:
    from streams.api.board import VerdictBoard
    from streams.sink import ClickHouseSink, DataPathInUse, SinkUnavailable

    dsn = settings.clickhouse.dsn
    try:
        sink = ClickHouseSink(dsn, database=settings.clickhouse.database, create=False)
    except DataPathInUse as exc:
        return _through_worker(dsn, model, candidate, token, exc)
    except SinkUnavailable as exc:
        raise ReportFailed(str(exc)) from exc
    from streams.report import report_html

    try:
        board = VerdictBoard.from_settings(settings)
        board.load(sink)
        verdict = board.verdict(model, candidate)
        if verdict is None:
            raise ReportFailed(f"unknown pair {model}/{candidate}: not in this config's [[candidates]] and never "
                               "scored in its database; `shadowlens candidates list` shows the pairs")  # fmt: skip
        return report_html(verdict, sink, _source(dsn))
    finally:
        sink.close()


def _source(dsn: str) -> str:
    """Where the data came from, without a path, user or password (the page is shared)."""
    parts = urlsplit(dsn)
    if parts.scheme == "chdb":
        return "the embedded chDB database"
    return f"ClickHouse at {parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def _through_worker(dsn: str, model: str, candidate: str, token: str | None, locked: BaseException) -> str:
    import httpx

    from streams.api.query_output import QueryFailed, worker_api_url

    try:
        url = worker_api_url(dsn, locked)
    except QueryFailed as exc:
        raise ReportFailed(str(exc)) from None
    token = token or (os.environ.get("SHADOWLENS_API_TOKENS", "").split(",")[0] or None)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    target = f"{url}/v1/report/{quote(model, safe='')}/{quote(candidate, safe='')}"
    try:
        response = httpx.get(target, headers=headers, timeout=60)
    except httpx.HTTPError as exc:
        raise ReportFailed(f"the worker holding the data serves its API at {url}, but it did not answer ({exc}); is "
                           "it still starting?") from exc  # fmt: skip
    if response.status_code == 401:
        raise ReportFailed(f"the worker's API at {url} needs its token: pass --token or set SHADOWLENS_API_TOKEN")
    if response.status_code != 200:
        detail = response.json().get("detail") if "json" in response.headers.get("content-type", "") else None
        raise ReportFailed(f"the worker's API at {url} answered {response.status_code}: {detail or response.text}")
    return response.text
