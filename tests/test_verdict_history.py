"""Verdict history on real parts: mirrored traffic through real Kafka and a real worker process
(replay and judge stages, chDB) makes a broken candidate's verdict change from hold (the minimum
observation span) to rollback; ``GET /v1/verdicts/{model}/{candidate}/history`` (behind the API's
token, like every data read) and the ``verdict_changes`` view in ClickHouse list that change with
from, to, when, samples, the metric that decided and the policy's hash; an operator's retirement is
a change too.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from scorers.judge import JudgePolicy
from streams.demo import DEMO_POLICY, TrafficGenerator
from harness import WorkerProcess, free_port, produce, stored_rows, window_aligned_start, write_worker_config
from streams.judge.history import VerdictChange, policy_hash
from streams.models import build_digits_models

pytestmark = pytest.mark.kafka

REQUESTS = 3000  # 60 s of event time at 50 requests a second: six 10 s windows, sent in three parts
# A rollback on a gating metric waits for 25 s of event time (min_span_s): the first looks hold.
POLICY = {"min_span_s": 25.0}
TOKEN = "history-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FLIP_METRICS = {"label_flip_rate", "abs_confidence_delta", "accuracy_drop"}


def test_history_lists_each_verdict_change_from_the_api_and_the_view(kafka_bootstrap, new_topic, tmp_path):
    models = build_digits_models(tmp_path / "models")
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    topic = new_topic("history", partitions=3)
    config = write_worker_config(tmp_path, kafka_bootstrap, {"digits-v2": models["good"], "digits-v2-broken":
                                 models["broken"]}, topic, port, window_s=10, policy=POLICY,
                                 api={"tokens": [TOKEN]})  # fmt: skip
    start = window_aligned_start(REQUESTS, rate_per_s=50, window_s=10)
    messages = TrafficGenerator(models["baseline"], rate_per_s=50).messages(REQUESTS, start=start)
    expected_hash = policy_hash(JudgePolicy.from_dict({**DEMO_POLICY, **POLICY}))

    def scored(candidate: str) -> int:
        rows = httpx.get(f"{api}/v1/windows/digits/{candidate}", params={"limit": 1000}, headers=AUTH, timeout=5)
        return sum(r["requests"] for r in rows.json()) if rows.status_code == 200 else 0

    worker = WorkerProcess(config, tmp_path / "worker.log")
    try:
        # In three parts, each judged before the next arrives (the traffic pauses: windows close idle),
        # so the judge looks at 20, 40 and 60 s of event time, not once at the end of a backlog.
        for part in range(1, 4):
            produce(kafka_bootstrap, topic, messages[(part - 1) * REQUESTS // 3 : part * REQUESTS // 3])
            worker.wait_for(lambda n=part * REQUESTS // 3: min(scored("digits-v2"), scored("digits-v2-broken")) >= n,
                            300, f"the windows of part {part}")  # fmt: skip
        history = f"{api}/v1/verdicts/digits/digits-v2-broken/history"
        assert httpx.get(history, timeout=5).status_code == 401  # data, behind the token like /v1/windows
        answer = httpx.get(history, headers=AUTH, timeout=5)
        assert answer.status_code == 200, answer.text
        changes = [VerdictChange.model_validate(c) for c in reversed(answer.json())]  # oldest first
        assert [(c.from_verdict, c.to_verdict) for c in changes] == [(None, "hold"), ("hold", "rollback")], changes
        hold, rollback = changes
        assert hold.decided_by == "min_span" and hold.look == 1
        assert rollback.decided_by in FLIP_METRICS, rollback
        assert rollback.reason.startswith("Rollback:") and rollback.decided_by in rollback.reason
        assert 0 < hold.samples <= rollback.samples <= REQUESTS and hold.changed_at < rollback.changed_at
        assert rollback.look > hold.look and {c.policy_hash for c in changes} == {expected_hash}
        assert httpx.get(f"{api}/v1/verdicts/digits/nope/history", headers=AUTH, timeout=5).status_code == 404
        paths = httpx.get(f"{api}/openapi.json", timeout=5).json()["paths"]
        assert "/v1/verdicts/{model}/{candidate}/history" in paths

        # An operator's retirement is a change too: rollback -> hold, decided by 'retired', no policy.
        retired = httpx.post(f"{api}/v1/verdicts/digits/digits-v2-broken/retire", headers=AUTH, timeout=10,
                             json={"reason": "withdrawn", "by": "ops@test"})  # fmt: skip
        assert retired.status_code == 200, retired.text
        latest = VerdictChange.model_validate(httpx.get(history, headers=AUTH, timeout=5).json()[0])
        assert (latest.from_verdict, latest.to_verdict, latest.decided_by, latest.state, latest.policy_hash) == (
            "rollback", "hold", "retired", "retired", "")
        good = httpx.get(f"{api}/v1/verdicts/digits/digits-v2/history", headers=AUTH, timeout=5).json()
        assert good and good[-1]["from_verdict"] is None and good[-1]["look"] == 1
    finally:
        worker.stop()

    # The view in ClickHouse holds the same changes (chDB: read once the worker let go of the path).
    rows, total = stored_rows(
        tmp_path / "chdb",
        "SELECT from_verdict, to_verdict, samples, decided_by, policy_hash, changed_at "
        "FROM shadowlens.verdict_changes WHERE candidate = 'digits-v2-broken' ORDER BY changed_at",
        "SELECT count() FROM shadowlens.verdicts WHERE candidate = 'digits-v2-broken'",
    )
    total = total[0][0]
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in rows[:2]] == [
        (None, "hold", hold.samples, "min_span", expected_hash),
        ("hold", "rollback", rollback.samples, rollback.decided_by, expected_hash),
    ]
    assert len(rows) == 3 and (rows[2][0], rows[2][1], rows[2][3], rows[2][4]) == ("rollback", "hold", "retired", "")
    assert rows[2][2] >= rollback.samples  # the retirement keeps the evidence of the verdict it replaced
    assert all(isinstance(r[5], datetime) for r in rows)
    assert total > len(rows)  # looks that did not change the verdict are in verdicts, not in the view
    # The dashboard's panel runs its SQL over the same view (Grafana's time macro as a plain filter).
    dashboard = json.loads((Path(__file__).resolve().parents[1] / "deploy/grafana/shadowlens.json").read_text())
    sql = next(t["rawSql"] for p in dashboard["panels"] for t in p.get("targets", []) if "verdict_changes" in
               t.get("rawSql", ""))  # fmt: skip
    (panel,) = stored_rows(tmp_path / "chdb",
                           sql.replace("$__timeFilter(changed_at)", "changed_at > now() - INTERVAL 6 HOUR"))
    assert [(r[3], r[4]) for r in panel if r[2] == "digits-v2-broken"] == [("rollback", "hold"), ("hold", "rollback"),
                                                                            (None, "hold")]  # fmt: skip
