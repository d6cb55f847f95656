"""What ``shadowlens query`` prints, and its way through a running worker's API.

chDB allows one process per data path: while a worker (or a standalone ``shadowlens api``) holds
it, ``shadowlens query`` sends the SQL to that process's ``POST /v1/query``, found through the
``<path>.api.json`` it writes. A query with a FORMAT clause comes back as ClickHouse's own text.
"""

from __future__ import annotations

import json
import os
import re

import typer

FORMAT_CLAUSE = re.compile(r"\bFORMAT\s+\w+\s*;?\s*$", re.IGNORECASE)


class QueryFailed(Exception):
    """One line naming the cause and the fix; ``code`` is the exit status (1: the query itself failed)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def worker_api_url(dsn: str, locked: BaseException) -> str:
    """The API address of the process holding the chDB path of ``dsn`` (its ``<path>.api.json``);
    QueryFailed when it serves none."""
    from streams.sink import chdb_path, resolve_dsn

    sidecar = f"{chdb_path(resolve_dsn(dsn)).rstrip('/')}.api.json"
    try:
        with open(sidecar) as f:
            return json.load(f)["url"]
    except (OSError, ValueError, KeyError):
        raise QueryFailed(f"{locked}; that process serves no API to query through (no {sidecar})") from None


def through_worker(dsn: str, sql: str, token: str | None, locked: BaseException) -> tuple[list[str], list] | str:
    """(columns, rows) from the API of the process holding the chDB path, or ClickHouse's text for a
    query with a FORMAT clause. Raises QueryFailed."""
    try:
        import httpx
    except ImportError:  # a dependency of the base install since httpx>=0.27 was added; older ones lack it
        raise QueryFailed(f"{locked}; querying through its API needs httpx: pip install httpx (or reinstall "
                          "shadowlens)") from None  # fmt: skip
    from streams.sink import chdb_path, resolve_dsn

    url, path = worker_api_url(dsn, locked), chdb_path(resolve_dsn(dsn))
    token = token or (os.environ.get("SHADOWLENS_API_TOKENS", "").split(",")[0] or None)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.post(f"{url}/v1/query", json={"sql": sql}, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise QueryFailed(f"the worker holding {path} serves its API at {url}, but it did not answer ({exc}); is it "
                          "still starting?") from exc  # fmt: skip
    if response.status_code == 401:
        raise QueryFailed(f"the worker's API at {url} needs its token: pass --token or set SHADOWLENS_API_TOKEN")
    if response.status_code == 403:  # the API's configuration refuses SQL (no tokens): its detail says the fix
        raise QueryFailed(f"the worker's API at {url} refused: {_detail(response)}")
    if response.status_code != 200:
        raise QueryFailed(f"query failed: {_detail(response)}", code=1)
    body = response.json()
    if body.get("text") is not None:
        return body["text"]
    if FORMAT_CLAUSE.search(sql):  # an API from before FORMAT output came through: it dropped the text
        raise QueryFailed(f"the worker's API at {url} does not return FORMAT output (an older version); drop the "
                          "FORMAT clause and pass --format (tsv, table, json, vertical)", code=1)  # fmt: skip
    return body["columns"], body["rows"]


def _detail(response) -> str:
    if "json" in response.headers.get("content-type", ""):
        return str(response.json().get("detail", response.text))
    return response.text


def print_rows(names: list[str], rows, fmt: str) -> None:
    if fmt == "vertical":  # rows that came through the worker's API (a direct query asks ClickHouse)
        width = max((len(n) for n in names), default=0)
        for i, row in enumerate(rows, 1):
            typer.echo(f"Row {i}:\n──────")
            for name, value in zip(names, row, strict=True):
                typer.echo(f"{name + ':':<{width + 1}} {value}")
            typer.echo("")
    elif fmt == "json":
        for row in rows:
            typer.echo(json.dumps(dict(zip(names, row, strict=True)), default=str))
    elif fmt == "table":
        from rich.console import Console
        from rich.table import Table

        table = Table(*names)
        for row in rows:
            table.add_row(*(str(v) for v in row))
        Console().print(table)
    else:
        typer.echo("\t".join(names))
        for row in rows:
            typer.echo("\t".join(str(v) for v in row))
