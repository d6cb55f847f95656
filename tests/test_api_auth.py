"""Authentication by default where SQL or data is served, and gates that fail loud, on real processes.

- An API on a non-loopback host without tokens does not start (``shadowlens worker`` and
  ``shadowlens api``: one config-error line, exit 2) unless ``[api] insecure = true`` says so.
- ``POST /v1/query`` and retiring never run without a token: 403 naming ``[api] tokens`` while
  none is set (reads stay open on loopback then, as before).
- With tokens, Flagger's rollback hook answers a caller it cannot authenticate with 200 (roll
  back) and nothing about the verdict; confirm-promotion answers 401 (never a pass).
- Reads do not wait on each other: /v1/windows answers while an analyst's query runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from schemas import Verdict
from harness import WorkerProcess, free_port, write_worker_config
from streams.sink import ClickHouseSink

TOKEN = "auth-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLI = [sys.executable, "-m", "streams.cli"]


def seed(chdb: Path, candidate: str, verdict: str) -> None:
    now = datetime.now(UTC)
    sink = ClickHouseSink(f"chdb://{chdb}")
    try:
        sink.insert_verdicts([Verdict(model="digits", candidate=candidate, verdict=verdict, reasons=[f"{verdict}."],
                                      metrics=[], samples=5000, window_start=now, window_end=now, updated_at=now)])
    finally:
        sink.close()


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SHADOWLENS_") and k != "KAFKA_BOOTSTRAP"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, env=clean_env())


def wait_ready(api: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{api}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(log.read_text())


def test_an_exposed_api_without_tokens_does_not_start_unless_insecure_on_purpose(models, tmp_path):
    port = free_port()
    exposed = write_worker_config(tmp_path, "127.0.0.1:1", {"digits-v2": models["good"]}, "unused", port,
                                  api={"host": "0.0.0.0"}, name="exposed.toml")  # fmt: skip
    for command in ("worker", "api"):
        done = run(command, "--config", str(exposed))
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.startswith("config error:")]
        assert lines == [lines[0]] and "[api] host = '0.0.0.0'" in lines[0], done.stderr
        assert "[api] tokens" in lines[0] and "[api] insecure = true" in lines[0]
    # On purpose: it starts, reads need no token, SQL and retiring stay off.
    seed(tmp_path / "chdb", "digits-v2", "hold")
    insecure = write_worker_config(tmp_path, "127.0.0.1:1", {"digits-v2": models["good"]}, "unused", port,
                                   api={"host": "0.0.0.0", "insecure": True}, name="insecure.toml")  # fmt: skip
    log = tmp_path / "api.log"
    with log.open("w") as out:
        proc = subprocess.Popen([*CLI, "api", "--config", str(insecure)], stdout=out, stderr=subprocess.STDOUT,
                                env=clean_env())  # fmt: skip
    api = f"http://127.0.0.1:{port}"
    try:
        wait_ready(api, proc, log)
        assert httpx.get(f"{api}/v1/verdicts/digits/digits-v2", timeout=5).json()["verdict"] == "hold"
        query = httpx.post(f"{api}/v1/query", json={"sql": "SELECT 1"}, timeout=5)
        assert query.status_code == 403 and "set [api] tokens" in query.json()["detail"]
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.kafka
def test_a_worker_without_tokens_serves_reads_but_no_sql_and_no_writes(kafka_bootstrap, new_topic, models, tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    config = write_worker_config(tmp_path, kafka_bootstrap, {"digits-v2": models["good"]}, new_topic("noauth"), port)
    chdb = tmp_path / "chdb"
    seed(chdb, "digits-v2", "rollback")
    worker = WorkerProcess(config, tmp_path / "worker.log")
    try:
        worker.wait_for(lambda: httpx.get(f"{api}/readyz", timeout=5).status_code == 200, 90, "the API")
        assert httpx.get(f"{api}/v1/verdicts/digits/digits-v2", timeout=5).json()["verdict"] == "rollback"
        hook = httpx.post(f"{api}/v1/gates/flagger-rollback/digits/digits-v2", json={"metadata": {}}, timeout=5)
        assert hook.status_code == 200 and hook.json()["verdict"] == "rollback"  # no tokens: as before
        query = httpx.post(f"{api}/v1/query", json={"sql": "SELECT 1"}, timeout=5)
        assert query.status_code == 403, query.text
        assert query.json()["detail"].startswith("SQL (POST /v1/query) needs authentication")
        assert "set [api] tokens" in query.json()["detail"] and "\n" not in query.json()["detail"]
        retire = httpx.post(f"{api}/v1/verdicts/digits/digits-v2/retire", json={"reason": "x"}, timeout=5)
        assert retire.status_code == 403 and "set [api] tokens" in retire.json()["detail"]
        # The CLI says so in one line, and nothing changed.
        done = run("query", "--dsn", f"chdb://{chdb}", "SELECT 1")
        assert done.returncode != 0 and "set [api] tokens" in done.stderr and "Traceback" not in done.stderr
        done = run("verdicts", "retire", "--config", str(config), "--model", "digits", "--candidate", "digits-v2")
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.returncode == 2 and len(errors) == 1 and "set [api] tokens" in errors[0], done.stderr
        assert httpx.get(f"{api}/v1/verdicts/digits/digits-v2", timeout=5).json()["verdict"] == "rollback"
    finally:
        worker.stop()


@pytest.mark.kafka
def test_flagger_rollback_hook_fails_closed_and_reads_do_not_wait(kafka_bootstrap, new_topic, models, tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    config = write_worker_config(tmp_path, kafka_bootstrap, {"digits-v2": models["good"]}, new_topic("auth"), port,
                                 api={"tokens": [TOKEN]})  # fmt: skip
    seed(tmp_path / "chdb", "digits-v2", "hold")
    worker = WorkerProcess(config, tmp_path / "worker.log")
    rollback = f"{api}/v1/gates/flagger-rollback/digits/digits-v2"
    confirm = f"{api}/v1/gates/flagger/digits/digits-v2"

    def hook(url: str, token: str | None, headers: dict | None = None) -> httpx.Response:
        payload = {"name": "digits-server", "namespace": "ml", "phase": "Progressing",
                   "metadata": {} if token is None else {"token": token}}  # fmt: skip
        return httpx.post(url, json=payload, headers=headers or {}, timeout=5)

    try:
        worker.wait_for(lambda: httpx.get(f"{api}/readyz", timeout=5).status_code == 200, 90, "the API")
        assert httpx.get(f"{api}/v1/verdicts/digits/digits-v2", headers=AUTH, timeout=5).json()["verdict"] == "hold"
        # A caller the rollback hook cannot authenticate: 200 (Flagger rolls back), nothing about the verdict.
        for token, headers in ((None, None), ("wrong-token-0123456789", None),
                               (None, {"Authorization": "Bearer wrong-token-0123456789"})):  # fmt: skip
            answer = hook(rollback, token, headers)
            assert answer.status_code == 200, answer.text
            assert list(answer.json()) == ["detail"] and answer.json()["detail"].startswith("rolling back: this "
                                                                                           "gate cannot authenticate")
            assert "hold" not in answer.text and "digits-v2" not in answer.text
            assert hook(confirm, token, headers).status_code == 401  # never a pass
        # With the token (payload or header): the verdict decides, as before.
        assert hook(rollback, TOKEN).status_code == 412 and hook(rollback, TOKEN).json()["verdict"] == "hold"
        assert hook(rollback, None, AUTH).status_code == 412
        assert hook(confirm, TOKEN).status_code == 412
        spec = httpx.get(f"{api}/openapi.json", timeout=5).json()  # open: the contract, no data
        assert "Fails closed" in spec["paths"]["/v1/gates/flagger-rollback/{model}/{candidate}"]["post"]["description"]

        # An analyst's slow query (2.5 s of sleep) runs in the worker's pool; /v1/windows does not wait behind it.
        slow_sql = "SELECT sum(sleepEachRow(0.5)) FROM numbers(5)"
        slow: dict = {}

        def analyst() -> None:
            t0 = time.monotonic()
            slow["answer"] = httpx.post(f"{api}/v1/query", json={"sql": slow_sql}, headers=AUTH, timeout=60)
            slow["took"] = time.monotonic() - t0

        thread = threading.Thread(target=analyst)
        thread.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        windows = httpx.get(f"{api}/v1/windows/digits/digits-v2", headers=AUTH, timeout=30)
        windows_took = time.monotonic() - t0
        thread.join(60)
        assert windows.status_code == 200 and windows.json() == []
        assert slow["answer"].status_code == 200, slow["answer"].text
        assert slow["took"] > 1.5, f"the slow query took {slow['took']:.2f} s: too fast to show anything"
        # Behind one lock and one answering thread (before) it took the query's time, less the 0.3 s head start.
        assert windows_took < slow["took"] / 2, (windows_took, slow["took"])
    finally:
        worker.stop()
