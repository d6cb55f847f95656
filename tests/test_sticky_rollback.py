"""A rollback is never lost on its way to a gate: not by age, a restart or a standalone API.

On real parts: rollback verdicts are written into chDB with ``ClickHouseSink.insert_verdicts``
(traffic is not the point here: tests/test_gates.py and test_e2e_kafka.py judge real traffic),
then served by real ``shadowlens worker`` and ``shadowlens api`` processes and read over HTTP the
way Argo (``result.verdict``) and Flagger (the rollback webhook's status) read them. A rollback
stays rollback past the stale limit and across a restart, and is served by an API whose config
does not list the pair; ``shadowlens verdicts retire`` clears it, through a running process's API
(chDB held) or straight into the database.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from schemas import Verdict
from streams.api.board import VerdictBoard
from harness import WorkerProcess, free_port, write_worker_config
from streams.judge.retire import retirement
from streams.sink import ClickHouseSink

TOKEN = "sticky-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLI = [sys.executable, "-m", "streams.cli"]


def stored(candidate: str, verdict: str, age_s: float = 0.0, model: str = "digits") -> Verdict:
    at = datetime.now(UTC) - timedelta(seconds=age_s)
    return Verdict(model=model, candidate=candidate, verdict=verdict, reasons=[f"{verdict}: seeded evidence."],
                   metrics=[], samples=5000, window_start=at, window_end=at, updated_at=at)  # fmt: skip


def seed(chdb: Path, verdicts: list[Verdict]) -> None:
    sink = ClickHouseSink(f"chdb://{chdb}")
    try:
        sink.insert_verdicts(verdicts)
    finally:
        sink.close()


def latest(chdb: Path, candidate: str) -> Verdict | None:
    sink = ClickHouseSink(f"chdb://{chdb}", create=False)
    try:
        return sink.latest_verdict("digits", candidate)
    finally:
        sink.close()


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHADOWLENS_")}  # the config decides
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, env=env)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def flagger(api: str, hook: str, candidate: str, token: str | None = TOKEN) -> httpx.Response:
    payload = {"name": "digits-server", "namespace": "ml", "phase": "Progressing", "metadata": {"token": token}}
    return httpx.post(f"{api}/v1/gates/{hook}/digits/{candidate}", json=payload, timeout=5)


def test_the_board_keeps_a_rollback_until_newer_evidence_or_a_retirement():
    """The rules themselves, on the board the API serves from (a clock of its own)."""
    now = [datetime(2026, 11, 26, 12, tzinfo=UTC).timestamp()]
    board = VerdictBoard({("digits", "v2")}, stale_after_s=60, clock=lambda: now[0])

    def at(verdict: str) -> Verdict:
        stamp = datetime.fromtimestamp(now[0], UTC)
        return Verdict(model="digits", candidate="v2", verdict=verdict, reasons=[f"{verdict}."], metrics=[],
                       samples=1, window_start=stamp, window_end=stamp, updated_at=stamp)  # fmt: skip

    board.publish([at("rollback")])
    now[0] += 7 * 24 * 3600  # a week without traffic
    week = board.verdict("digits", "v2")
    assert (week.verdict, week.state, week.last_decision) == ("rollback", "stale", "rollback")
    assert week.reasons[0].startswith("Rollback stands") and week.reasons[1] == "rollback."
    assert board.verdict_json("digits", "v2") == week.model_dump_json().encode()
    board.publish([at("promote")])  # new evidence supersedes it
    assert board.verdict("digits", "v2").verdict == "promote"
    now[0] += 61
    assert board.verdict("digits", "v2").verdict == "hold"  # a stale promote is still a hold
    board.publish([at("rollback")])
    board.publish([retirement(board.stored("digits", "v2"), "withdrawn", "ops@test")])
    now[0] += 3600
    retired = board.verdict("digits", "v2")  # served as stored, at any age
    assert (retired.verdict, retired.state, retired.last_decision) == ("hold", "retired", "rollback")
    assert "retired by ops@test" in retired.reasons[0] and "withdrawn" in retired.reasons[0]


@pytest.mark.kafka
def test_a_rollback_stands_through_idle_and_a_restart_until_retired_through_the_worker(
    kafka_bootstrap, new_topic, models, tmp_path
):  # fmt: skip
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    config = write_worker_config(
        tmp_path, kafka_bootstrap, {"digits-v2": models["good"], "digits-v3": models["good"]}, new_topic("sticky"),
        port, window_s=2, api={"tokens": [TOKEN], "stale_after_windows": 1},  # stale after 1 x 2 s + 2 s grace
    )  # fmt: skip
    chdb = tmp_path / "chdb"
    seed(chdb, [stored("digits-v2", "rollback"), stored("digits-v3", "promote")])

    def verdict(candidate: str) -> dict:
        return httpx.get(f"{api}/v1/verdicts/digits/{candidate}", headers=AUTH, timeout=5).json()

    def stands(worker: WorkerProcess) -> dict:
        old = worker.wait_for(lambda: (v := verdict("digits-v2"))["age_s"] > 4 and v, 60, "the stale limit")
        assert (old["verdict"], old["state"], old["last_decision"]) == ("rollback", "stale", "rollback"), old
        assert old["reasons"][0].startswith("Rollback stands") and "verdicts retire" in old["reasons"][0]
        assert old["reasons"][1] == "rollback: seeded evidence."
        rollback_hook = flagger(api, "flagger-rollback", "digits-v2")
        assert rollback_hook.status_code == 200 and rollback_hook.json()["verdict"] == "rollback"  # rolls back
        assert flagger(api, "flagger", "digits-v2").status_code == 412
        promote = verdict("digits-v3")  # the stale rule still blocks an old promote
        assert (promote["verdict"], promote["state"], promote["last_decision"]) == ("hold", "stale", "promote")
        return old

    worker = WorkerProcess(config, tmp_path / "worker-1.log")
    try:
        worker.wait_for(lambda: httpx.get(f"{api}/readyz", timeout=5).status_code == 200, 90, "the API")
        before = stands(worker)
        worker.stop(signal.SIGTERM)
        assert worker.proc.returncode in (0, -signal.SIGTERM), worker.log_tail()
        worker = WorkerProcess(config, tmp_path / "worker-2.log")  # restarted on the same data
        worker.wait_for(lambda: httpx.get(f"{api}/readyz", timeout=5).status_code == 200, 90, "the restarted API")
        after = stands(worker)
        assert after["age_s"] > before["age_s"] and after["updated_at"] == before["updated_at"]

        # Retiring goes through the worker's API (it holds the chDB path), always behind a token.
        retire = f"{api}/v1/verdicts/digits/digits-v2/retire"
        assert httpx.post(retire, json={"reason": "x"}, timeout=5).status_code == 401
        assert httpx.post(retire, json={"reason": "x"}, headers={"Authorization": "Bearer wrong-0123456789abcdef"},
                          timeout=5).status_code == 401  # fmt: skip
        done = cli("verdicts", "retire", "--config", str(config), "--model", "digits", "--candidate", "digits-v2",
                   "--reason", "v2 withdrawn after INC-42", "--by", "oncall@test")  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert f"through the API at {api}" in done.stdout and "last decision rollback" in done.stdout
        retired = verdict("digits-v2")  # at once: the API publishes what it wrote
        assert (retired["verdict"], retired["state"], retired["last_decision"]) == ("hold", "retired", "rollback")
        assert retired["reasons"][0].startswith("Hold: retired by oncall@test") and "INC-42" in retired["reasons"][0]
        assert flagger(api, "flagger-rollback", "digits-v2").status_code == 412
        time.sleep(5)  # past the stale limit: a retirement is served as stored, never "stale"
        assert verdict("digits-v2")["state"] == "retired"
        listed = {v["candidate"]: v["state"] for v in httpx.get(f"{api}/v1/verdicts", headers=AUTH, timeout=5).json()}
        assert listed == {"digits-v2": "retired", "digits-v3": "stale"}
    finally:
        worker.stop()
    row = latest(chdb, "digits-v2")  # written to ClickHouse by the worker: it outlives the process
    assert row is not None and row.state == "retired" and row.last_decision == "rollback"


def test_a_standalone_api_serves_stored_rollbacks_it_does_not_configure_until_retired(models, tmp_path):
    """``shadowlens api`` on a chDB path no worker holds, its config listing only digits-v2."""
    chdb = tmp_path / "chdb"
    seed(chdb, [stored("digits-v1-gone", "rollback", age_s=3600), stored("digits-v1-other", "rollback"),
                stored("digits-v1-promoted", "promote", age_s=3600)])  # fmt: skip
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    config = write_worker_config(tmp_path, "127.0.0.1:1", {"digits-v2": models["good"]}, "unused", port,
                                 api={"tokens": [TOKEN]})  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHADOWLENS_")}
    log = (tmp_path / "api.log").open("w")
    proc = subprocess.Popen([*CLI, "api", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT, env=env)
    sidecar = Path(f"{chdb}.api.json")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "api.log").read_text()
            try:
                if httpx.get(f"{api}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        gone = httpx.get(f"{api}/v1/verdicts/digits/digits-v1-gone", headers=AUTH, timeout=5).json()
        assert (gone["verdict"], gone["state"]) == ("rollback", "stale") and gone["age_s"] > 3000  # never "retired"
        fresh = httpx.get(f"{api}/v1/verdicts/digits/digits-v1-other", headers=AUTH, timeout=5).json()
        assert (fresh["verdict"], fresh["state"]) == ("rollback", "judged")
        hook = flagger(api, "flagger-rollback", "digits-v1-gone")
        assert hook.status_code == 200 and hook.json()["verdict"] == "rollback"
        listed = {v["candidate"]: v["verdict"] for v in httpx.get(f"{api}/v1/verdicts", headers=AUTH, timeout=5).json()}
        assert listed == {"digits-v2": "hold", "digits-v1-gone": "rollback", "digits-v1-other": "rollback"}
        everything = httpx.get(f"{api}/v1/verdicts", params={"all": "true"}, headers=AUTH, timeout=5).json()
        promoted = next(v for v in everything if v["candidate"] == "digits-v1-promoted")
        assert (promoted["verdict"], promoted["state"], promoted["last_decision"]) == ("hold", "stale", "promote")

        # Through the standalone API (it holds the chDB path and says where it listens).
        assert sidecar.is_file()
        done = cli("verdicts", "retire", "-c", str(config), "--model", "digits", "--candidate", "digits-v1-gone")
        assert done.returncode == 0 and f"through the API at {api}" in done.stdout, done.stderr
        gone = httpx.get(f"{api}/v1/verdicts/digits/digits-v1-gone", headers=AUTH, timeout=5).json()
        assert (gone["verdict"], gone["state"], gone["last_decision"]) == ("hold", "retired", "rollback")
        assert "retired by an operator" in gone["reasons"][0]
        assert flagger(api, "flagger-rollback", "digits-v1-gone").status_code == 412
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()
    assert not sidecar.exists()  # removed on the way out

    # Nobody holds the path now: straight into the database.
    done = cli("verdicts", "retire", "-c", str(config), "--model", "digits", "--candidate", "digits-v1-other",
               "--reason", "replaced by v2")  # fmt: skip
    assert done.returncode == 0 and f"written to the chDB data at {chdb}" in done.stdout, done.stderr
    row = latest(chdb, "digits-v1-other")
    assert row.state == "retired" and row.verdict == "hold" and "replaced by v2" in row.reasons[0]
    # Nothing stored for the pair: one line, exit 2, nothing written.
    done = cli("verdicts", "retire", "-c", str(config), "--model", "digits", "--candidate", "digits-v9")
    assert done.returncode == 2 and "nothing to retire" in one_error_line(done)
    assert latest(chdb, "digits-v9") is None
