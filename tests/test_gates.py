"""Promotion gates on real parts: a worker process on real Kafka and chDB, polled over HTTP.

What a gate reads before, during and after traffic: configured pairs answer 200 hold while
waiting, unknown ones 404, a pair no longer configured (verdicts from an earlier config in the same
data path) is served as stored, by the stale rule, and listed only on request; every /v1 call
needs the token (Flagger's in the payload metadata); a candidate configured with the wrong
``baseline_output`` is a data problem (dead letters and a hold that says so), never a rollback; a
promote or hold older than the stale limit is served as hold (a rollback stands:
tests/test_sticky_rollback.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from schemas import Verdict
from streams.demo import TrafficGenerator
from harness import WorkerProcess, consume_all, free_port, produce, write_worker_config
from streams.models import build_digits_models
from streams.sink import ClickHouseSink

pytestmark = pytest.mark.kafka
TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REQUESTS = 1500


def seed_unconfigured_verdict(chdb_path) -> None:
    """A verdict from an earlier configuration, an hour old, in the data path the worker will use."""
    sink = ClickHouseSink(f"chdb:///{chdb_path}")
    now = datetime.now(UTC) - timedelta(hours=1)
    try:
        sink.insert_verdicts([Verdict(model="digits", candidate="digits-v1-old", verdict="promote", reasons=["old."],
                                      metrics=[], samples=9000, window_start=now, window_end=now, updated_at=now)])
    finally:
        sink.close()


def test_gate_states_auth_blame_and_staleness_on_a_live_worker(kafka_bootstrap, new_topic, tmp_path):
    models = build_digits_models(tmp_path / "models")
    topic = new_topic("gates", partitions=2)
    api_port = free_port()
    candidates = {"digits-v2": models["good"], "digits-v2-misnamed": models["good"], "other-v2": models["good"]}
    config = write_worker_config(
        tmp_path, kafka_bootstrap, candidates, topic, api_port, window_s=5, idle_close_s=2, partitions=2,
        api={"tokens": [TOKEN], "stale_after_windows": 3},  # stale after 3 x 5 s + 2 s grace
        extra={"digits-v2-misnamed": {"baseline_output": "probs"}, "other-v2": {"model": "other"}},
    )  # fmt: skip
    seed_unconfigured_verdict(tmp_path / "chdb")
    worker = WorkerProcess(config, tmp_path / "worker.log")
    api = f"http://127.0.0.1:{api_port}"
    get = lambda path, **kw: httpx.get(f"{api}{path}", timeout=5, **kw)  # noqa: E731
    try:
        worker.wait_for(lambda: get("/readyz").status_code == 200, 60, "the API")  # health stays open
        # -- auth ---------------------------------------------------------------------------
        assert get("/v1/verdicts").status_code == 401
        assert get("/v1/verdicts", headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
        assert get("/v1/verdicts").headers["www-authenticate"] == "Bearer"
        # -- before traffic: configured pairs wait, unknown ones are 404, unconfigured ones hidden --
        for model, cand in (("digits", "digits-v2"), ("other", "other-v2")):
            r = get(f"/v1/verdicts/{model}/{cand}", headers=AUTH)
            assert r.status_code == 200 and r.json()["verdict"] == "hold", r.text
            assert r.json()["state"] == "waiting_for_traffic" and "waiting for traffic" in r.json()["reasons"][0]
        assert get("/v1/verdicts/digits/nope", headers=AUTH).status_code == 404
        listed = {(v["model"], v["candidate"]) for v in get("/v1/verdicts", headers=AUTH).json()}
        assert listed == {("digits", "digits-v2"), ("digits", "digits-v2-misnamed"), ("other", "other-v2")}
        everything = {v["candidate"]: v for v in get("/v1/verdicts", params={"all": "true"}, headers=AUTH).json()}
        # Not configured here: served as stored, by the stale rule ("retired" is an operator's act only).
        unconfigured = everything["digits-v1-old"]
        assert unconfigured["state"] == "stale" and unconfigured["verdict"] == "hold"
        assert unconfigured["last_decision"] == "promote" and unconfigured["age_s"] > 3000
        # -- bounded parameters: 422, never 500 ---------------------------------------------
        for limit in (10**30, -1, 0, 1001):
            assert get("/v1/windows/digits/digits-v2", params={"limit": limit}, headers=AUTH).status_code == 422
        assert get(f"/v1/verdicts/digits/{'x' * 300}", headers=AUTH).status_code == 422
        # -- Flagger: token in the payload metadata ----------------------------------------
        hook = {"name": "digits-server", "namespace": "ml", "phase": "Progressing", "metadata": {"token": TOKEN}}
        gate = f"{api}/v1/gates/flagger/digits/digits-v2"
        assert httpx.post(gate, json={**hook, "metadata": {}}, timeout=5).status_code == 401
        assert httpx.post(gate, json=hook, timeout=5).status_code == 412  # hold: the canary waits

        # -- traffic ------------------------------------------------------------------------
        start = datetime(2026, 11, 26, 9, 0, 0, tzinfo=UTC)
        produce(kafka_bootstrap, topic, TrafficGenerator(models["baseline"], rate_per_s=100).messages(REQUESTS, start))

        def judged():
            totals = window_totals_auth(api, ["digits-v2"])
            v = get("/v1/verdicts/digits/digits-v2", headers=AUTH).json()
            return v if totals["digits-v2"] == REQUESTS and v["state"] == "judged" else None

        verdict = worker.wait_for(judged, 120, "the windows of digits-v2 to close")
        assert verdict["age_s"] is not None and 0 <= verdict["age_s"] < 15 and verdict["samples"] == REQUESTS
        decision = verdict["verdict"]
        assert (httpx.post(gate, json=hook, timeout=5).status_code == 200) == (decision == "promote")
        if decision == "hold":  # a hold names what it waits for
            assert verdict["blocking_metric"] and verdict["blocking_metric"] in verdict["reasons"][0]

        # -- blame: a misnamed baseline_output is a data problem, not a candidate failure ---
        def misnamed_judged():
            v = get("/v1/verdicts/digits/digits-v2-misnamed", headers=AUTH).json()
            return v if v["unscorable"] == REQUESTS else None

        misnamed = worker.wait_for(misnamed_judged, 60, "the misnamed candidate's verdict")
        assert misnamed["verdict"] == "hold" and misnamed["blocking_metric"] == "comparable", misnamed["reasons"]
        assert "baseline_mismatch" in misnamed["reasons"][0] and "not the candidate" in misnamed["reasons"][0]
        errors = next(m for m in misnamed["metrics"] if m["name"] == "error_rate")
        assert errors["estimate"] is None  # no request was counted against the candidate
        letters = [json.loads(m) for m in consume_all(kafka_bootstrap, f"{topic}.dlq", expect=REQUESTS)]
        assert {(d["error_type"], d["candidate"]) for d in letters} == {("baseline_mismatch", "digits-v2-misnamed")}
        assert "baseline_output.probs: missing in the request (it has: probabilities)" in letters[0]["reason"]
        assert "candidates.digits-v2-misnamed.baseline_output" in letters[0]["reason"]
        assert worker.log_path.read_text().count("dead-lettered as baseline_mismatch") <= 2  # rate-limited

        # -- staleness: traffic stopped, no new verdict for longer than 3 windows ------------
        def stale():
            v = get("/v1/verdicts/digits/digits-v2", headers=AUTH).json()
            return v if v["state"] == "stale" else None

        old = worker.wait_for(stale, 60, "the verdict to go stale")
        assert old["last_decision"] == decision and old["age_s"] > 17
        if decision == "rollback":  # a rollback stands, stale or not
            assert old["verdict"] == "rollback" and old["reasons"][0].startswith("Rollback stands")
        else:
            assert old["verdict"] == "hold" and old["reasons"][0].startswith("Hold: stale")
        assert httpx.post(gate, json=hook, timeout=5).status_code == 412  # a stale promote never promotes

        # -- the worker hangs (SIGSTOP, its API process keeps running): not ready, verdicts served --
        os.kill(worker.proc.pid, signal.SIGSTOP)
        try:
            hung = worker.wait_for(lambda: (r := get("/readyz")).status_code == 503 and r, 30, "readyz to notice")
            assert "no health report" in hung.json()["detail"]
            assert get("/v1/verdicts/digits/digits-v2", headers=AUTH).json()["state"] == "stale"
        finally:
            os.kill(worker.proc.pid, signal.SIGCONT)
        worker.wait_for(lambda: get("/readyz").status_code == 200, 30, "readyz after SIGCONT")
        assert worker.alive
    finally:
        worker.stop()


def window_totals_auth(api: str, candidates: list[str]) -> dict[str, int]:
    out = {}
    for cand in candidates:
        rows = httpx.get(f"{api}/v1/windows/digits/{cand}", params={"limit": 1000}, headers=AUTH, timeout=5).json()
        out[cand] = sum(r["requests"] for r in rows)
    return out


def test_api_port_in_use_is_one_line_and_exit_2(kafka_bootstrap, tmp_path):
    models = build_digits_models(tmp_path / "models")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_worker_config(tmp_path, kafka_bootstrap, {"digits-v2": models["good"]}, "unused", port)
        done = subprocess.run([sys.executable, "-m", "streams.cli", "worker", "--config", str(config)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: API address 127.0.0.1:{port} is not available"), done.stderr
    assert "[api] port" in lines[-1] and "Traceback" not in done.stderr

