"""deploy/ manifests, checked field by field and driven through the real API app.

The controllers are not run here (no cluster); their decision rules are, transcribed from their
source (see deploy/README.md):

- Argo Rollouts ``analysis/analysis.go`` (v1.8.0 to v1.10.0-rc1): ``generateMetricTasks`` /
  ``calculateNextReconcileTime`` (the next look is ``interval`` after a Successful, Failed or
  Inconclusive look, ``DefaultErrorRetryInterval`` = 10 s after an Error), ``runMeasurements``
  (an Error moves no ``count``, resets the success streak), ``assessMetricStatus``; the web
  provider (non-2xx = Error; body JSON as ``result``).
- Flagger v1.44.0 ``pkg/controller``: ``scheduler.go`` ``advanceCanary`` / ``runCanary`` (one pass
  per ``interval``), ``scheduler_hooks.go`` ``runRollbackHooks`` / ``runConfirmPromotionHooks``,
  ``webhook.go`` ``callWebhook`` (pass on 200-202 only).

Every measurement goes through the FastAPI app over HTTP (TestClient) with the manifests' own URL
paths, headers and payloads, so what is checked is what the controller would see.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from schemas import Verdict
from streams.api.app import create_app
from streams.api.board import VerdictBoard

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
TOKEN = "gate-token-0123456789abcdef"

# Argo Rollouts analysis/analysis.go: DefaultErrorRetryInterval = 10 * time.Second. After an Error
# the next look is due 10 s after it finished, whatever the metric's interval.
ARGO_ERROR_RETRY_S = 10


def load(path: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / path).read_text()) if d]


def by_name(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def seconds(duration: str) -> int:
    """An Argo / Flagger duration such as "30s", "1m", "10m"."""
    value, unit = re.fullmatch(r"(\d+)([smh])", duration).groups()
    return int(value) * {"s": 1, "m": 60, "h": 3600}[unit]


GATE = by_name(load("argo/analysistemplate.yaml"), "AnalysisTemplate", "shadowlens-gate")
WATCH = by_name(load("argo/analysistemplate.yaml"), "AnalysisTemplate", "shadowlens-watch")
CANARY = by_name(load("flagger/canary.yaml"), "Canary", "digits-server")
# What deploy/README.md promises operators: the outage a rollout survives. The limits are computed
# from it (and checked against it) rather than restated here.
PROMISED_OUTAGE_S = 60 * int(re.search(r"API outage of up to (\d+) minutes", (DEPLOY / "README.md").read_text())[1])


# -- the fields the behaviour depends on ---------------------------------------------------------
def test_argo_gate_fields():
    (metric,) = GATE["spec"]["metrics"]
    assert metric["successCondition"] == 'result.verdict == "promote"'
    assert metric["failureCondition"] == 'result.verdict == "rollback"'
    assert metric["count"] == 60 and metric["interval"] == "1m"
    assert metric["inconclusiveLimit"] >= metric["count"]  # a hold never ends the run
    assert metric["failureLimit"] == 0 and metric["consecutiveSuccessLimit"] == 2
    assert metric["initialDelay"] == "30s"
    # Argo's own validation (utils/analysis/factory.go ValidateMetric): count >= failureLimit +
    # consecutiveSuccessLimit, and count >= inconclusiveLimit (so, with the line above, equal).
    assert metric["count"] >= metric["failureLimit"] + metric["consecutiveSuccessLimit"]
    assert metric["count"] >= metric["inconclusiveLimit"]
    web = metric["provider"]["web"]
    assert web["url"].endswith("/v1/verdicts/{{args.model}}/{{args.candidate}}")
    assert web["headers"] == [{"key": "Authorization", "value": "Bearer {{args.api-token}}"}]
    token_arg = next(a for a in GATE["spec"]["args"] if a["name"] == "api-token")
    assert token_arg["valueFrom"]["secretKeyRef"] == {"name": "shadowlens-api", "key": "token"}


@pytest.mark.parametrize("template", [GATE, WATCH], ids=["gate", "watch"])
def test_argo_error_limit_is_computed_from_the_error_retry_and_the_promised_outage(template):
    """The run errors at errors-in-a-row > consecutiveErrorLimit, and errors come every 10 s, so
    the outage survived is limit x 10 s, however long ``interval`` is. It must cover the README's
    promise; the outage tests below check it is not much more (an outage past the promise aborts)."""
    (metric,) = template["spec"]["metrics"]
    assert PROMISED_OUTAGE_S == 600  # "an API outage of up to 10 minutes never aborts a rollout"
    assert metric["consecutiveErrorLimit"] * ARGO_ERROR_RETRY_S >= PROMISED_OUTAGE_S
    assert metric["consecutiveErrorLimit"] == PROMISED_OUTAGE_S // ARGO_ERROR_RETRY_S  # 60
    # The mistake this replaces: the limit read as a number of intervals (10 x 1 min).
    assert metric["consecutiveErrorLimit"] * seconds(metric["interval"]) != PROMISED_OUTAGE_S


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


# -- Argo Rollouts' analysis controller, driven through the API --------------------------------------
def argo_assess(metric: dict, phases: list[str]) -> str:
    """The run's status after the measurements so far (Successful / Failed / Inconclusive / Error).
    Counters as runMeasurements moves them, limits as assessMetricStatus and
    assessMetricFailureInconclusiveOrError read them."""
    failure_limit = metric.get("failureLimit", 0)
    inconclusive_limit = metric.get("inconclusiveLimit", 0)
    error_limit = metric.get("consecutiveErrorLimit", 4)  # utils/defaults DefaultConsecutiveErrorLimit
    success_limit = metric.get("consecutiveSuccessLimit", 0)
    failed = inconclusive = consecutive_error = consecutive_success = count = 0
    for phase in phases:
        if phase == "Error":  # Error++, ConsecutiveError++, ConsecutiveSuccess = 0; Count untouched
            consecutive_error += 1
            consecutive_success = 0
            continue
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


def run_analysis(metric, board, client, clock, events: dict[int, str], until_s: int = 6 * 3600):
    """One AnalysisRun of ``metric``, timed as Argo's analysis controller times it.

    ``events``: seconds since the run started -> a verdict the worker publishes then, or "down" /
    "up" for the API going away / coming back. The first look is at ``initialDelay``; after a
    Successful, Failed or Inconclusive look the next is ``interval`` later, after an Error it is
    ARGO_ERROR_RETRY_S later. Returns the run's status (Running if it is still going at
    ``until_s``) and the looks as (seconds since start, phase)."""
    start, up, looks = clock.now, True, []
    pending = sorted(events.items())
    t = seconds(metric.get("initialDelay", "0s"))
    while t <= until_s:
        while pending and pending[0][0] <= t:
            at, event = pending.pop(0)
            clock.now = start + at
            if event in ("down", "up"):
                up = event == "up"
            else:
                publish(board, clock, event)
        clock.now = start + t
        phase = argo_measure(client, metric, up=up)
        looks.append((t, phase))
        status = argo_assess(metric, [p for _, p in looks])
        if status != "Running":
            return status, looks
        t += ARGO_ERROR_RETRY_S if phase == "Error" else seconds(metric["interval"])
    return "Running", looks


def phases_of(looks):
    return [p for _, p in looks]


def test_argo_gate_waits_through_holds_and_completes_on_promote(world):
    board, client, clock = world
    (metric,) = GATE["spec"]["metrics"]
    # Looks at 30, 90, 150 ... s. Before any traffic the pair is configured: hold
    # (waiting_for_traffic), not an error.
    status, looks = run_analysis(metric, board, client, clock, {120: "hold", 300: "promote"})
    assert phases_of(looks) == ["Inconclusive"] * 5 + ["Successful"] * 2 and status == "Successful"
    assert [t for t, _ in looks] == [30, 90, 150, 210, 270, 330, 390]


@pytest.mark.parametrize("template", [GATE, WATCH], ids=["gate", "watch"])
def test_argo_survives_an_outage_just_short_of_the_promise_then_still_fails_on_rollback(world, template):
    board, client, clock = world
    (metric,) = template["spec"]["metrics"]
    first = seconds(metric.get("initialDelay", "0s"))
    # Worst alignment: the API goes away exactly at a look, for 9 min 59 s. Errors at every 10 s
    # from then on: 60 in a row, not more than the limit of 60.
    down_at = first + 60
    up_at = down_at + PROMISED_OUTAGE_S - 1
    status, looks = run_analysis(metric, board, client, clock,
                                 {0: "hold", down_at: "down", up_at: "up", up_at + 5: "rollback"})  # fmt: skip
    phases = phases_of(looks)
    errors = [t for t, p in looks if p == "Error"]
    assert len(errors) == metric["consecutiveErrorLimit"] == 60
    assert errors == list(range(down_at, up_at, ARGO_ERROR_RETRY_S))  # every 10 s, not every minute
    # The run went on after the outage (the API answered again), and a rollback still fails it.
    assert phases[-2] != "Error" and phases[-1] == "Failed" and status == "Failed"


@pytest.mark.parametrize("template", [GATE, WATCH], ids=["gate", "watch"])
def test_argo_outage_longer_than_promised_errors_the_run(world, template):
    board, client, clock = world
    (metric,) = template["spec"]["metrics"]
    first = seconds(metric.get("initialDelay", "0s"))
    # Worst alignment, one second past the promise: the 61st error in a row comes exactly 600 s
    # after the API went away, and the run errors (the Rollout aborts: rollout/analysis.go).
    down_at = first + 60
    status, looks = run_analysis(metric, board, client, clock,
                                 {0: "hold", down_at: "down", down_at + PROMISED_OUTAGE_S + 1: "up"})  # fmt: skip
    assert status == "Error" and looks[-1][0] - down_at == PROMISED_OUTAGE_S
    assert phases_of(looks).count("Error") == metric["consecutiveErrorLimit"] + 1
    # Best alignment, an API that never comes back: it goes away one second after a look, so the
    # first failed look is one interval later. Loud all the same, 10 to 11 minutes after it went.
    status, looks = run_analysis(metric, board, client, clock, {0: "hold", first + 1: "down"})
    gone_for = looks[-1][0] - (first + 1)
    assert status == "Error" and PROMISED_OUTAGE_S <= gone_for <= PROMISED_OUTAGE_S + seconds(metric["interval"])


def test_argo_the_old_limit_of_ten_aborted_after_100_s(world):
    """The measured problem, kept as a regression check of the simulation itself: a limit of 10
    read as ten one-minute looks, but errors are retried every 10 s."""
    board, client, clock = world
    (metric,) = GATE["spec"]["metrics"]
    status, looks = run_analysis(dict(metric, consecutiveErrorLimit=10), board, client, clock, {0: "hold", 90: "down"})
    assert status == "Error" and looks[-1][0] - 90 == 100


def test_argo_gate_ends_inconclusive_when_count_runs_out(world):
    board, client, clock = world
    (metric,) = GATE["spec"]["metrics"]
    status, looks = run_analysis(metric, board, client, clock, {0: "hold"})
    assert status == "Inconclusive" and len(looks) == 60  # a person decides after an hour of hold
    assert looks[-1][0] == 30 + 59 * 60


def test_argo_errors_do_not_use_up_count_or_inconclusive_limit(world):
    """An outage inside the gate's hour: the errors (every 10 s) move neither Count nor
    Inconclusive, so the run still takes 60 real looks before it ends Inconclusive."""
    board, client, clock = world
    (metric,) = GATE["spec"]["metrics"]
    status, looks = run_analysis(metric, board, client, clock, {0: "hold", 600: "down", 900: "up"})
    phases = phases_of(looks)
    assert phases.count("Error") == 27  # looks at 630, 640, ..., 890 s
    assert status == "Inconclusive" and phases.count("Inconclusive") == metric["count"] == 60
    assert looks[-1][0] == 30 + 59 * 60 + 27 * ARGO_ERROR_RETRY_S  # the errors were looks on top, 10 s each


def test_argo_an_error_between_two_promotes_breaks_the_streak(world):
    """runMeasurements sets ConsecutiveSuccess = 0 on an Error: promote, error, promote is one in a
    row, not two. The look after the error comes 10 s later."""
    board, client, clock = world
    (metric,) = GATE["spec"]["metrics"]
    status, looks = run_analysis(metric, board, client, clock, {0: "promote", 60: "down", 95: "up"})
    assert looks == [(30, "Successful"), (90, "Error"), (100, "Successful"), (160, "Successful")]
    assert status == "Successful"


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
    # A new run: looks at 30, 90, 150, 210 s, each after a fresh verdict.
    events = {0: "promote", 60: "hold", 120: "promote", 180: "promote"}
    status, looks = run_analysis(metric, board, client, clock, events)
    assert phases_of(looks) == ["Successful", "Inconclusive", "Successful", "Successful"] and status == "Successful"


def test_argo_watch_passes_hold_and_promote_and_fails_on_rollback(world):
    board, client, clock = world
    (metric,) = WATCH["spec"]["metrics"]
    # No initialDelay: looks at 0, 60, 120, 180 (down), 190, 250 s.
    status, looks = run_analysis(metric, board, client, clock, {30: "hold", 90: "promote", 150: "down", 185: "up",
                                                                 240: "hold"}, until_s=250)  # fmt: skip
    assert status == "Running" and looks == [(0, "Successful"), (60, "Successful"), (120, "Successful"),
                                             (180, "Error"), (190, "Successful"), (250, "Successful")]  # fmt: skip
    status, _ = run_analysis(metric, board, client, clock, {0: "rollback"})
    assert status == "Failed"


# -- Flagger's scheduler, driven through the API -------------------------------------------------------
WRONG_TOKEN = "wrong-token-0123456789"
MISSING = object()  # a webhook whose metadata has no token at all


def flagger_payload(hook: dict, phase: str, token) -> dict:
    """CallWebhook's payload: name, namespace, phase, checksum, and the hook's metadata, with the
    manifest's placeholder token replaced by ``token`` (MISSING: the key removed)."""
    metadata = {k: v for k, v in hook["metadata"].items() if k != "token"}
    if token is not MISSING:
        metadata["token"] = token
    return {"name": "digits-server", "namespace": "ml", "phase": phase, "checksum": "abc", "metadata": metadata}


