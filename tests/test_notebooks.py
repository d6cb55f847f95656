"""notebooks/shadow_analysis.ipynb runs top to bottom against real demo data (no Jupyter needed).

The demo pipeline writes a chDB directory in-process; then every code cell of the notebook is
executed in order in one namespace, as a kernel would, with ``SHADOWLENS_CLICKHOUSE_DSN`` pointed
at that directory. chDB lets one client path be open per process, so the demo's sink is closed
first and the notebook's last cell closes its own client.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "shadow_analysis.ipynb"
CANDIDATES = {"digits-v2", "digits-v2-degraded", "digits-v1-replay"}
REGRESSORS = {"diabetes-v2", "diabetes-v2-boosted", "diabetes-v1-replay"}
INJECTED_ERROR = "probabilities: shape mismatch: baseline (10,) candidate (9,)"


def load_notebook() -> dict:
    return json.loads(NOTEBOOK.read_text())


def run_notebook(dsn: str, monkeypatch: pytest.MonkeyPatch, model: str | None = "digits") -> dict:
    monkeypatch.setenv("SHADOWLENS_CLICKHOUSE_DSN", dsn)
    if model is None:
        monkeypatch.delenv("SHADOWLENS_MODEL", raising=False)
    else:
        monkeypatch.setenv("SHADOWLENS_MODEL", model)
    monkeypatch.setenv("MPLBACKEND", "Agg")  # if matplotlib is installed, plt.show() must not open a window
    ns: dict = {"__name__": "__main__"}
    try:
        for i, cell in enumerate(load_notebook()["cells"]):
            if cell["cell_type"] == "code":
                exec(compile("".join(cell["source"]), f"{NOTEBOOK.name}[cell {i}]", "exec"), ns)  # noqa: S102
    finally:
        if "client" in ns:  # the last cell closes it; a failing cell must not keep the chDB path open
            ns["client"].close()
    return ns


@pytest.fixture(scope="module")
def demo_dsn(tmp_path_factory) -> str:
    from schemas import RequestDiff
    from streams.demo import run_demo

    data_dir = tmp_path_factory.mktemp("notebook-demo")
    pipeline, figures = run_demo(data_dir, requests=1500, progress=False, tune_gc=False)
    try:
        assert figures["dead_letters"] == 0
        # The demo's candidates never fail; add a few failed requests so the error section has rows.
        now = datetime.now(UTC)
        pipeline.sink.insert_diffs([
            RequestDiff(model="digits", candidate="digits-v2", request_id=f"failed-{i}", baseline_version="v1",
                        sent_at=now, scored_at=now, baseline_label=3, error=INJECTED_ERROR,
                        attributes={"country": "de", "device": "web"})
            for i in range(3)
        ])  # fmt: skip
    finally:
        pipeline.sink.close()
    return pipeline.settings.clickhouse.dsn


def test_notebook_is_clean_nbformat4():
    nb = load_notebook()
    assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 4
    assert nb["metadata"]["kernelspec"]["language"] == "python"
    ids = [c["id"] for c in nb["cells"]]
    assert len(set(ids)) == len(ids)
    kinds = [c["cell_type"] for c in nb["cells"]]
    assert kinds.count("code") >= 8 and kinds.count("markdown") >= 7
    for cell in nb["cells"]:
        assert isinstance(cell["source"], list) and cell["metadata"] == {}
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, "commit the notebook without outputs"
    try:
        import nbformat
    except ImportError:
        return
    nbformat.validate(nbformat.reads(NOTEBOOK.read_text(), as_version=4))


@pytest.mark.parametrize("with_pandas", [True, False], ids=["pandas", "plain-rows"])
def test_notebook_runs_on_demo_data(demo_dsn, monkeypatch, capsys, with_pandas):
    if not with_pandas:
        monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas -> ImportError: text tables
        # ... and no matplotlib either: the note instead of a silently missing chart
        monkeypatch.setitem(sys.modules, "matplotlib", None)
        monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    ns = run_notebook(demo_dsn, monkeypatch)
    printed = capsys.readouterr().out
    assert (ns["pd"] is None) is (not with_pandas)
    if ns["plt"] is None:  # says why there is no chart instead of leaving it out silently
        assert "charts need matplotlib" in printed
    else:  # the figure exists: flip rate and p99 panels with a line per candidate, p99 on a log scale
        fig = ns["fig"]
        ax_flip, ax_p99 = fig.axes[:2]
        assert {line.get_label().split("/")[-1] for line in ax_flip.get_lines()} >= CANDIDATES
        assert ax_p99.get_yscale() == "log" and len(ax_p99.get_lines()) >= len(CANDIDATES)
        ns["plt"].close("all")

    # 1. latest verdicts, metrics parsed from the JSON body
    # The demo judges two models; MODEL = "digits" (SHADOWLENS_MODEL) keeps the classifier only.
    verdicts = {v["candidate"]: v for v in ns["verdicts"]}
    assert set(verdicts) == CANDIDATES
    assert verdicts["digits-v2-degraded"]["verdict"] == "rollback"
    assert verdicts["digits-v1-replay"]["verdict"] == "promote"
    assert all(v["samples"] == 1500 for v in verdicts.values())
    flip = {(m["candidate"], m["metric"]): m for m in ns["verdict_metrics"]}
    degraded = flip[("digits-v2-degraded", "label_flip_rate")]
    assert degraded["decision"] == "fail" and degraded["lower"] > degraded["margin"]
    assert degraded["lower"] <= degraded["estimate"] <= degraded["upper"]
    assert degraded["interval"].startswith("[")
    assert flip[("digits-v1-replay", "label_flip_rate")]["estimate"] == 0

    # 2. windows over time: 1500 requests at 50/s in 20 s windows -> every candidate has >= 2 windows
    per_candidate: dict[str, list[dict]] = {}
    for w in ns["windows"]:
        per_candidate.setdefault(w["candidate"], []).append(w)
    assert set(per_candidate) == CANDIDATES
    for rows in per_candidate.values():
        assert len(rows) >= 2 and sum(r["requests"] for r in rows) == 1500
        assert [r["window_start"] for r in rows] == sorted(r["window_start"] for r in rows)
        assert all(r["candidate_latency_p99_ms"] > 0 for r in rows)
    # every window of the degraded retrain flips more labels than any window of the good one
    assert min(r["flip_rate"] for r in per_candidate["digits-v2-degraded"]) > max(
        r["flip_rate"] for r in per_candidate["digits-v2"]
    )
    assert all(r["flip_rate"] == 0 for r in per_candidate["digits-v1-replay"])

    # 3. slices by country with counts, worst first
    slices = ns["slices"]
    assert {s["value"] for s in slices} == {"de", "fr", "us", "jp", "br"}
    assert slices[0]["candidate"] == "digits-v2-degraded"
    assert [s["flip_rate"] for s in slices] == sorted((s["flip_rate"] for s in slices), reverse=True)
    for s in slices:
        assert s["flip_rate_low"] <= s["flip_rate"] <= s["flip_rate_high"]
    assert sum(s["requests"] for s in slices if s["candidate"] == "digits-v1-replay") == 1500
    de = next(s for s in slices if s["candidate"] == "digits-v2" and s["value"] == "de")
    assert de["errors"] == 3 and de["requests"] == 303

    # 4. largest diffs: request ids to pull, biggest first, none for the noise reference
    top = ns["top_diffs"]
    assert top and top[0]["candidate"] == "digits-v2-degraded"
    assert [r["l1_distance"] for r in top] == sorted((r["l1_distance"] for r in top), reverse=True)
    assert len(ns["top_request_ids"]["digits-v2-degraded"]) == ns["TOP_N"]
    assert "digits-v1-replay" not in ns["top_request_ids"]
    assert all(r["label_flip"] for r in top if r["candidate"] == "digits-v2-degraded")

    # 5. confusion table of the worst candidate
    assert ns["confusion_candidate"] == "digits-v2-degraded"
    assert sum(row["total"] for row in ns["confusion_table"]) == 1500
    flips = sum(n for (b, c), n in ns["confusion"].items() if b != c)
    assert flips == sum(s["flips"] for s in slices if s["candidate"] == "digits-v2-degraded") > 0.05 * 1500
    assert ns["top_flips"] and ns["top_flips"][0][1] != ns["top_flips"][0][2]

    # 6. error reasons, digits folded, with example ids
    [reason] = ns["error_reasons"]
    assert reason["candidate"] == "digits-v2" and reason["requests"] == 3
    assert reason["reason"] == "probabilities: shape mismatch: baseline (N,) candidate (N,)"
    assert reason["example_error"] == INJECTED_ERROR
    assert set(reason["example_request_ids"]) == {"failed-0", "failed-1", "failed-2"}
    rates = {r["candidate"]: r for r in ns["error_rates"]}
    assert rates["digits-v2"]["errors"] == 3 and rates["digits-v2-degraded"]["errors"] == 0

    assert "Latest verdict per pair" in printed and "rollback" in printed


def test_relative_chdb_dsn_is_resolved_and_missing_data_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SHADOWLENS_CLICKHOUSE_DSN", "chdb:///./shadowlens-data/chdb")
    cells = [c for c in load_notebook()["cells"] if c["cell_type"] == "code"]
    ns: dict = {}
    exec("".join(cells[0]["source"]), ns)  # noqa: S102  parameters
    with pytest.raises(FileNotFoundError, match="shadowlens demo"):
        exec("".join(cells[1]["source"]), ns)  # noqa: S102  connection: nothing there, nothing created
    assert not (tmp_path / "shadowlens-data").exists()
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "shadowlens-data" / "chdb").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "notebooks")  # Jupyter starts in the notebook's folder
    assert ns["resolve_dsn"](ns["DSN"]) == f"chdb://{(tmp_path / 'shadowlens-data' / 'chdb').resolve()}"
    assert ns["resolve_dsn"]("http://localhost:8123") == "http://localhost:8123"


def test_chart_lines_break_across_gaps_between_runs(monkeypatch):
    """The notebook's with_gaps puts a NaN where windows are missing, so no line spans the gap."""
    from datetime import timedelta

    cell = next(c for c in load_notebook()["cells"] if "def with_gaps" in "".join(c["source"]))
    src = "".join(cell["source"])
    ns: dict = {}
    exec(src[src.index("def with_gaps"):src.index("if plt is None")], ns)  # noqa: S102
    t0 = datetime(2026, 11, 26, tzinfo=UTC)
    xs = [t0 + timedelta(seconds=60 * i) for i in (0, 1, 2, 30, 31)]
    gx, gy = ns["with_gaps"](xs, [1.0, 2.0, 3.0, 4.0, 5.0])
    assert len(gx) == 6 and gy[:3] == [1.0, 2.0, 3.0] and gy[3] != gy[3] and gy[4:] == [4.0, 5.0]
    assert ns["with_gaps"](xs[:3], [1.0, 2.0, 3.0]) == (xs[:3], [1.0, 2.0, 3.0])


