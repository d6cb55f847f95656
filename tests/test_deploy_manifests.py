"""deploy/ manifests, checked field by field and driven through the real API app.

The controllers are not run here (no cluster); their documented decision rules are, transcribed
from their source: Argo Rollouts ``analysis/analysis.go`` ``assessMetricStatus`` (v1.8/1.9) and
the web provider (non-2xx = Error; body JSON as ``result``), Flagger ``callWebhook`` (pass on
200-202 only). Every measurement goes through the FastAPI app over HTTP (TestClient) with the
manifests' own URL paths, headers and payloads, so what is checked is what the controller would
see.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from schemas import Verdict
from streams.api import create_app
from streams.board import VerdictBoard

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
TOKEN = "gate-token-0123456789abcdef"


def load(path: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / path).read_text()) if d]


def by_name(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


GATE = by_name(load("argo/analysistemplate.yaml"), "AnalysisTemplate", "shadowlens-gate")
WATCH = by_name(load("argo/analysistemplate.yaml"), "AnalysisTemplate", "shadowlens-watch")
CANARY = by_name(load("flagger/canary.yaml"), "Canary", "digits-server")


# -- the fields the behaviour depends on ---------------------------------------------------------
def test_argo_gate_fields():
    (metric,) = GATE["spec"]["metrics"]
    assert metric["successCondition"] == 'result.verdict == "promote"'
    assert metric["failureCondition"] == 'result.verdict == "rollback"'
    assert metric["count"] == 60 and metric["interval"] == "1m"
    assert metric["inconclusiveLimit"] >= metric["count"]  # a hold never ends the run
    assert metric["failureLimit"] == 0 and metric["consecutiveSuccessLimit"] == 2
    assert metric["consecutiveErrorLimit"] == 10 and metric["initialDelay"] == "30s"
    # Argo's own validation (utils/analysis/factory.go): count >= failureLimit + consecutiveSuccessLimit
    assert metric["count"] >= metric["failureLimit"] + metric["consecutiveSuccessLimit"]
    web = metric["provider"]["web"]
    assert web["url"].endswith("/v1/verdicts/{{args.model}}/{{args.candidate}}")
    assert web["headers"] == [{"key": "Authorization", "value": "Bearer {{args.api-token}}"}]
    token_arg = next(a for a in GATE["spec"]["args"] if a["name"] == "api-token")
    assert token_arg["valueFrom"]["secretKeyRef"] == {"name": "shadowlens-api", "key": "token"}


def test_argo_watch_and_rollout_fields():
    (metric,) = WATCH["spec"]["metrics"]
    assert "successCondition" not in metric and "count" not in metric  # runs until the rollout ends
    assert metric["failureCondition"] == 'result.verdict == "rollback"' and metric["failureLimit"] == 0
    rollout = by_name(load("argo/rollout.yaml"), "Rollout", "digits-server")
    canary = rollout["spec"]["strategy"]["canary"]
    assert canary["analysis"]["templates"] == [{"templateName": "shadowlens-watch"}]
    assert canary["analysis"]["startingStep"] == 0
    step = next(s["analysis"] for s in canary["steps"] if "analysis" in s)
    assert step["templates"] == [{"templateName": "shadowlens-gate"}]
    assert {a["name"]: a["value"] for a in step["args"]} == {"model": "digits", "candidate": "digits-v2"}


def test_flagger_fields():
    analysis = CANARY["spec"]["analysis"]
    hooks = {h["type"]: h for h in analysis["webhooks"]}
    assert hooks["confirm-promotion"]["url"].endswith("/v1/gates/flagger/digits/digits-v2")
    assert hooks["rollback"]["url"].endswith("/v1/gates/flagger-rollback/digits/digits-v2")
    assert all("token" in h["metadata"] for h in hooks.values())  # no headers in Flagger webhooks
    assert analysis["interval"] == "1m" and analysis["maxWeight"] == 50 and analysis["stepWeight"] == 10


# -- the controllers' rules, driven through the API -------------------------------------------------
def argo_assess(metric: dict, phases: list[str]) -> str:
    """assessMetricStatus over the measurement phases so far (Successful / Failed / Inconclusive /
    Error), as Argo Rollouts 1.8+ computes it after each measurement."""
    failure_limit = metric.get("failureLimit", 0)
    inconclusive_limit = metric.get("inconclusiveLimit", 0)
    error_limit = metric.get("consecutiveErrorLimit", 4)
    success_limit = metric.get("consecutiveSuccessLimit", 0)
    failed = inconclusive = consecutive_error = consecutive_success = count = 0
    for phase in phases:
        if phase == "Error":
            consecutive_error += 1
            consecutive_success = 0
            continue  # an error does not count toward count
        consecutive_error = 0
        count += 1
        failed += phase == "Failed"
        inconclusive += phase == "Inconclusive"
        consecutive_success = consecutive_success + 1 if phase == "Successful" else 0
    status = None
    if failure_limit >= 0 and failed > failure_limit:
        status = "Failed"
    if inconclusive > inconclusive_limit:
        status = "Inconclusive"
    if consecutive_error > error_limit:
        status = "Error"
    if status:
        return status
    if success_limit > 0 and consecutive_success >= success_limit:
        return "Successful"
    if "count" in metric and count >= metric["count"]:
        if success_limit > 0:
            return "Failed" if failure_limit < 0 else "Inconclusive"
        return "Successful"
    return "Running"


def condition(expr: str, body: dict) -> bool:
    field, value = re.fullmatch(r'result\.(\w+) == "(\w+)"', expr).groups()
    return body.get(field) == value


def argo_measure(client: TestClient, metric: dict, up: bool = True) -> str:
    """One web-provider measurement against the API, with the template's URL path and headers."""
    if not up:
        return "Error"
    web = metric["provider"]["web"]
    path = web["url"].split("}}", 1)[1].replace("{{args.model}}", "digits").replace("{{args.candidate}}", "digits-v2")
    headers = {h["key"]: h["value"].replace("{{args.api-token}}", TOKEN) for h in web["headers"]}
    response = client.get(path, headers=headers)
    if not 200 <= response.status_code < 300:
        return "Error"
    body = response.json()
    if "failureCondition" in metric and condition(metric["failureCondition"], body):
        return "Failed"
    if "successCondition" not in metric:
        return "Successful"
    return "Successful" if condition(metric["successCondition"], body) else "Inconclusive"


