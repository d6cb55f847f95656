"""``shadowlens mirror ...`` commands (mounted by the shadowlens CLI in streams/cli.py).

    shadowlens mirror backfill requests.jsonl [--bootstrap 127.0.0.1:19092] [--topic T] [--model NAME]

Exit status: 0 all rows sent; 1 some rows skipped (invalid) or failed (not delivered);
2 nothing could be done (unreadable file, broker unreachable).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import typer
from tqdm import tqdm

from mirror.backfill import BackfillError, backfill, count_rows
from mirror.config import DEFAULT_TOPIC, MirrorConfig

app = typer.Typer(help="Mirror SDK tools.", no_args_is_help=True, add_completion=False)

_MAX_PROBLEM_LINES = 200  # per run, on stderr; the summary line always counts all


@app.callback()
def mirror() -> None:
    """Tools of the mirror SDK (backfill recorded requests into the mirror topic)."""


@app.command("backfill")
def backfill_command(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True,
                                help="JSONL (one MirroredRequest JSON object per line; tensor data may be lists) "
                                     "or Parquet (.parquet, needs pyarrow)"),
    bootstrap: str = typer.Option("127.0.0.1:19092", envvar="KAFKA_BOOTSTRAP", help="Kafka bootstrap servers"),
    topic: str = typer.Option(DEFAULT_TOPIC, help="mirror topic"),
    model: str | None = typer.Option(None, help="publish under this model name (default: each row's model)"),
    compression: str = typer.Option("lz4", help="lz4, zstd, gzip or none"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate only; send nothing"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bar on stderr"),
) -> None:
    """Send recorded requests into the mirror topic; report bad rows as 'line N: field: problem'.

    Exit status: 0 every row sent; 1 some rows skipped (invalid) or not delivered (each one listed);
    2 nothing could be done (unreadable file, broker unreachable)."""
    # aiokafka logs an ERROR for the topic's auto-creation and per retry; this command reports
    # every row that failed itself, so its own lines would only repeat that.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    config = MirrorConfig(bootstrap=bootstrap, topic=topic,
                          compression=None if compression.lower() == "none" else compression)
    shown = 0

    def on_problem(text: str) -> None:
        nonlocal shown
        shown += 1
        if shown <= _MAX_PROBLEM_LINES:
            bar.write(text, file=sys.stderr)
        elif shown == _MAX_PROBLEM_LINES + 1:
            bar.write("(more problems not shown; see the summary)", file=sys.stderr)

    with tqdm(total=count_rows(file), unit="row", desc="backfill", disable=not progress, file=sys.stderr) as bar:
        try:
            summary = asyncio.run(backfill(file, config, model=model, dry_run=dry_run,
                                           on_row=lambda: bar.update(1), on_problem=on_problem))
        except BackfillError as exc:
            bar.close()
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
    verb = "would send" if dry_run else "sent"
    typer.echo(f"{summary.line().replace('sent', verb, 1)} -> {topic}")
    if summary.oldest is not None and summary.oldest < datetime.now(UTC) - timedelta(days=1):
        # Old rows are not judged apart: they join the same pair's cumulative evidence as live traffic.
        typer.echo(f"note: rows sent_at {summary.oldest:%Y-%m-%d %H:%M} .. {summary.newest:%Y-%m-%d %H:%M} UTC join the "
                   f"evidence of model {model or 'as in each row'} together with live traffic (windows already "
                   f"closed are not reopened; the worker judges again once they land); to judge them apart, use --model <name>-backfill and configure "
                   f"candidates for it", err=True)
    raise typer.Exit(0 if summary.skipped == 0 and summary.failed == 0 else 1)


def main() -> None:  # pragma: no cover - for `python -m mirror.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
