"""The ``shadowlens`` command: demo, worker, api, query, build-models, mirror."""

from __future__ import annotations

from pathlib import Path

import typer

from streams.config import ConfigError, load_settings

app = typer.Typer(help="shadowlens: shadow-traffic diff and evaluation for ML models.", no_args_is_help=True)

try:  # the producer SDK's commands (backfill); mirror depends only on schemas
    from mirror.cli import app as mirror_app

    app.add_typer(mirror_app, name="mirror", help="Producer-side tools: backfill files into the mirror topic.")
except ImportError:  # pragma: no cover - mirror is part of the same distribution
    pass


@app.command()
def demo(
    data_dir: Path = typer.Option(
        Path("shadowlens-demo"), help="where the demo's models and chDB data go (apart from a worker's shadowlens-data)"
    ),
    requests: int = typer.Option(6000, min=100, help="mirrored requests to generate"),
) -> None:
    """Build real models, mirror held-out traffic, replay it into chDB and print the verdicts."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from streams.demo import run_demo

    console = Console()
    console.print(f"[bold]shadowlens demo[/]: {requests} mirrored digits requests, 3 candidates, chDB at {data_dir}")
    pipeline, figures = run_demo(data_dir, requests=requests)
    noise_refs = {c.name for c in pipeline.settings.candidates if c.noise_reference}
    verdicts = pipeline.board.verdicts()
    # Fits 80 columns: estimate, mark, margin (">" confidently worse, "≤" confidently within, "?" not
    # yet decided); sample counts and the first reason are printed below the table.
    table = Table(title=f"Verdicts of model {', '.join(sorted({v.model for v in verdicts}))} (latest per candidate)",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    lat_name = next((m.name for v in verdicts for m in v.metrics
                     if m.name.startswith("latency_p") and m.name.endswith("_ratio")), None)
    lat_header = lat_name.removeprefix("latency_").replace("_", " ") if lat_name else ""
    cols = ["candidate", "verdict", "flip rate", "|Δ conf|", *([lat_header] if lat_name else []), "errors"]
    for col in cols:
        table.add_column(col, no_wrap=True)
    for v in verdicts:
        metrics = {m.name: m for m in v.metrics}
        name = v.candidate + (" *" if v.candidate in noise_refs else "")
        cells = [name, _colour(v.verdict), _fmt(metrics.get("label_flip_rate")),
                 _fmt(metrics.get("abs_confidence_delta"))]
        if lat_name:
            cells.append(_fmt(metrics.get(lat_name), 2))
        table.add_row(*cells, _fmt(metrics.get("error_rate"), pct=True))
    console.print(table)
    if noise_refs:
        console.print("* noise reference: the baseline replayed; its diffs are the noise floor")
    for v in verdicts:
        console.print(f"[bold]{v.candidate}[/] ({v.samples} requests): {v.reasons[0] if v.reasons else ''}")
    counts = pipeline.sink.diff_counts()
    console.print(f"{sum(counts.values())} diff rows, {figures['dead_letters']} dead letters, "
                  f"wall time {figures['wall_s']:.1f} s")  # fmt: skip
    dsn = pipeline.settings.clickhouse.dsn
    console.print(f"Data: {dsn} (database '{pipeline.settings.clickhouse.database}': request_diffs, window_stats, "
                  f"verdicts). Query it:")
    # soft_wrap: the terminal wraps the command, rich inserts no newline, so it pastes whole
    console.print(f"shadowlens query --dsn '{dsn}' \"SELECT candidate, avg(label_flip) FROM "
                  f"shadowlens.request_diffs FINAL GROUP BY candidate\"", soft_wrap=True, highlight=False,
                  markup=False)
    pipeline.sink.close()


@app.command()
def worker(
    config: Path = typer.Option(..., "--config", "-c", help="TOML config file"),
    role: str = typer.Option("all", help="replay | judge | all (both stages in this process)"),
    loglevel: str = typer.Option("info"),
) -> None:
    """Run the worker: the replay stage, the judge stage (and the verdicts API), or both."""
    from streams.topology import run_worker

    if role not in ("all", "replay", "judge"):
        typer.secho(f"--role: {role!r} is not a role; use replay, judge or all", fg="red", err=True)
        raise typer.Exit(2)
    from streams.api import AddressUnavailable
    from streams.metrics import MetricsAddressUnavailable
    from streams.sink import SinkUnavailable

    try:
        run_worker(_settings(config), role=role, loglevel=loglevel)  # type: ignore[arg-type]
    except (AddressUnavailable, SinkUnavailable, MetricsAddressUnavailable) as exc:
        _fail(exc)


@app.command()
def api(config: Path = typer.Option(..., "--config", "-c", help="TOML config file")) -> None:
    """Serve the verdicts API alone, from ClickHouse (an http:// DSN; with chDB the worker serves it).

    Its board is re-read every [api] refresh_s; run it where several judge processes write."""
    import uvicorn

    from streams.api import AddressUnavailable, bind, create_app
    from streams.board import BoardRefresher, VerdictBoard
    from streams.sink import ClickHouseSink, SinkUnavailable, chdb_path

    settings = _settings(config)
    try:
        sock = bind(settings.api.host, settings.api.port)
        dsn = settings.clickhouse.dsn
        sink = ClickHouseSink(dsn, settings.clickhouse.database, create=chdb_path(dsn) is None)
    except (AddressUnavailable, SinkUnavailable) as exc:
        _fail(exc)
    board = VerdictBoard.from_settings(settings)
    refresher = BoardRefresher(board, sink, settings.api.refresh_s)
    refresher.start()
    app_ = create_app(board, sink, tokens=settings.api.tokens)
    uvicorn.Server(uvicorn.Config(app_, log_level="warning", access_log=False)).run(sockets=[sock])
    refresher.stop()


@app.command()
def query(
    sql: str = typer.Argument(..., help="SQL to run; or end it with FORMAT <name> for any ClickHouse output format"),
    dsn: str = typer.Option("chdb:///./shadowlens-data/chdb", help="chdb:///path or http://host:8123"),
    fmt: str = typer.Option("tsv", "--format", "-f", help="tsv (with a header row), table, json (one object a "
                                                          "line) or vertical"),
    token: str = typer.Option(None, envvar="SHADOWLENS_API_TOKEN", help="bearer token of the worker's API, "
                                                                        "when the query goes through it"),
) -> None:
    """Run a query against the shadowlens ClickHouse.

    With chDB while a worker holds the data path, the query goes to that worker's API
    (read-only, at most 10,000 rows and 10 s), found through ``<path>.api.json``."""
    import re

    from streams.sink import ClickHouseSink, DataPathInUse, SinkUnavailable

    if fmt not in ("tsv", "table", "json", "vertical"):
        _fail(f"--format: {fmt!r} is not a format; use tsv, table, json or vertical")
    try:
        sink = ClickHouseSink(dsn, create=False)
    except DataPathInUse as exc:
        names, rows = _query_through_worker(dsn, sql, token, exc)
        _print_rows(names, rows, fmt)
        return
    except SinkUnavailable as exc:
        _fail(exc)
    try:
        if re.search(r"\bFORMAT\s+\w+\s*;?\s*$", sql, re.IGNORECASE) or fmt == "vertical":
            text = sql if fmt != "vertical" else f"{sql.rstrip().rstrip(';')} FORMAT Vertical"
            typer.echo(sink.client.raw_query(text).decode(errors="replace"), nl=False)
            return
        result = sink.client.query(sql)
    except Exception as exc:  # noqa: BLE001 - the server's message, one line, is what helps
        _fail(f"query failed: {_first_line(exc)}", code=1, cause=exc)
    _print_rows(list(result.column_names), result.result_rows, fmt)


def _query_through_worker(dsn: str, sql: str, token: str | None, locked: BaseException):
    import json
    import os

    import httpx

    from streams.sink import chdb_path, resolve_dsn

    sidecar = f"{chdb_path(resolve_dsn(dsn)).rstrip('/')}.api.json"
    try:
        with open(sidecar) as f:
            url = json.load(f)["url"]
    except (OSError, ValueError, KeyError):
        _fail(f"{locked}; that process serves no API to query through (no {sidecar})")
    token = token or (os.environ.get("SHADOWLENS_API_TOKENS", "").split(",")[0] or None)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.post(f"{url}/v1/query", json={"sql": sql}, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        _fail(f"the worker holding {chdb_path(resolve_dsn(dsn))} serves its API at {url}, but it did not answer "
              f"({exc}); is it still starting?")
    if response.status_code == 401:
        _fail(f"the worker's API at {url} needs its token: pass --token or set SHADOWLENS_API_TOKEN")
    if response.status_code != 200:
        detail = response.json().get("detail", response.text) if "json" in response.headers.get(
            "content-type", "") else response.text
        _fail(f"query failed: {detail}", code=1)
    body = response.json()
    return body["columns"], body["rows"]


def _print_rows(names: list[str], rows, fmt: str) -> None:
    import json

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


@app.command()
def init(
    models: list[Path] = typer.Argument(..., help="ONNX files of the candidates"),
    model: str = typer.Option(..., "--model", help="the logical model name the producers send (MirroredRequest.model)"),
    baseline_output: str = typer.Option(None, help="MirroredRequest.baseline_output entry (default: the output)"),
    out: Path = typer.Option(Path("shadowlens.toml"), "--out", "-o", help="config file to write"),
    force: bool = typer.Option(False, help="overwrite an existing file"),
) -> None:
    """Write a commented starter config for these models (validated by the worker's own checks)."""
    from streams.init_config import write_starter

    try:
        path = write_starter(out, models, model, baseline_output, force)
    except (FileExistsError, FileNotFoundError, ConfigError) as exc:
        _fail(exc)
    typer.echo(f"wrote {path}; start it with: shadowlens worker -c {path}")


@app.command("build-models")
def build_models(out_dir: Path = typer.Argument(Path("shadowlens-data/models"))) -> None:
    """Train and export the digits demo models to ONNX."""
    from streams.models import build_digits_models

    for name, path in build_digits_models(out_dir).items():
        typer.echo(f"{name}\t{path}")


_DEBUG = {"on": False}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # clickhouse-connect wraps the server's message: keep the part that names the problem
    for line in text.splitlines():
        if "DB::Exception" in line or "Code:" in line:
            return line.strip()[:400]
    return (text.splitlines() or [type(exc).__name__])[0][:400]


def _fail(message: BaseException | str, code: int = 2, cause: BaseException | None = None) -> None:
    """One line naming the cause and the fix; the traceback only with ``shadowlens --debug``."""
    original = cause or (message if isinstance(message, BaseException) else None)
    if _DEBUG["on"] and original is not None:
        import traceback

        traceback.print_exception(original)
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


def _settings(path: Path):
    try:
        return load_settings(path)
    except ConfigError as exc:
        typer.secho(f"config error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc


def _fmt(metric, digits: int = 3, pct: bool = False) -> str:
    """'estimate mark margin': '>' confidently worse, '≤' confidently within, '?' undecided."""
    if metric is None or metric.estimate is None:
        return "-"
    mark = {"fail": ">", "pass": "≤"}.get(metric.decision, "?")
    if pct:
        return f"{metric.estimate:.1%}{mark}{metric.margin:.0%}"
    return f"{metric.estimate:.{digits}f}{mark}{metric.margin:g}"


def _colour(verdict: str) -> str:
    return {"promote": "[green]promote[/]", "rollback": "[red]rollback[/]"}.get(verdict, "[yellow]hold[/]")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"shadowlens {version('shadowlens')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version"),
    debug: bool = typer.Option(False, "--debug", help="print tracebacks behind error lines"),
) -> None:
    """shadowlens: shadow-traffic diff and evaluation for ML models."""
    _DEBUG["on"] = debug
    import logging

    # clickhouse-connect logs its own failures before raising them; ours say cause and fix once
    logging.getLogger("clickhouse_connect").setLevel(logging.DEBUG if debug else logging.CRITICAL)


def main() -> None:
    app()
if __name__ == "__main__":
    main()