def flagger_post(client: TestClient, hook: dict, phase: str = "Progressing", token=TOKEN):
    return client.post(hook["url"].split("8080", 1)[1], json=flagger_payload(hook, phase, token))


def flagger_call(client: TestClient, hook: dict, phase: str = "Progressing", token=TOKEN) -> bool:
    """callWebhook: POST the payload; a pass is status 200-202 only (r.StatusCode > 202 is an error)."""
    return 200 <= flagger_post(client, hook, phase, token).status_code <= 202


def flagger_run(client, board, clock, verdicts: list[str], token=TOKEN, intervals: int = 12):
    """A Canary through Flagger's scheduler, one advanceCanary pass per ``interval`` (the job's
    ticker), from Progressing at weight 0. Before pass i the worker publishes ``verdicts[i]`` (the
    last one repeats). Returns the (phase, canary weight) after each pass; it stops at Failed or
    Promoting. Each pass, in advanceCanary's order:

    1. Progressing / Waiting / WaitingPromotion: runRollbackHooks with the current phase; the
       first hook that passes -> rollback(): all traffic back to the primary, phase Failed.
    2. (runAnalysis: Flagger's own metric checks; the Canary lists none, so they pass.)
    3. runCanary: below maxWeight, add stepWeight; at maxWeight, runConfirmPromotionHooks (payload
       phase Progressing): a failure halts in WaitingPromotion, a pass promotes (Promoting)."""
    analysis = CANARY["spec"]["analysis"]
    assert "metrics" not in analysis  # step 2 is a pass only while this holds
    hooks = analysis["webhooks"]
    phase, weight, trace = "Progressing", 0, []
    for i in range(intervals):
        clock.now += seconds(analysis["interval"])
        publish(board, clock, verdicts[min(i, len(verdicts) - 1)])
        if phase in ("Progressing", "Waiting", "WaitingPromotion") and any(
            flagger_call(client, h, phase, token) for h in hooks if h["type"] == "rollback"
        ):
            trace.append(("Failed", 0))
            break
        if weight < analysis["maxWeight"]:
            weight = min(weight + analysis["stepWeight"], 100)
        elif all(flagger_call(client, h, "Progressing", token) for h in hooks if h["type"] == "confirm-promotion"):
            phase = "Promoting"
        else:
            phase = "WaitingPromotion"
        trace.append((phase, weight))
        if phase == "Promoting":
            break
    return trace


