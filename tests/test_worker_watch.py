"""A worker you can watch: startup summary, progress lines, a silent-topic warning, Prometheus /metrics.

Real worker process, real Kafka, chDB; the dashboard in deploy/grafana/ only uses series the worker
really exports.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from streams.demo import TrafficGenerator
from harness import WorkerProcess, free_port, produce, write_worker_config
from streams.models import build_digits_models

ROOT = Path(__file__).resolve().parents[1]


def metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None


def test_progress_lines_metrics_and_a_silent_topic_warning(kafka_bootstrap, new_topic, tmp_path):
    models = build_digits_models(tmp_path / "models")
    topic = new_topic("watch", partitions=2)
    api_port, metrics_port = free_port(), free_port()
    token = "watch-token-0123456789abcdef"  # the API runs no SQL without one
    config = write_worker_config(tmp_path, kafka_bootstrap, {"digits-v2": models["good"]}, topic, api_port,
                                 window_s=5, idle_close_s=2, partitions=2, api={"tokens": [token]},
                                 metrics={"port": metrics_port, "progress_s": 1, "no_traffic_warn_s": 3})  # fmt: skip
    worker = WorkerProcess(config, tmp_path / "worker.log")
    scrape = lambda: httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text  # noqa: E731
    try:
        worker.wait_for(lambda: "nothing has arrived on mirror topic" in worker.log_tail(20_000), 60, "silent warning")
        log = worker.log_tail(20_000)
        assert f"mirror topic {topic!r}" in log or f"mirror topic '{topic}'" in log
        assert "candidate digits/digits-v2:" in log and f"Prometheus metrics on http://127.0.0.1:{metrics_port}" in log
        produce(kafka_bootstrap, topic, TrafficGenerator(models["baseline"], rate_per_s=100).messages(600))

        def scraped_all():
            t = scrape()
            done = (metric(t, "shadowlens_replayed_requests_total") == 600
                    and metric(t, "shadowlens_verdict", candidate="digits-v2", state="judged"))
            return t if done else None

        text = worker.wait_for(scraped_all, 120, "metrics")
        assert metric(text, "shadowlens_diff_rows_written_total") == 600
        assert metric(text, "shadowlens_windows_closed_total") >= 1
        assert metric(text, "shadowlens_replay_batch_seconds_count") >= 1
        assert metric(text, "shadowlens_component_up", component="kafka") == 1
        assert metric(text, "shadowlens_verdict_age_seconds", candidate="digits-v2") is not None
        assert sum(metric(text, "shadowlens_consumer_lag", partition=str(p)) or 0 for p in (0, 1)) == 0
        worker.wait_for(lambda: re.search(r"progress: replayed 600 \(\d+/s\), lag p\d=0", worker.log_tail(20_000)),
                        30, "a progress line")
        # Analysts query while the worker holds the chDB path: through its API, read-only.
        cli = [sys.executable, "-m", "streams.cli", "query", "--dsn", f"chdb://{tmp_path / 'chdb'}", "--token", token]
        done = subprocess.run([*cli, "SELECT count() AS rows FROM shadowlens.request_diffs FINAL"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0 and done.stdout.splitlines() == ["rows", "600"], done.stderr
        refused = subprocess.run([*cli, "DROP TABLE shadowlens.verdicts"], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and refused.stderr.startswith("error: query failed:"), refused.stderr
        assert "only reads are allowed" in refused.stderr and "Traceback" not in refused.stderr
        assert "verdicts digits-v2=" in worker.log_tail(20_000)
        # Every series the shipped dashboard plots exists in what the worker exports.
        dashboard = json.loads((ROOT / "deploy/grafana/shadowlens.json").read_text())
        exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", []) if "expr" in t]
        assert exprs
        exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
        for expr in exprs:
            for name in re.findall(r"shadowlens_[a-z_]+", expr):
                assert name in exported, (name, expr)
    finally:
        worker.stop()


def test_metrics_port_in_use_is_one_line_and_exit_2(kafka_bootstrap, tmp_path):
    models = build_digits_models(tmp_path / "models")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_worker_config(tmp_path, kafka_bootstrap, {"digits-v2": models["good"]}, "unused", free_port(),
                                     metrics={"port": port})  # fmt: skip
        done = subprocess.run([sys.executable, "-m", "streams.cli", "worker", "--config", str(config)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: metrics address 127.0.0.1:{port} is not available")
    assert "SHADOWLENS_METRICS__PORT" in lines[0] and "Traceback" not in done.stderr
