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
    from rich.console import Console
    from rich.table import Table

    from streams.demo import run_demo

    console = Console()
    console.print(f"[bold]shadowlens demo[/]: {requests} mirrored digits requests, 3 candidates, chDB at {data_dir}")
    pipeline, figures = run_demo(data_dir, requests=requests)
    table = Table(title="Verdicts (latest per candidate)")
    for col in ("model", "candidate", "verdict", "samples", "label flip rate", "|Δ confidence|", "reason"):
        table.add_column(col)
    for v in pipeline.board.verdicts():
        metrics = {m.name: m for m in v.metrics}
        flip = metrics.get("label_flip_rate")
        conf = metrics.get("abs_confidence_delta")
        table.add_row(
            v.model, v.candidate, _colour(v.verdict), str(v.samples), _fmt(flip), _fmt(conf),
            v.reasons[0] if v.reasons else "",
        )  # fmt: skip
    console.print(table)
    counts = pipeline.sink.diff_counts()
    console.print(f"{sum(counts.values())} diff rows, {figures['dead_letters']} dead letters, "
                  f"wall time {figures['wall_s']:.1f} s")  # fmt: skip
    dsn = pipeline.settings.clickhouse.dsn
    console.print(
        f"Data: {dsn} (database '{pipeline.settings.clickhouse.database}': request_diffs, window_stats, verdicts).\n"
        f"Query it:  shadowlens query --dsn '{dsn}' \"SELECT candidate, avg(label_flip) FROM "
        f"shadowlens.request_diffs FINAL GROUP BY candidate\""
    )
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

    try:
        run_worker(_settings(config), role=role, loglevel=loglevel)  # type: ignore[arg-type]
    except AddressUnavailable as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None


@app.command()
def api(config: Path = typer.Option(..., "--config", "-c", help="TOML config file")) -> None:
    """Serve the verdicts API alone, from ClickHouse (an http:// DSN; with chDB the worker serves it).

    Its board is re-read every [api] refresh_s; run it where several judge processes write."""
    import uvicorn

    from streams.api import bind, create_app
    from streams.board import BoardRefresher, VerdictBoard
    from streams.sink import ClickHouseSink

    from streams.api import AddressUnavailable

    settings = _settings(config)
    try:
        sock = bind(settings.api.host, settings.api.port)
    except AddressUnavailable as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    sink = ClickHouseSink(settings.clickhouse.dsn, settings.clickhouse.database)
    board = VerdictBoard.from_settings(settings)
    refresher = BoardRefresher(board, sink, settings.api.refresh_s)
    refresher.start()
    app_ = create_app(board, sink, tokens=settings.api.tokens)
    uvicorn.Server(uvicorn.Config(app_, log_level="warning", access_log=False)).run(sockets=[sock])
    refresher.stop()


@app.command()
def query(
    sql: str = typer.Argument(..., help="SQL to run"),
    dsn: str = typer.Option("chdb:///./shadowlens-data/chdb", help="chdb:///path or http://host:8123"),
) -> None:
    """Run a query against the shadowlens ClickHouse (chDB: only while no worker holds the path)."""
    from streams.sink import ClickHouseSink

    sink = ClickHouseSink(dsn)
    for row in sink.query(sql):
        typer.echo("\t".join(str(v) for v in row))


@app.command("build-models")
def build_models(out_dir: Path = typer.Argument(Path("shadowlens-data/models"))) -> None:
    """Train and export the digits demo models to ONNX."""
    from streams.models import build_digits_models

    for name, path in build_digits_models(out_dir).items():
        typer.echo(f"{name}\t{path}")


def _settings(path: Path):
    try:
        return load_settings(path)
    except ConfigError as exc:
        typer.secho(f"config error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc


def _fmt(metric) -> str:
    if metric is None or metric.estimate is None:
        return "-"
    lo = "?" if metric.lower is None else f"{metric.lower:.3f}"
    hi = "?" if metric.upper is None else f"{metric.upper:.3f}"
    return f"{metric.estimate:.3f} [{lo}, {hi}] ≤ {metric.margin:g}"


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
) -> None:
    """shadowlens: shadow-traffic diff and evaluation for ML models."""


def main() -> None:
    app()
if __name__ == "__main__":
    main()