def test_flagger_valid_token_hold_waits_at_max_weight_and_is_not_rolled_back(world):
    board, client, clock = world
    trace = flagger_run(client, board, clock, ["hold"])
    assert trace[:5] == [("Progressing", w) for w in (10, 20, 30, 40, 50)]  # Flagger ramps on a hold
    assert trace[5:] == [("WaitingPromotion", 50)] * 7  # ... then confirm-promotion holds it there


def test_flagger_valid_token_promote_is_promoted(world):
    board, client, clock = world
    trace = flagger_run(client, board, clock, ["promote"])
    assert trace[-1] == ("Promoting", 50) and len(trace) == 6  # five steps to maxWeight, then promoted


def test_flagger_valid_token_rollback_is_rolled_back(world):
    board, client, clock = world
    assert flagger_run(client, board, clock, ["rollback"]) == [("Failed", 0)]
    # At maxWeight, waiting on a hold, a rollback ends it at the next pass.
    trace = flagger_run(client, board, clock, ["hold"] * 8 + ["rollback"])
    assert trace[7] == ("WaitingPromotion", 50) and trace[8:] == [("Failed", 0)]


@pytest.mark.parametrize(
    ("token", "verdict"),
    [
        (WRONG_TOKEN, "rollback"),
        (MISSING, "rollback"),
        (CANARY["spec"]["analysis"]["webhooks"][0]["metadata"]["token"], "hold"),  # the shipped placeholder
        (WRONG_TOKEN, "promote"),
        (MISSING, "hold"),
    ],
    ids=["wrong-rollback", "missing-rollback", "placeholder-hold", "wrong-promote", "missing-hold"],
)
def test_flagger_bad_token_rolls_the_canary_back_within_one_interval(world, token, verdict):
    """Fail closed: a gate that cannot be read ends the canary at the first pass, whatever the
    verdict, instead of ramping to maxWeight and waiting there forever as if on hold."""
    board, client, clock = world
    assert flagger_run(client, board, clock, [verdict], token=token) == [("Failed", 0)]


