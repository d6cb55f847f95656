"""Runtime failures an operator causes are one line naming the cause and the fix, with an exit code.

Each case runs the real CLI as a process against the real thing: a chDB folder held by another
process, a folder that does not exist, a ClickHouse URL nothing listens on, bad SQL, Kafka not
running. No tracebacks unless ``--debug``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streams.harness import free_port, write_worker_config
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
    config = write_worker_config(tmp_path, kafka_bootstrap, {"digits-v2": models["good"]}, "twice", free_port())
    done, pid = run_while_held(tmp_path / "chdb", "worker", "--config", str(config))
    lines = error_lines(done)
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert f"in use by process {pid}" in lines[0]


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
