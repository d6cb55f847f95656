"""A shareable HTML report of one pair's verdict: ``GET /v1/report/{model}/{candidate}`` and
``shadowlens report``.

gather.py reads what the report shows (the verdict as a gate reads it, windows, history, example
requests, the candidate's registry records); render.py writes one self-contained page of it
(charts.py: its inline SVG). ``report_html`` is the whole of it for a caller that has a sink.
"""

from __future__ import annotations

from typing import Any

from schemas import Verdict
from streams.report.gather import ReportData, gather
from streams.report.render import CSP, render


def report_html(verdict: Verdict, sink: Any, source: str) -> str:
    """The page for ``verdict`` (as served to gates), its evidence read through ``sink``."""
    return render(gather(verdict, sink, source))


__all__ = ["CSP", "ReportData", "gather", "render", "report_html"]