def test_flagger_unauthenticated_gates_fail_closed_and_reveal_nothing(world):
    board, client, clock = world
    hooks = {h["type"]: h for h in CANARY["spec"]["analysis"]["webhooks"]}
    bodies = []
    for verdict in ("promote", "rollback"):
        clock.now += 60
        publish(board, clock, verdict)
        for token in (WRONG_TOKEN, MISSING):
            # rollback hook: 200 (Flagger rolls back), and the body does not say what the verdict is.
            response = flagger_post(client, hooks["rollback"], "WaitingPromotion", token)
            assert response.status_code == 200, response.text
            body = response.json()
            assert body.get("verdict") is None and "authenticate" in str(body).lower()
            assert not {"reasons", "metrics", "state", "last_decision", "samples", "age_s"} & body.keys()
            bodies.append(body)
            # confirm-promotion: 401, never a pass.
            assert flagger_post(client, hooks["confirm-promotion"], token=token).status_code == 401
    assert all(b == bodies[0] for b in bodies)  # the same answer on promote as on rollback
    # A wrong bearer header (and no metadata token) is unauthenticated too; a valid one is enough.
    path = hooks["rollback"]["url"].split("8080", 1)[1]
    payload = flagger_payload(hooks["rollback"], "Progressing", MISSING)
    wrong = client.post(path, json=payload, headers={"Authorization": f"Bearer {WRONG_TOKEN}"})
    assert wrong.status_code == 200 and wrong.json().get("verdict") is None
    publish(board, clock, "hold")
    valid = client.post(path, json=payload, headers={"Authorization": f"Bearer {TOKEN}"})
    assert valid.status_code == 412 and valid.json()["verdict"] == "hold"


def test_flagger_confirm_promotion_and_rollback_hooks(world):
    board, client, clock = world
    hooks = {h["type"]: h for h in CANARY["spec"]["analysis"]["webhooks"]}
    # Waiting for traffic, then hold: confirm-promotion halts the canary, no rollback signalled.
    assert not flagger_call(client, hooks["confirm-promotion"]) and not flagger_call(client, hooks["rollback"])
    publish(board, clock, "hold")
    assert not flagger_call(client, hooks["confirm-promotion"]) and not flagger_call(client, hooks["rollback"])
    publish(board, clock, "promote")
    assert flagger_call(client, hooks["confirm-promotion"]) and not flagger_call(client, hooks["rollback"])
    # A wrong token is never a promotion (the rollback hook's answer to it is above: fail closed).
    assert not flagger_call(client, hooks["confirm-promotion"], token=WRONG_TOKEN)
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