class Clock:
    def __init__(self):
        self.now = datetime(2026, 11, 26, 12, tzinfo=UTC).timestamp()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world():
    clock = Clock()
    board = VerdictBoard({("digits", "digits-v2")}, stale_after_s=185.0, clock=clock)
    client = TestClient(create_app(board, tokens=[TOKEN]))
    return board, client, clock


def publish(board: VerdictBoard, clock: Clock, verdict: str) -> None:
    stamp = datetime.fromtimestamp(clock.now, UTC)
    board.publish([Verdict(model="digits", candidate="digits-v2", verdict=verdict, reasons=[f"{verdict}."], metrics=[],
                           samples=1000, window_start=stamp, window_end=stamp, updated_at=stamp)])  # fmt: skip


def run_analysis(metric, board, client, clock, script: list[str | None]) -> tuple[str, list[str]]:
    """Each script step is one interval: a verdict to publish first (None: nothing new; "down":
    the API does not answer). Returns the run's status after the script and the phases."""
    phases: list[str] = []
    status = "Running"
    for step in script:
        clock.now += 60
        if step not in (None, "down"):
            publish(board, clock, step)
        phases.append(argo_measure(client, metric, up=step != "down"))
        status = argo_assess(metric, phases)
        if status != "Running":
            break
    return status, phases


def test_argo_gate_waits_through_holds_and_completes_on_promote(world):
    board, client, clock = world
    (metric,) = GATE["spec"]["metrics"]
    # Before any traffic the pair is configured: hold (waiting_for_traffic), not an error.
    status, phases = run_analysis(metric, board, client, clock, [None, None, "hold", "hold", "hold", "promote", None])
    assert phases[:5] == ["Inconclusive"] * 5 and status == "Successful" and len(phases) == 7


def test_argo_gate_fails_on_rollback_and_survives_an_outage(world):
    board, client, clock = world
    (metric,) = GATE["spec"]["metrics"]
    status, phases = run_analysis(metric, board, client, clock, ["hold", *["down"] * 10, "hold", "rollback"])
    assert phases.count("Error") == 10 and status == "Failed"
    # Eleven errors in a row are more than consecutiveErrorLimit: the run errors (rollout aborts).
    status, _ = run_analysis(metric, board, client, clock, ["down"] * 11)
    assert status == "Error"


