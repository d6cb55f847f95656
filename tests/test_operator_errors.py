"""Runtime failures an operator causes are one line naming the cause and the fix, with an exit code.

Each case runs the real CLI as a process against the real thing: a chDB folder held by another
process, a folder that does not exist, a ClickHouse URL nothing listens on, bad SQL, Kafka not
running. No tracebacks unless ``--debug``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

import pytest

from harness import free_port, free_port_pair, write_worker_config
from streams.models import build_digits_models
from streams.sink import ClickHouseSink

CLI = [sys.executable, "-m", "streams.cli"]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in done.stderr and "╭" not in done.stderr, done.stderr
    return [line for line in done.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "chdb"
    sink = ClickHouseSink(f"chdb://{path}")
    sink.client.command("CREATE TABLE IF NOT EXISTS shadowlens.t (x UInt8) ENGINE = Memory")
    sink.close()
    return path


def holder(path: Path) -> subprocess.Popen:
    """Another process holding the chDB data path (as a running worker does)."""
    code = (f"import sys, time; from streams.sink import ClickHouseSink; s = ClickHouseSink('chdb://{path}'); "
            f"print('open', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "open"
    return proc


def run_while_held(path: Path, *args: str) -> tuple[subprocess.CompletedProcess, int]:
    """Run the CLI while another process holds the chDB path; (result, the holder's pid)."""
    proc = holder(path)
    try:
        return run(*args), proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_query_prints_a_header_and_passes_format_through(demo_data):
    done = run("query", "--dsn", f"chdb://{demo_data}", "SELECT 1 AS one, 'a' AS letter")
    assert done.returncode == 0 and done.stdout.splitlines() == ["one\tletter", "1\ta"], done.stderr
    done = run("query", "--dsn", f"chdb://{demo_data}", "SELECT 1 AS one FORMAT Vertical")
    assert done.returncode == 0 and "Row 1:" in done.stdout and "one: 1" in done.stdout


def test_query_in_a_folder_without_data_does_not_create_one(tmp_path):
    missing = tmp_path / "nothing-here"
    done = run("query", "--dsn", f"chdb://{missing}", "SELECT 1")
    assert done.returncode == 2 and not missing.exists()
    assert error_lines(done) == [f"error: no shadowlens data at {missing}: run where the worker (or demo) ran, or "
                                 f"pass the full path, e.g. --dsn chdb:///abs/path/shadowlens-data/chdb"]


def test_query_while_another_process_holds_the_chdb_path(demo_data):
    done, pid = run_while_held(demo_data, "query", "--dsn", f"chdb://{demo_data}", "SELECT 1")
    lines = error_lines(done)
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert f"in use by process {pid}" in lines[0] and "http://" in lines[0]


def test_bad_sql_is_the_servers_message_in_one_line(demo_data):
    done = run("query", "--dsn", f"chdb://{demo_data}", "SELEC 1")
    lines = error_lines(done)
    assert done.returncode == 1 and len(lines) == 1 and "Syntax error" in lines[0], done.stderr
    debug = subprocess.run([*CLI, "--debug", "query", "--dsn", f"chdb://{demo_data}", "SELEC 1"],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert "Traceback" in debug.stderr  # --debug keeps the traceback for a bug report


def test_clickhouse_url_nothing_listens_on():
    port = free_port()
    done = run("query", "--dsn", f"http://127.0.0.1:{port}", "SELECT 1")
    lines = error_lines(done)
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: cannot reach ClickHouse at http://127.0.0.1:{port}")
    assert "SHADOWLENS_CLICKHOUSE_DSN" in lines[0]


def test_worker_without_kafka_says_so_once_and_keeps_waiting(tmp_path):
    models = build_digits_models(tmp_path / "models")
    port = free_port()
    config = write_worker_config(tmp_path, f"127.0.0.1:{free_port()}", {"digits-v2": models["good"]}, "t", port)
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP"}  # the config names the (absent) broker
    proc = subprocess.Popen([*CLI, "worker", "--config", str(config)], stderr=subprocess.PIPE, text=True, env=env)
    try:
        time.sleep(12)
        assert proc.poll() is None  # waits for the broker instead of dying
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    waiting = [line for line in err.splitlines() if "kafka unavailable" in line]
    assert len(waiting) == 1, err
    assert "scripts/kafka.sh start" in waiting[0] and "SHADOWLENS_KAFKA__BOOTSTRAP" in waiting[0]
    assert "Traceback" not in err and "aiokafka" not in err


def test_second_worker_on_one_chdb_folder_exits_with_one_line(kafka_bootstrap, tmp_path):
    models = build_digits_models(tmp_path / "models")
    topic = f"twice-{uuid.uuid4().hex[:8]}"
    config = write_worker_config(tmp_path, kafka_bootstrap, {"digits-v2": models["good"]}, topic, free_port())
    done, pid = run_while_held(tmp_path / "chdb", "worker", "--config", str(config))
    lines = error_lines(done)
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert f"in use by process {pid}" in lines[0]
    # Found before Kafka is touched: no topic, no consumer (no "Unclosed AIOKafkaConsumer" dump).
    assert "Unclosed" not in done.stderr and not topics_named(kafka_bootstrap, topic)


@pytest.mark.parametrize("fmt,expected", [
    ("tsv", ["one\tletter", "1\ta"]),
    ("json", ['{"one": 1, "letter": "a"}']),
])
def test_query_formats(demo_data, fmt, expected):
    done = run("query", "--dsn", f"chdb://{demo_data}", "--format", fmt, "SELECT 1 AS one, 'a' AS letter")
    assert done.returncode == 0 and done.stdout.splitlines() == expected, done.stderr


def test_query_vertical_and_table_and_a_bad_format(demo_data):
    vertical = run("query", "--dsn", f"chdb://{demo_data}", "-f", "vertical", "SELECT 1 AS one")
    assert vertical.returncode == 0 and "one: 1" in vertical.stdout
    table = run("query", "--dsn", f"chdb://{demo_data}", "-f", "table", "SELECT 1 AS one")
    assert table.returncode == 0 and "one" in table.stdout and "1" in table.stdout
    bad = run("query", "--dsn", f"chdb://{demo_data}", "-f", "xml", "SELECT 1")
    assert bad.returncode == 2 and error_lines(bad) == ["error: --format: 'xml' is not a format; use tsv, table, "
                                                        "json or vertical"]


def test_standalone_api_on_a_held_chdb_path_is_one_line(demo_data, tmp_path):
    models = build_digits_models(tmp_path / "models")
    config = write_worker_config(tmp_path, "127.0.0.1:19092", {"digits-v2": models["good"]}, "t", free_port(),
                                 chdb=demo_data)  # fmt: skip
    done, pid = run_while_held(demo_data, "api", "--config", str(config))
    lines = error_lines(done)
    assert done.returncode == 2 and len(lines) == 1 and f"in use by process {pid}" in lines[0], done.stderr


def topics_named(bootstrap: str, prefix: str) -> set[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    async def run() -> set[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            return {t for t in await admin.list_topics() if t.startswith(prefix)}
        finally:
            await admin.close()

    return asyncio.run(run())


@pytest.mark.parametrize("mistake", ["missing output", "not onnx"])
def test_worker_refuses_a_candidate_it_cannot_load_before_creating_topics(kafka_bootstrap, tmp_path, mistake):
    models = build_digits_models(tmp_path / "models")
    topic = f"refused-{uuid.uuid4().hex[:8]}"
    path, extra = models["good"], {}
    if mistake == "missing output":
        extra = {"digits-v2": {"output": "scores"}}
    else:
        path = tmp_path / "model.onnx"
        path.write_bytes(b"PK\x03\x04 a zip file, not a model")
    config = write_worker_config(tmp_path, kafka_bootstrap, {"digits-v2": path}, topic, free_port(), extra=extra)
    done = run("worker", "--config", str(config))
    assert done.returncode == 2 and "Traceback" not in done.stderr and "╭" not in done.stderr, done.stderr
    (line,) = done.stderr.splitlines()
    if mistake == "missing output":
        assert line.startswith(f"config error: candidates.digits-v2.output: 'scores' is not an output of {path}")
    else:
        assert line.startswith(f"config error: candidates.digits-v2.path: {path}") and "onnx" in line.lower()
    assert not topics_named(kafka_bootstrap, topic)  # refused before the worker created anything


def test_init_on_a_file_that_is_not_onnx_is_one_line(tmp_path):
    npy = tmp_path / "weights.npy"
    np.save(npy, np.zeros(3))
    done = run("init", str(npy), "--model", "digits", "--out", str(tmp_path / "s.toml"))
    assert done.returncode == 2 and error_lines(done) == [
        f"error: {npy} is not an ONNX model (onnxruntime: Protobuf parsing failed.); point it at the .onnx file "
        "exported from the model (skl2onnx, torch.onnx.export, tf2onnx)"], done.stderr  # fmt: skip
    assert not (tmp_path / "s.toml").exists()


def test_unreachable_clickhouse_is_one_whole_line_without_retry_warnings(kafka_bootstrap, tmp_path):
    models = build_digits_models(tmp_path / "models")
    port = free_port()
    config = write_worker_config(tmp_path, kafka_bootstrap, {"digits-v2": models["good"]}, f"ch-{uuid.uuid4().hex[:8]}",
                                 free_port())  # fmt: skip
    env = {**os.environ, "SHADOWLENS_CLICKHOUSE_DSN": f"http://127.0.0.1:{port}"}
    env.pop("KAFKA_BOOTSTRAP", None)
    proc = subprocess.Popen([*CLI, "worker", "--config", str(config), "--role", "judge"], stderr=subprocess.PIPE,
                            text=True, env=env)  # fmt: skip
    try:
        time.sleep(8)  # several attempts (0.2 s, 0.4 s, ... backing off): each used to log a urllib3 warning
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    (line,) = [line for line in err.splitlines() if "clickhouse unavailable" in line]
    assert line.endswith(f"clickhouse unavailable (cannot reach ClickHouse at http://127.0.0.1:{port}: connection "
                         "refused; is the server running (docker compose up clickhouse)? check [clickhouse] dsn or "
                         "SHADOWLENS_CLICKHOUSE_DSN); waiting and retrying"), line  # fmt: skip
    for noise in ("urllib3", "Retrying", "Unclosed", "Traceback"):
        assert noise not in err, err


def test_processes_need_the_replay_role_and_free_metrics_ports(tmp_path):
    models = build_digits_models(tmp_path / "models")
    base = free_port_pair()
    config = write_worker_config(tmp_path, "127.0.0.1:19092", {"digits-v2": models["good"]}, "t", free_port(),
                                 metrics={"port": base})  # fmt: skip
    judge = run("worker", "--config", str(config), "--role", "judge", "--processes", "2")
    assert judge.returncode == 2 and error_lines(judge)[0].startswith("error: --processes: only the replay stage")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 1))
        taken.listen()
        done = run("worker", "--config", str(config), "--role", "replay", "--processes", "2")
    lines = error_lines(done)
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: metrics address 127.0.0.1:{base + 1} (replay process 2 of 2: [metrics] port "
                               "+ 1) is not available")  # fmt: skip


def test_query_through_the_worker_passes_format_through(kafka_bootstrap, tmp_path):
    """While the worker holds the chDB path the query goes through its API; a FORMAT clause comes
    back as ClickHouse's own text (the API's QueryResult.text)."""
    from harness import WorkerProcess

    models = build_digits_models(tmp_path / "models")
    token = "doctor-format-token-0123456789"
    config = write_worker_config(tmp_path, kafka_bootstrap, {"digits-v2": models["good"]},
                                 f"fmt-{uuid.uuid4().hex[:8]}", free_port(), api={"tokens": [token]})  # fmt: skip
    worker = WorkerProcess(config, tmp_path / "worker.log")
    env = {**os.environ, "SHADOWLENS_API_TOKEN": token}
    query = [*CLI, "query", "--dsn", f"chdb://{tmp_path / 'chdb'}"]
    try:
        worker.wait_for(lambda: (tmp_path / "chdb.api.json").exists(), 90, "the worker's API")
        done = subprocess.run([*query, "SELECT 1 AS one, 'a' AS letter FORMAT Vertical"], capture_output=True,
                              text=True, timeout=60, env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[:3] == ["Row 1:", "──────", "one:    1"], done.stdout
        done = subprocess.run([*query, "-f", "vertical", "SELECT 1 AS one"], capture_output=True, text=True,
                              timeout=60, env=env)  # fmt: skip
        assert done.returncode == 0 and "one: 1" in done.stdout.splitlines(), done.stderr
    finally:
        worker.stop()
