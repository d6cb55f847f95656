"""The shareable HTML report: it says the verdict a gate reads now, with the evidence the database
holds for it, and it is safe to open: no script, nothing loaded, every producer's string escaped.

- From the demo's real pipeline (chDB): the page's verdict, metrics, windows, history and example
  requests are the stored ones; a stale rollback stays rollback in the page as at the gate.
- Hostile strings (a producer's attribute, a reason, names) are text, never markup.
- Through a worker holding the chDB path: ``GET /v1/report/...`` behind the API's token, and
  ``shadowlens report`` finds that worker's API; once it stops, it reads the data directly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from harness import WorkerProcess, free_port, write_worker_config
from schemas import MetricJudgement, SliceJudgement, Verdict, WindowSummary
from streams.api.board import VerdictBoard
from streams.demo import run_demo
from streams.report import CSP, report_html
from streams.report.gather import ReportData, Section
from streams.report.render import render

TOKEN = "report-token-0123456789abcdef"
# Every element the renderer writes; anything else in a page came from the data.
ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "span", "b", "ul", "li", "table",
                "thead", "tbody", "tr", "th", "td", "code", "br", "svg", "line", "circle", "polyline", "text"}  # fmt: skip


class Page(HTMLParser):
    """The parts of a report a reader looks at, as parsed by a real HTML parser."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.h2: list[str] = []
        self.badge = ""
        self.tables: dict[str, list[list[str]]] = {}  # by the h2 above them (the metrics table: "Metrics")
        self._stack: list[str] = []
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self._text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        self._stack.append(tag if "badge" not in (attrs.get("class") or "") else "badge")
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        top = self._stack.pop() if self._stack else None
        if top == "badge":
            self.badge = "".join(self._text).strip()
        elif tag == "h2":
            self.h2.append("".join(self._text).strip())
        elif tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append(" ".join(" ".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None and self.h2:
            self.tables.setdefault(self.h2[-1], []).append(self._row)
            self._row = None
        self._text = []

    def handle_data(self, data):
        self._text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def assert_safe(text: str) -> Page:
    page = Page(text)
    assert {t for t, _ in page.tags} <= ALLOWED_TAGS, {t for t, _ in page.tags} - ALLOWED_TAGS
    for tag, attrs in page.tags:
        assert not any(a.startswith("on") or a in ("src", "href", "srcset", "action") for a in attrs), (tag, attrs)
    metas = [a for t, a in page.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert metas and metas[0]["content"] == CSP and "default-src 'none'" in CSP
    return page


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    pipeline, _ = run_demo(tmp_path_factory.mktemp("demo"), requests=1500, progress=False, tune_gc=False)
    yield pipeline
    pipeline.sink.close()


def test_the_page_is_the_stored_verdict_and_its_evidence(demo):
    verdicts = demo.board.verdicts()
    assert {v.verdict for v in verdicts} >= {"rollback"}, [(v.candidate, v.verdict) for v in verdicts]
    for v in verdicts:
        text = report_html(v, demo.sink, "the embedded chDB database")
        page = assert_safe(text)
        assert page.badge == v.verdict.upper()
        metrics = page.tables["Metrics"][1:]
        assert [row[0].split()[0] for row in metrics] == [m.name for m in v.metrics]
        marks = {"pass": "✓ pass", "fail": "✗ fail", "inconclusive": "? open"}
        assert [row[5] for row in metrics] == [marks[m.decision] for m in v.metrics]
        (stored_windows,) = demo.sink.query("SELECT count() FROM shadowlens.window_stats FINAL WHERE model = "
                                            "%(m)s AND candidate = %(c)s", {"m": v.model, "c": v.candidate})[0]
        assert stored_windows > 0 and f"{stored_windows} closed window(s)" in text
        history = page.tables["Verdict history"][1:]
        assert history and history[0][2] == v.verdict  # newest first: the change to the verdict served
        examples = page.tables["Example requests"][1:]
        assert [row[0] for row in examples] == v.example_request_ids[:20] and examples
        if v.verdict == "rollback":
            failing = {m.name for m in v.metrics if m.decision == "fail"}
            assert failing and all(row[5] == "✗ fail" for row in metrics if row[0].split()[0] in failing)


def test_a_stale_rollback_stays_rollback_in_the_page_and_a_stale_promote_is_a_hold(demo):
    stored = {(v.model, v.candidate): v for v in demo.board.verdicts()}
    later = max(v.updated_at for v in stored.values()) + timedelta(days=2)
    board = VerdictBoard(stored, stale_after_s=60, clock=lambda: later.timestamp())
    board.publish(list(stored.values()))
    for (model, candidate), v in stored.items():
        served = board.verdict(model, candidate)
        text = report_html(served, demo.sink, "x")
        assert Page(text).badge == ("ROLLBACK" if v.verdict == "rollback" else "HOLD")
        assert "state <b>stale</b>" in text and f"the judge's own decision: <b>{v.verdict}</b>" in text


def test_producer_and_operator_strings_are_text_never_markup():
    hostile = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
    now = datetime.now(UTC)
    verdict = Verdict(model="digits", candidate=f"v2{hostile}", verdict="rollback", reasons=[f"Rollback {hostile}"],
                      metrics=[MetricJudgement(name="label_flip_rate", estimate=0.2, lower=0.1, upper=0.3, margin=0.05,
                                               decision="fail", samples=900, detail=hostile)],
                      samples=900, window_start=now, window_end=now, updated_at=now,
                      worst_slices=[SliceJudgement(attribute=f"country{hostile}", value=hostile, metric="label_flip_rate",
                                                   estimate=0.3, lower=0.2, upper=0.4, samples=300, decision="fail")],
                      example_request_ids=[hostile], cast={f"pixels {hostile}": 3})  # fmt: skip
    window = WindowSummary(model="digits", candidate=verdict.candidate, window_start=now, window_end=now, requests=10,
                           errors=0, label_flips=2, flip_rate=0.2, mean_abs_confidence_delta=0.1,
                           baseline_latency_p50_ms=1, baseline_latency_p95_ms=2, baseline_latency_p99_ms=3,
                           candidate_latency_p50_ms=1, candidate_latency_p95_ms=2, candidate_latency_p99_ms=3,
                           updated_at=now)
    example = {"request_id": hostile, "sent_at": now, "baseline_label": 1, "candidate_label": 2, "label_flip": 1,
               "confidence_delta": -0.5, "l1_distance": 1.0, "baseline_latency_ms": 1.0,
               "candidate_latency_ms": float("nan"), "error": hostile, "attributes": {hostile: hostile},
               "metrics": {hostile: 1.0}}  # fmt: skip
    data = ReportData(verdict=verdict, windows=Section([window]), history=Section(unavailable=hostile),
                      examples=Section([example]), registry=Section([{"at": now, "version": 1, "source": hostile,
                      "state": "registered", "sha256": hostile, "path": "/x", "by": hostile, "reason": hostile}]),
                      generated_at=now, source=hostile)  # fmt: skip
    text = render(data)
    page = assert_safe(text)
    assert "<script" not in text and "<img" not in text
    assert page.badge == "ROLLBACK"
    assert hostile in page.tables["Example requests"][1][0]  # shown as the text it is


def seed_rollback(chdb: Path) -> None:
    """A stored rollback for digits/digits-v2, written by a process of its own (chDB opens one data path
    per process, and this module's demo holds another)."""
    code = ("from datetime import UTC, datetime\nfrom schemas import Verdict\nfrom streams.sink import ClickHouseSink\n"
            f"sink = ClickHouseSink('chdb://{chdb}')\nnow = datetime.now(UTC)\n"
            "sink.insert_verdicts([Verdict(model='digits', candidate='digits-v2', verdict='rollback', "
            "reasons=['Rollback.'], metrics=[], samples=5000, window_start=now, window_end=now, updated_at=now)])\n"
            "sink.close()\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_worker_serves_the_page_behind_its_token_and_the_cli_finds_it(kafka_bootstrap, new_topic, models,
                                                                          tmp_path):  # fmt: skip
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    config = write_worker_config(tmp_path, kafka_bootstrap, {"digits-v2": models["good"]}, new_topic("report"), port,
                                 api={"tokens": [TOKEN]})  # fmt: skip
    seed_rollback(tmp_path / "chdb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHADOWLENS_")}
    cli = [sys.executable, "-m", "streams.cli", "report", "-c", str(config), "--model", "digits"]
    worker = WorkerProcess(config, tmp_path / "worker.log")
    try:
        worker.wait_for(lambda: httpx.get(f"{api}/readyz", timeout=5).status_code == 200, 90, "the API")
        url = f"{api}/v1/report/digits/digits-v2"
        assert httpx.get(url, timeout=30).status_code == 401
        answer = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
        assert answer.headers["content-security-policy"] == CSP
        assert assert_safe(answer.text).badge == "ROLLBACK"
        assert httpx.get(f"{api}/v1/report/digits/nobody", headers={"Authorization": f"Bearer {TOKEN}"},
                         timeout=30).status_code == 404  # fmt: skip
        # The worker holds the chDB path: the CLI goes through its API (without the token: one line, exit 2).
        out = tmp_path / "page.html"
        refused = subprocess.run([*cli, "--candidate", "digits-v2", "--out", str(out)], capture_output=True,
                                 text=True, timeout=120, env=env)  # fmt: skip
        assert refused.returncode == 2 and "needs its token" in refused.stderr and len(refused.stderr.splitlines()) == 1
        done = subprocess.run([*cli, "--candidate", "digits-v2", "--out", str(out), "--token", TOKEN],
                              capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert assert_safe(out.read_text()).badge == "ROLLBACK"
    finally:
        worker.stop()
    # Nobody holds the path now: read directly, the same verdict; an unknown pair is one line, exit 2.
    direct = subprocess.run([*cli, "--candidate", "digits-v2", "--out", str(out)], capture_output=True, text=True,
                            timeout=120, env=env)  # fmt: skip
    assert direct.returncode == 0, direct.stderr
    page = assert_safe(out.read_text())
    assert page.badge == "ROLLBACK" and "the embedded chDB database" in out.read_text()
    unknown = subprocess.run([*cli, "--candidate", "nobody", "--out", str(tmp_path / "x.html")], capture_output=True,
                             text=True, timeout=120, env=env)  # fmt: skip
    assert unknown.returncode == 2 and "unknown pair digits/nobody" in unknown.stderr
    assert not (tmp_path / "x.html").exists()
