"""The registry's promoted / rolled_back states and its history in ClickHouse, on real parts: real
Kafka and a ``--role all`` worker (replay and judge stages, chDB) with the digits models.

The broken candidate's verdict turns to rollback, and ``shadowlens candidates show`` says
``rolled_back`` (the judge's ``#verdict`` record on the registry topic); a new version of the same
candidate does not inherit it. A candidate added and retired with ``shadowlens candidates`` appears
in ``candidate_events`` as registered, then retired: through the analysts' SQL endpoint (the table is
allowed like every table of the project's database) and in chDB once the worker let go of the path.
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from streams.demo import TrafficGenerator
from harness import WorkerProcess, free_port, produce, stored_rows, window_aligned_start, write_worker_config
from streams.models import build_digits_models

pytestmark = pytest.mark.kafka

REQUESTS = 1500  # 30 s of event time at 50 a second: three 10 s windows
TOKEN = "registry-states-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLI = [sys.executable, "-m", "streams.cli", "candidates"]


def cli(config, *args: str) -> str:
    done = subprocess.run([*CLI, *args, "-c", str(config)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def show(config, candidate: str) -> dict:
    return json.loads(cli(config, "show", "--model", "digits", "--candidate", candidate))


def test_rollback_shows_in_the_registry_and_its_history_is_in_clickhouse(kafka_bootstrap, new_topic, tmp_path):
    models = build_digits_models(tmp_path / "models")
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    topic = new_topic("registry-states", partitions=3)
    config = write_worker_config(tmp_path, kafka_bootstrap, {"digits-v2": models["good"], "digits-v2-broken":
                                 models["broken"]}, topic, port, window_s=10, api={"tokens": [TOKEN]})  # fmt: skip
    start = window_aligned_start(REQUESTS, rate_per_s=50, window_s=10)
    messages = TrafficGenerator(models["baseline"], rate_per_s=50).messages(REQUESTS, start=start)

    def verdict(candidate: str) -> str | None:
        got = httpx.get(f"{api}/v1/verdicts/digits/{candidate}", headers=AUTH, timeout=5)
        assert got.status_code in (200, 404), got.text  # 404: no verdict yet
        return got.json()["verdict"] if got.status_code == 200 else None

    worker = WorkerProcess(config, tmp_path / "worker.log")
    try:
        produce(kafka_bootstrap, topic, messages)
        worker.wait_for(lambda: verdict("digits-v2-broken") == "rollback", 300, "the broken candidate's rollback")
        shown = worker.wait_for(lambda: (s := show(config, "digits-v2-broken"))["state"] == "rolled_back" and s,
                                120, "candidates show saying rolled_back")  # fmt: skip
        assert shown["verdict_state"]["version"] == 1 and shown["verdict_state"]["verdict"] == "rollback"
        listed = {r["candidate"]: r["state"] for r in json.loads(cli(config, "list", "--json"))}
        assert listed["digits-v2-broken"] == "rolled_back" and listed["digits-v2"] != "rolled_back"
        api_view = httpx.get(f"{api}/v1/candidates/digits/digits-v2-broken", headers=AUTH, timeout=10)
        assert api_view.status_code == 200 and api_view.json()["state"] == "rolled_back", api_view.text

        # A new artifact is a new version (pair digits-v2-broken@v2): the old version's rollback is not its.
        cli(config, "add", "--model", "digits", "--candidate", "digits-v2-broken", "--path", str(models["good"]))
        renewed = show(config, "digits-v2-broken")
        assert renewed["version"] == 2 and renewed["state"] in ("registered", "loading", "shadowing"), renewed
        assert [v["state"] for v in renewed["earlier_versions"]] == ["retired"]

        # Added and retired: the registry's history, as analysts read it (the SQL endpoint's allow-list).
        cli(config, "add", "--model", "digits", "--candidate", "digits-v3", "--path", str(models["good"]))
        cli(config, "retire", "--model", "digits", "--candidate", "digits-v3", "--reason", "not needed")
        sql = ("SELECT state FROM candidate_events FINAL WHERE candidate = 'digits-v3' AND source = 'record' "
               "ORDER BY at")

        def history() -> list[str] | None:
            got = httpx.post(f"{api}/v1/query", json={"sql": sql}, headers=AUTH, timeout=10)
            assert got.status_code == 200, got.text
            states = [r[0] for r in got.json()["rows"]]
            return states if states == ["registered", "retired"] else None

        worker.wait_for(history, 120, "candidate_events listing digits-v3 registered, then retired")
    finally:
        worker.stop()

    rows, verdicts, twice = stored_rows(
        tmp_path / "chdb",
        "SELECT source, state, version, by, reason, stop_offsets FROM shadowlens.candidate_events "
        "FINAL WHERE candidate = 'digits-v3' AND source = 'record' ORDER BY at",
        "SELECT pair, state FROM shadowlens.candidate_events FINAL "
        "WHERE candidate = 'digits-v2-broken' AND source = 'verdict'",
        # Each record once, however often the judge looked at the topic (replays of it add nothing).
        "SELECT count() FROM (SELECT model, candidate, version, at, source, state, count() AS n "
        "FROM shadowlens.candidate_events GROUP BY ALL HAVING n > 1)",
    )
    twice = twice[0][0]
    assert [(r[0], r[1], r[2]) for r in rows] == [("record", "registered", 1), ("record", "retired", 1)]
    assert rows[1][4] == "not needed" and rows[0][5] == "null" and json.loads(rows[1][5])  # stopped at offsets
    assert ("digits-v2-broken", "rolled_back") in verdicts
    assert twice == 0
