"""The ``shadowlens`` command: demo, worker, api, query, rejudge, build-models, mirror."""

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
from streams.registry.cli import app as candidates_app  # noqa: E402 - beside the mirror's commands

app.add_typer(candidates_app, name="candidates")


@app.command()
def demo(
    data_dir: Path = typer.Option(
        Path("shadowlens-demo"), help="where the demo's models and chDB data go (apart from a worker's shadowlens-data)"
    ),
    requests: int = typer.Option(6000, min=100, help="mirrored requests to generate"),
) -> None:
    """Build real models, mirror held-out traffic, replay it into chDB and print the verdicts."""
    from streams.demo_output import print_demo

    print_demo(data_dir, requests)


@app.command()
def worker(
    config: Path = typer.Option(..., "--config", "-c", help="TOML config file"),
    role: str = typer.Option("all", help="replay | judge | all (both stages in this process)"),
    loglevel: str = typer.Option("info"),
    processes: int = typer.Option(1, min=1, help="with --role replay: run this many replay processes on this box "
                                                 "(a replay process uses one core), supervised by this one; each "
                                                 "serves metrics on [metrics] port + i (0: any free port)"),
    replica: str = typer.Option(None, hidden=True, help="set by --processes: 'i/N', shown in every log line"),
) -> None:
    """Run the worker: the replay stage, the judge stage (and the verdicts API), or both.

    Before it creates a topic, a consumer or a database it checks that every candidate's model
    loads with its output and that the chDB path is free (`shadowlens doctor` checks more)."""
    from streams.topology import run_worker

    if role not in ("all", "replay", "judge"):
        typer.secho(f"--role: {role!r} is not a role; use replay, judge or all", fg="red", err=True)
        raise typer.Exit(2)
    if processes > 1 and role != "replay":
        _fail("--processes: only the replay stage runs as several processes on one box; add --role replay (judges "
              "scale with kafka.diffs_partitions and an http:// ClickHouse, one process each)")
    from streams.api.app import AddressUnavailable
    from streams.metrics import MetricsAddressUnavailable
    from streams.sink import SinkUnavailable

    settings = _settings(config)
    try:
        if processes > 1:
            from streams.replay.replicas import run_replicas

            code = run_replicas(config, settings, processes, loglevel, debug=_DEBUG["on"])
        else:
            run_worker(settings, role=role, loglevel=loglevel, replica=replica)  # type: ignore[arg-type]
            code = 0
    except (AddressUnavailable, SinkUnavailable, MetricsAddressUnavailable) as exc:
        _fail(exc)
    except ConfigError as exc:  # found where the API starts: [api] exposed without tokens
        typer.secho(f"config error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    if code:
        raise typer.Exit(code)


@app.command()
def doctor(
    config: Path = typer.Option(..., "--config", "-c", help="TOML config file"),
    sample: int = typer.Option(200, min=0, help="mirror records to replay: the last ones of each partition, read "
                                                "without a consumer group (nothing consumed); 0: skip"),
    role: str = typer.Option("all", help="check what this role needs: replay (models, Kafka), judge (database, "
                                         "API, Kafka) or all"),
) -> None:
    """Check a config before traffic counts: models and outputs, real records through the adapter and
    models, topics, ports, the database. Exit 0: all fine; 1: a ✗ row (each names its fix)."""
    from streams.doctor.checks import FAIL, render, run_doctor

    if role not in ("all", "replay", "judge"):
        _fail(f"--role: {role!r} is not a role; use replay, judge or all")
    checks = run_doctor(_settings(config), sample=sample, role=role)
    render(checks)
    if any(c.status == FAIL for c in checks):
        raise typer.Exit(1)


@app.command()
def api(config: Path = typer.Option(..., "--config", "-c", help="TOML config file")) -> None:
    """Serve the verdicts API alone, from ClickHouse (an http:// DSN; with chDB the worker serves it).

    Its board is re-read every [api] refresh_s; run it where several judge processes write. It
    serves every stored verdict, configured in this file or not (a rollback stays rollback)."""
    import signal
    import sys
    from functools import partial

    import uvicorn

    from streams.api.app import AddressUnavailable, bind, create_app
    from streams.api.board import BoardRefresher, VerdictBoard
    from streams.judge.retire import retire_pair
    from streams.sink import ClickHouseSink, SinkUnavailable, chdb_path
    from streams.topology import write_api_sidecar

    settings = _settings(config)
    if (problem := settings.api.exposure_problem()) is not None:
        typer.secho(f"config error: {problem}", fg="red", err=True)
        raise typer.Exit(2)
    try:
        sock = bind(settings.api.host, settings.api.port)
        dsn = settings.clickhouse.dsn
        sink = ClickHouseSink(dsn, settings.clickhouse.database, create=chdb_path(dsn) is None,
                              analyst_rows_per_s=settings.api.analyst_rows_per_s)
    except (AddressUnavailable, SinkUnavailable) as exc:
        _fail(exc)
    board = VerdictBoard.from_settings(settings)
    refresher = BoardRefresher(board, sink, settings.api.refresh_s)
    refresher.start()
    app_ = create_app(board, sink, tokens=settings.api.tokens, retire=partial(retire_pair, sink, board=board),
                      registry=settings)
    write_api_sidecar(settings)  # with chDB this process holds the path: query and retire come through it
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again with the handler found
    # at start: this one ends the process through the finally below instead of killing it there.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.Server(uvicorn.Config(app_, log_level="warning", access_log=False)).run(sockets=[sock])
    finally:
        write_api_sidecar(settings, remove=True)
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
    from streams.api.query_output import FORMAT_CLAUSE, QueryFailed, print_rows, through_worker
    from streams.sink import ClickHouseSink, DataPathInUse, SinkUnavailable

    if fmt not in ("tsv", "table", "json", "vertical"):
        _fail(f"--format: {fmt!r} is not a format; use tsv, table, json or vertical")
    try:
        sink = ClickHouseSink(dsn, create=False)
    except DataPathInUse as exc:
        try:
            answer = through_worker(dsn, sql, token, exc)
        except QueryFailed as failed:
            _fail(failed, code=failed.code)
        if isinstance(answer, str):  # a FORMAT clause: ClickHouse's own output
            typer.echo(answer, nl=False)
        else:
            print_rows(*answer, fmt)
        return
    except SinkUnavailable as exc:
        _fail(exc)
    try:
        if FORMAT_CLAUSE.search(sql) or fmt == "vertical":
            text = sql if fmt != "vertical" else f"{sql.rstrip().rstrip(';')} FORMAT Vertical"
            typer.echo(sink.client.raw_query(text).decode(errors="replace"), nl=False)
            return
        result = sink.client.query(sql)
    except Exception as exc:  # noqa: BLE001 - the server's message, one line, is what helps
        _fail(f"query failed: {_first_line(exc)}", code=1, cause=exc)
    print_rows(list(result.column_names), result.result_rows, fmt)


verdicts_app = typer.Typer(help="Operator commands on stored verdicts.", no_args_is_help=True)
app.add_typer(verdicts_app, name="verdicts")


@verdicts_app.command("retire")
def verdicts_retire(
    config: Path = typer.Option(..., "--config", "-c", help="TOML config file (its [clickhouse] and [api])"),
    model: str = typer.Option(..., "--model", help="the pair's model"),
    candidate: str = typer.Option(..., "--candidate", help="the pair's candidate"),
    reason: str = typer.Option("retired by an operator", help="why; it goes into the verdict's first reason"),
    by: str = typer.Option(None, help="who retires it (default: user@host)"),
    token: str = typer.Option(None, envvar="SHADOWLENS_API_TOKEN", help="token of the API it goes through "
                                                                        "(default: the config's first [api] token)"),
) -> None:
    """Retire a pair's verdict: how an operator clears a rollback.

    A rollback never expires; this writes a hold with state "retired" (the replaced decision in
    last_decision) that gates read instead. If the candidate stays configured and its traffic
    flows, the judge's next verdict replaces it. With chDB held by a running worker (or a
    standalone api) it goes through that process's API, found through <path>.api.json."""
    from streams.judge.retire import RetireFailed, retire, who

    settings = _settings(config)
    try:
        row, how = retire(settings, model, candidate, reason, by or who(), token)
    except RetireFailed as exc:
        _fail(exc)
    typer.echo(f"retired {model}/{candidate} ({how}): gates now read hold (state retired; last decision "
               f"{row.last_decision}) until the judge writes a newer verdict for it")


@app.command()
def rejudge(
    model: str = typer.Option(..., "--model", help="the pair's model"),
    candidate: str = typer.Option(..., "--candidate", help="the pair's candidate"),
    policy: Path = typer.Option(None, "--policy", help="TOML of JudgePolicy fields (top level or [policy]) that "
                                "replace the pair's configured ones; default: the configured policy"),
    config: Path = typer.Option(Path("shadowlens.toml"), "--config", "-c", help="the worker's TOML config"),
    as_json: bool = typer.Option(False, "--json", help="one JSON document instead of the timeline"),
) -> None:
    """Replay a pair's stored diff rows through the judge under another policy (no model calls) and print
    its verdict timeline beside the recorded one. Exit 1 when the recorded policy does not reproduce the
    recorded verdicts. With chDB, stop the worker first (it holds the data path) or use an http:// DSN."""
    from streams.judge.rejudge import RejudgeFailed, run

    settings = _settings(config)
    try:
        text, code = run(settings, model, candidate, policy, as_json)
    except RejudgeFailed as exc:
        _fail(exc)
    typer.echo(text)
    if code:
        raise typer.Exit(code)


@app.command()
def ingest(
    config: Path = typer.Option(Path("shadowlens.toml"), "--config", "-c", help="the TOML config ([ingest], "
                                "[[ingest.kserve]], [kafka])"),
    loglevel: str = typer.Option("info", help="debug | info | warning"),
) -> None:
    """Zero-code ingest: take KServe's payload logger (point logger.url here) and write each logged call to the
    mirror topic as mirrored requests; no code in the served model (README, Zero-code ingest)."""
    from streams.api.app import AddressUnavailable
    from streams.ingest.service import run_ingest

    settings = _settings(config)
    try:
        run_ingest(settings, loglevel)
    except AddressUnavailable as exc:
        _fail(exc)
    except ConfigError as exc:
        typer.secho(f"config error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc


@app.command()
def report(
    model: str = typer.Option(..., "--model", help="the pair's model"),
    candidate: str = typer.Option(..., "--candidate", help="the pair's candidate"),
    config: Path = typer.Option(Path("shadowlens.toml"), "--config", "-c", help="the worker's TOML config"),
    out: Path = typer.Option(None, "--out", "-o", help="HTML file to write (default: <model>--<candidate>.html)"),
    token: str = typer.Option(None, envvar="SHADOWLENS_API_TOKEN", help="bearer token of the worker's API, "
                              "when the report comes through it"),
) -> None:
    """Write a shareable HTML report of a pair's verdict: the verdict a gate reads now, why, its metrics
    against their margins, windows, history, example requests. One self-contained file, no script. With
    chDB while a worker holds the data path, it comes from that worker's API (GET /v1/report/...)."""
    from streams.report.make import ReportFailed, make_report

    settings = _settings(config)
    try:
        page = make_report(settings, model, candidate, token)
    except ReportFailed as exc:
        _fail(exc)
    out = out or Path(f"{model}--{candidate}.html".replace("/", "_"))
    try:
        out.write_text(page, encoding="utf-8")
    except OSError as exc:
        _fail(f"cannot write the report to {out} ({exc.strerror}); pass --out with a writable path")
    typer.echo(str(out))


@app.command()
def init(
    models: list[Path] = typer.Argument(..., help="ONNX files of the candidates"),
    model: str = typer.Option(..., "--model", help="the logical model name the producers send (MirroredRequest.model)"),
    baseline_output: str = typer.Option(None, help="MirroredRequest.baseline_output entry (default: the output)"),
    out: Path = typer.Option(Path("shadowlens.toml"), "--out", "-o", help="config file to write"),
    force: bool = typer.Option(False, help="overwrite an existing file"),
    baseline: Path = typer.Option(None, "--baseline", help="the production model's own ONNX file: replayed as a "
                                  "noise_reference candidate (latency compared on the same hardware; noise floor)"),
    kind: str = typer.Option("classification", "--kind", help="what the models answer: classification, regression, "
                             "multilabel, ranking or embedding (README, Output kinds)"),
) -> None:
    """Write a commented starter config for these models (validated by the worker's own checks)."""
    from streams.init_config import write_starter

    try:
        path = write_starter(out, models, model, baseline_output, force, baseline=baseline, kind=kind)
    except (FileExistsError, FileNotFoundError, ConfigError) as exc:
        _fail(exc)
    except Exception as exc:  # noqa: BLE001 - a file onnxruntime cannot load (a .npy) is said in one line
        from streams.doctor.checks import onnx_load_problem

        if (problem := onnx_load_problem(exc)) is None:
            raise
        _fail(problem, cause=exc)
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
    # One line whatever the exception's text holds (a server's message may span several).
    typer.secho(f"error: {' '.join(str(message).split())}", fg="red", err=True)
    raise typer.Exit(code)


def _settings(path: Path):
    try:
        return load_settings(path)
    except ConfigError as exc:
        typer.secho(f"config error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc


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
