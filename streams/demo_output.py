"""What ``shadowlens demo`` prints: a verdict table per model (80 columns), the first reason of each
verdict, where the data is, and a shareable HTML report per candidate (streams/report) written next
to it, so a newcomer opens one page and sees what a gate reads and why."""

from __future__ import annotations

import re
from pathlib import Path


def print_demo(data_dir: Path, requests: int) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from streams.demo import run_demo

    console = Console()
    console.print(f"[bold]shadowlens demo[/]: {requests} mirrored digits requests (classification) and "
                  f"{requests // 2} diabetes requests (regression), 3 candidates each, chDB at {data_dir}")
    pipeline, figures = run_demo(data_dir, requests=requests)
    noise_refs = {c.name for c in pipeline.settings.candidates if c.noise_reference}
    verdicts = pipeline.board.verdicts()
    kinds = {c.model: c.kind for c in pipeline.settings.candidates}
    for model in kinds:  # one table per model (and so per output kind), in the config's order
        # Fits 80 columns: estimate, mark, margin (">" confidently worse, "≤" confidently within, "?" not
        # yet decided); sample counts and the first reason are printed below the tables.
        of_model = [v for v in verdicts if v.model == model]
        table = Table(title=f"Verdicts of model {model}, {kinds[model]} (latest per candidate)",
                      box=box.SIMPLE_HEAD, pad_edge=False)
        lat_name = next((m.name for v in of_model for m in v.metrics
                         if m.name.startswith("latency_p") and m.name.endswith("_ratio")), None)
        lat_header = lat_name.removeprefix("latency_").replace("_", " ") if lat_name else ""
        gated = ["flip rate", "|Δ conf|"] if kinds[model] == "classification" else ["disagree", "severity"]
        cols = ["candidate", "verdict", *gated, *([lat_header] if lat_name else []), "errors"]
        for col in cols:
            table.add_column(col, no_wrap=True)
        for v in of_model:
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
    reports = write_reports(pipeline, data_dir / "reports")
    console.print(f"Reports (one self-contained HTML page per candidate, as `shadowlens report` writes): "
                  f"{reports}", soft_wrap=True, highlight=False, markup=False)  # fmt: skip
    pipeline.sink.close()


def write_reports(pipeline, out_dir: Path) -> Path:
    """Every pair's report page into ``out_dir`` (``<model>--<candidate>.html``, other characters than
    letters, digits, '.', '_' and '-' as '_'); returns ``out_dir``."""
    from streams.report import report_html

    out_dir.mkdir(parents=True, exist_ok=True)
    for verdict in pipeline.board.verdicts():
        page = report_html(verdict, pipeline.sink, "the embedded chDB database")
        name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{verdict.model}--{verdict.candidate}")
        (out_dir / f"{name}.html").write_text(page, encoding="utf-8")
    return out_dir


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