def test_notebook_queries_through_the_worker_api_when_the_chdb_path_is_held(demo_dsn, monkeypatch, capsys):
    """With chDB the worker alone may open the data path; the notebook then reads through the worker's
    API (POST /v1/query, found in <path>.api.json). A process holds the path and serves the real API."""
    import subprocess

    from harness import free_port

    path = demo_dsn[len("chdb://"):]
    port = free_port()
    token = "notebook-token-0123456789abcdef"  # the API never runs SQL without one
    monkeypatch.setenv("SHADOWLENS_API_TOKEN", token)
    code = (
        "import json, uvicorn\n"
        "from streams.api.app import bind, create_app\n"
        "from streams.api.board import VerdictBoard\n"
        "from streams.sink import ClickHouseSink\n"
        f"sink = ClickHouseSink({demo_dsn!r}, create=False)\n"
        f"sock = bind('127.0.0.1', {port})\n"
        f"json.dump({{'url': 'http://127.0.0.1:{port}'}}, open({path + '.api.json'!r}, 'w'))\n"
        "print('serving', flush=True)\n"
        f"uvicorn.Server(uvicorn.Config(create_app(VerdictBoard(set(), 3600.0), sink, tokens=[{token!r}]), "
        "log_level='warning'))"
        ".run(sockets=[sock])\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "serving"
        ns = run_notebook(demo_dsn, monkeypatch)
    finally:
        holder.kill()
        holder.wait()
        Path(path + ".api.json").unlink(missing_ok=True)
    assert "querying through its API" in capsys.readouterr().out
    assert type(ns["client"]).__name__ == "WorkerApiClient"
    # The demo judges two models; MODEL = "digits" (SHADOWLENS_MODEL) keeps the classifier only.
    verdicts = {v["candidate"]: v for v in ns["verdicts"]}
    assert set(verdicts) == CANDIDATES and verdicts["digits-v2-degraded"]["verdict"] == "rollback"
    if ns.get("plt") is not None:
        ns["plt"].close("all")


def test_notebook_over_every_model_keeps_the_confusion_table_to_classifiers(demo_dsn, monkeypatch):
    """MODEL = None: both of the demo's models are listed, and the confusion table (class labels)
    is the worst *classifier's*, never the regressor's, however its verdict looks."""
    ns = run_notebook(demo_dsn, monkeypatch, model=None)
    by_model: dict[str, set[str]] = {}
    for v in ns["verdicts"]:
        by_model.setdefault(v["model"], set()).add(v["candidate"])
    assert by_model == {"digits": CANDIDATES, "diabetes": REGRESSORS}
    assert {v["kind"] for v in ns["verdicts"] if v["model"] == "diabetes"} == {"regression"}
    assert ns["confusion_candidate"] == "digits-v2-degraded"
    assert {w["model"] for w in ns["windows"]} == {"digits", "diabetes"}