def test_argo_gate_ends_inconclusive_when_count_runs_out(world):
    board, client, clock = world
    (metric,) = GATE["spec"]["metrics"]
    status, phases = run_analysis(metric, board, client, clock, ["hold"] * 60)
    assert status == "Inconclusive" and len(phases) == 60  # a person decides after an hour of hold


def test_argo_stale_promote_is_a_hold_and_a_single_promote_is_not_enough(world):
    board, client, clock = world
    (metric,) = GATE["spec"]["metrics"]
    publish(board, clock, "promote")
    clock.now += 10 * 60  # the worker stopped: nothing new for ten minutes
    response = client.get("/v1/verdicts/digits/digits-v2", headers={"Authorization": f"Bearer {TOKEN}"})
    body = response.json()
    assert response.status_code == 200 and body["verdict"] == "hold" and body["state"] == "stale"
    assert body["last_decision"] == "promote" and body["age_s"] == pytest.approx(600)
    assert argo_measure(client, metric) == "Inconclusive"
    status, phases = run_analysis(metric, board, client, clock, ["promote", "hold", "promote", "promote"])
    assert phases == ["Successful", "Inconclusive", "Successful", "Successful"] and status == "Successful"


def test_argo_watch_passes_hold_and_promote_and_fails_on_rollback(world):
    board, client, clock = world
    (metric,) = WATCH["spec"]["metrics"]
    status, phases = run_analysis(metric, board, client, clock, [None, "hold", "promote", "down", "hold"])
    assert status == "Running" and phases == ["Successful", "Successful", "Successful", "Error", "Successful"]
    status, _ = run_analysis(metric, board, client, clock, ["rollback"])
    assert status == "Failed"


def flagger_call(client: TestClient, hook: dict, token: str | None = None) -> bool:
    """callWebhook: POST the payload; a pass is status 200-202 only."""
    payload = {"name": "digits-server", "namespace": "ml", "phase": "Progressing", "checksum": "abc",
               "metadata": dict(hook["metadata"], token=token or TOKEN)}  # fmt: skip
    status = client.post(hook["url"].split("8080", 1)[1], json=payload).status_code
    return 200 <= status <= 202


def test_flagger_confirm_promotion_and_rollback_hooks(world):
    board, client, clock = world
    hooks = {h["type"]: h for h in CANARY["spec"]["analysis"]["webhooks"]}
    # Waiting for traffic, then hold: confirm-promotion halts the canary, no rollback signalled.
    assert not flagger_call(client, hooks["confirm-promotion"]) and not flagger_call(client, hooks["rollback"])
    publish(board, clock, "hold")
    assert not flagger_call(client, hooks["confirm-promotion"]) and not flagger_call(client, hooks["rollback"])
    publish(board, clock, "promote")
    assert flagger_call(client, hooks["confirm-promotion"]) and not flagger_call(client, hooks["rollback"])
    # A wrong token is never a pass: neither a promotion nor a rollback.
    assert not flagger_call(client, hooks["confirm-promotion"], token="wrong-token-0123456789")
    clock.now += 60
    publish(board, clock, "rollback")
    assert flagger_call(client, hooks["rollback"]) and not flagger_call(client, hooks["confirm-promotion"])


def test_fast_path_answers_exactly_as_the_fastapi_route(world):
    """GET /v1/verdicts/{m}/{c} is served by an ASGI fast path; the FastAPI route is the contract."""
    board, fast, clock = world
    route = TestClient(fast.app.app)  # the FastAPI app behind the fast path
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def same(path: str, headers: dict) -> dict:
        a, b = fast.get(path, headers=headers), route.get(path, headers=headers)
        assert (a.status_code, a.json()) == (b.status_code, b.json()), (a.text, b.text)
        return a.json()

    assert same("/v1/verdicts/digits/digits-v2", auth)["state"] == "waiting_for_traffic"
    publish(board, clock, "promote")
    clock.now += 42.5
    assert same("/v1/verdicts/digits/digits-v2", auth)["age_s"] == pytest.approx(42.5)
    clock.now += 600
    assert same("/v1/verdicts/digits/digits-v2", auth)["state"] == "stale"
    same("/v1/verdicts/digits/digits-v2", {"Authorization": "Bearer nope"})  # 401 both ways
    same("/v1/verdicts/digits/unknown", auth)  # 404
    same(f"/v1/verdicts/digits/{'x' * 300}", auth)  # 422
