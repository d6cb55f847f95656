"""Zero-code ingest from KServe's payload logger (``shadowlens ingest``).

The events are what KServe's logger sends (kserve/kserve pkg/logger: binary-mode CloudEvents 1.0,
``Ce-Id`` shared by a call's request and response, ``Ce-Time`` with nanoseconds, extensions
``Ce-Inferenceservicename`` and ``Ce-Metadata``), posted over real HTTP to a real ingest process on a
real broker. A mirrored request made from a logged call is the one the producer would have sent:
same inputs, baseline output, attributes, time, to the millisecond.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest

from harness import consume_all, free_port
from schemas import MirroredRequest, decode_request
from streams.demo import TrafficGenerator
from streams.ingest.config import KServeRoute
from streams.ingest.kserve import REQUEST_TYPE, RESPONSE_TYPE, NotUsable, half_from_http, mirrored
from streams.ingest.pairing import PartitionPairing

TOKEN = "ingest-token-0123456789abcdef"
ROUTE = KServeRoute(inference_service="digits-isvc", model="digits", input="pixels", output="probabilities",
                    attributes={"x-country": "country", "x-device": "device"}, sample_key_header="x-user")  # fmt: skip
OIP = {"float32": "FP32", "float64": "FP64", "int64": "INT64"}


def go_time(moment: datetime) -> str:
    """RFC 3339 as Go's time.Time marshals it: nanoseconds, 'Z'."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"


def call_events(r: MirroredRequest, service: str = "digits-isvc", v1: bool = False) -> tuple[tuple, tuple]:
    """KServe's two POSTs (headers, body) of the call that produced ``r``."""
    if v1:
        request = {"instances": r.inputs["pixels"].to_array().tolist()}
        response = {"predictions": r.baseline_output["probabilities"].to_array().tolist()}
    else:
        request = {"inputs": [{"name": k, "shape": t.shape, "datatype": OIP[t.dtype],
                               "data": t.to_array().ravel().tolist()} for k, t in r.inputs.items()]}  # fmt: skip
        response = {"model_name": "digits", "model_version": r.baseline_version, "outputs": [
            {"name": k, "shape": t.shape, "datatype": OIP[t.dtype], "data": t.to_array().ravel().tolist()}
            for k, t in r.baseline_output.items()]}  # fmt: skip
    metadata = json.dumps({"X-Country": [r.attributes["country"]], "X-Device": [r.attributes["device"]],
                           "X-User": [f"user-{r.request_id[:4]}"]})  # fmt: skip
    common = {"Ce-Id": r.request_id, "Ce-Specversion": "1.0", "Ce-Source": "http://localhost:9081/",
              "Ce-Inferenceservicename": service, "Ce-Namespace": "ml", "Ce-Component": "predictor",
              "Ce-Endpoint": "default", "Ce-Metadata": metadata, "Content-Type": "application/json"}  # fmt: skip
    started = r.sent_at - timedelta(milliseconds=r.baseline_latency_ms)
    return (({**common, "Ce-Type": REQUEST_TYPE, "Ce-Time": go_time(started)}, json.dumps(request).encode()),
            ({**common, "Ce-Type": RESPONSE_TYPE, "Ce-Time": go_time(r.sent_at)}, json.dumps(response).encode()))


def lower(headers: dict) -> dict:
    return {k.lower(): v for k, v in headers.items()}


@pytest.fixture(scope="module")
def originals(models) -> list[MirroredRequest]:
    raw = TrafficGenerator(models["baseline"], rate_per_s=100).messages(60)
    return [MirroredRequest.model_validate_json(m) for m in raw]


def same_request(made: MirroredRequest, original: MirroredRequest) -> None:
    assert made.request_id == original.request_id and made.model == "digits"
    assert np.array_equal(made.inputs["pixels"].to_array(), original.inputs["pixels"].to_array())
    assert np.array_equal(made.baseline_output["probabilities"].to_array(),
                          original.baseline_output["probabilities"].to_array())  # fmt: skip
    assert made.attributes == original.attributes and made.sample_key == f"user-{original.request_id[:4]}"
    assert abs(made.sent_at - original.sent_at) < timedelta(milliseconds=1)
    assert abs(made.baseline_latency_ms - original.baseline_latency_ms) <= 1.0  # whole milliseconds of Ce-Time


def test_a_logged_call_becomes_the_request_the_producer_would_have_sent(originals):
    for v1 in (False, True):
        for original in originals[:10]:
            (rh, rb), (sh, sb) = call_events(original, v1=v1)
            request, response = half_from_http(lower(rh), rb), half_from_http(lower(sh), sb)
            (made,) = mirrored(request, response, ROUTE)
            same_request(made, original)
            decoded = decode_request(made.model_dump_json().encode())  # what the replay stage reads
            assert isinstance(decoded, MirroredRequest), decoded
            assert made.baseline_version == ("v1" if not v1 else "digits-isvc")  # V1 responses carry no version


def test_a_batch_call_is_one_request_per_instance_and_mismatches_are_refused(originals):
    rows = originals[:3]
    pixels = np.concatenate([r.inputs["pixels"].to_array() for r in rows])
    probs = np.concatenate([r.baseline_output["probabilities"].to_array() for r in rows])
    (rh, _), (sh, _) = call_events(rows[0])
    request = half_from_http(lower(rh), json.dumps({"instances": pixels.tolist()}).encode())
    response = half_from_http(lower(sh), json.dumps({"predictions": probs.tolist()}).encode())
    made = mirrored(request, response, ROUTE)
    assert [m.request_id for m in made] == [f"{rows[0].request_id}#{i}" for i in range(3)]
    assert all(np.array_equal(m.inputs["pixels"].to_array(), pixels[i : i + 1]) for i, m in enumerate(made))
    short = half_from_http(lower(sh), json.dumps({"predictions": probs[:2].tolist()}).encode())
    with pytest.raises(NotUsable, match="different numbers of rows"):
        mirrored(request, short, ROUTE)
    words = half_from_http(lower(sh), json.dumps({"outputs": [{"name": "p", "shape": [1], "datatype": "BYTES",
                                                               "data": ["x"]}]}).encode())  # fmt: skip
    with pytest.raises(NotUsable, match="not numeric"):
        mirrored(request, words, ROUTE)
    with pytest.raises(NotUsable, match="is not KServe's inference request"):
        half_from_http(lower({**rh, "Ce-Type": "dev.knative.other"}), b"{}")
    structured = {"specversion": "1.0", "id": "s-1", "type": REQUEST_TYPE, "source": "x", "time": go_time(rows[0].sent_at),
                  "inferenceservicename": "digits-isvc", "data": {"instances": pixels[:1].tolist()}}  # fmt: skip
    half = half_from_http({"content-type": "application/cloudevents+json"}, json.dumps(structured).encode())
    assert half.kind == "request" and half.id == "s-1" and json.loads(half.body)["instances"] == pixels[:1].tolist()


def test_pairing_in_either_order_expires_by_the_partitions_clock_and_commits_at_the_oldest_waiting(originals):
    halves = []
    for r in originals[:3]:
        (rh, rb), (sh, sb) = call_events(r)
        halves.append((half_from_http(lower(rh), rb), half_from_http(lower(sh), sb)))
    p = PartitionPairing(timeout_ms=1000)
    assert p.add(halves[0][1], 0, 10_000) is None  # a response first
    assert p.add(halves[1][0], 1, 10_100) is None
    assert p.add(halves[0][0], 2, 10_200) == halves[0]  # (request, response) whatever the order
    assert p.commit_offset() == 1  # call 1 waits: a restart reads it again
    assert p.expire() == [] and p.add(halves[2][0], 3, 10_300) is None
    assert [w.half.id for w in p.expire(now_ms=11_150)] == [originals[1].request_id]  # 10_100 + 1000 <= 11_150
    assert p.commit_offset() == 3
    assert p.add(halves[2][1], 4, 20_000) == halves[2] and p.commit_offset() == 5


def post(url: str, headers: dict, body: bytes) -> httpx.Response:
    return httpx.post(url, headers=headers, content=body, timeout=30)


@pytest.mark.kafka
def test_ingest_writes_paired_calls_and_dead_letters_and_loses_no_acknowledged_half(kafka_bootstrap, new_topic,
                                                                                     originals, tmp_path):  # fmt: skip
    mirror = new_topic("kserve-mirror", partitions=2)
    port = free_port()
    config = tmp_path / "ingest.toml"
    config.write_text(f"""
[kafka]
bootstrap = "{kafka_bootstrap}"
topic = "{mirror}"
dead_letter_topic = "{mirror}.dlq"
partitions = 2
[ingest]
port = {port}
tokens = ["{TOKEN}"]
pair_timeout_s = 3
[[ingest.kserve]]
inference_service = "digits-isvc"
model = "digits"
attributes = {{ "x-country" = "country", "x-device" = "device" }}
sample_key_header = "x-user"
[[candidates]]
name = "digits-v2"
model = "digits"
path = "{Path(__file__).resolve()}"
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHADOWLENS_")}
    log = open(tmp_path / "ingest.log", "w")

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "ingest", "-c", str(config)], stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "ingest.log").read_text()
            try:
                httpx.post(f"http://127.0.0.1:{port}/v1/ingest/kserve", timeout=1)
                return proc
            except httpx.HTTPError:
                time.sleep(0.3)
        raise TimeoutError((tmp_path / "ingest.log").read_text())

    url = f"http://127.0.0.1:{port}/v1/ingest/kserve/{TOKEN}"
    calls = originals[:40]
    proc = start()
    try:
        for i, r in enumerate(calls[:30]):
            (rh, rb), (sh, sb) = call_events(r)
            first, second = ((sh, sb), (rh, rb)) if i % 3 == 0 else ((rh, rb), (sh, sb))  # every third reversed
            assert post(url, *first).status_code == 200 and post(url, *second).status_code == 200
        (rh, rb), _ = call_events(calls[30])
        assert post(url, rh, rb).status_code == 200  # never answered: a dead letter after 3 s
        (rh, rb), _ = call_events(calls[31], service="unknown-isvc")
        refused = post(url, rh, rb)
        assert refused.status_code == 400 and "not in [[ingest.kserve]]" in refused.json()["detail"]
        assert post(f"http://127.0.0.1:{port}/v1/ingest/kserve/wrong-token-0123456789", rh, rb).status_code == 401
        # A request acknowledged just before the process is killed: its response, posted to the next
        # process, still finds it (the halves topic, not memory, holds it).
        waiting = calls[32:40]
        for r in waiting:
            assert post(url, *call_events(r)[0]).status_code == 200
        time.sleep(2)  # the pairing has read them and committed its offsets below them (they wait)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc = start()
        for r in waiting:
            assert post(url, *call_events(r)[1]).status_code == 200
        expected = {r.request_id: r for r in calls[:30] + waiting}
        records = consume_all(kafka_bootstrap, mirror, expect=len(expected), timeout_s=60, to_end=True)
        made = [MirroredRequest.model_validate_json(v) for v in records]
        assert {m.request_id for m in made} == set(expected)  # duplicates allowed (the judge drops them), no other
        for m in made:
            same_request(m, expected[m.request_id])
            assert isinstance(decode_request(m.model_dump_json().encode()), MirroredRequest)
        letters = consume_all(kafka_bootstrap, f"{mirror}.dlq", expect=2, timeout_s=30, to_end=True)
        reasons = [json.loads(v)["reason"] for v in letters]
        kinds = {json.loads(v)["error_type"] for v in letters}
        assert any(calls[30].request_id in x and "no response event within 3 s" in x for x in reasons), reasons
        assert any("'unknown-isvc' is not in [[ingest.kserve]]" in x for x in reasons), reasons
        assert kinds == {"unpaired", "invalid_schema"} and len(letters) == 2, reasons
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()


@pytest.mark.kafka
def test_kserve_logged_calls_are_judged_by_the_worker_like_mirrored_ones(kafka_bootstrap, new_topic, models,
                                                                          tmp_path):  # fmt: skip
    """The whole zero-code path: KServe's logger -> ingest -> mirror topic -> worker -> verdict. Every
    call is scored (none unscorable: a logged call is a valid request), none blamed on the candidate."""
    from harness import WorkerProcess, write_worker_config

    mirror = new_topic("kserve-e2e", partitions=3)
    api_port, ingest_port = free_port(), free_port()
    config = write_worker_config(tmp_path, kafka_bootstrap, {"digits-v2": models["good"]}, mirror, api_port)
    with open(config, "a") as f:
        f.write(f"""
[ingest]
port = {ingest_port}
[[ingest.kserve]]
inference_service = "digits-isvc"
model = "digits"
attributes = {{ "x-country" = "country", "x-device" = "device" }}
""")
    calls = [MirroredRequest.model_validate_json(m)
             for m in TrafficGenerator(models["baseline"], rate_per_s=100, seed=5).messages(600)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHADOWLENS_")}
    ingest_log = open(tmp_path / "ingest.log", "w")
    ingest = subprocess.Popen([sys.executable, "-m", "streams.cli", "ingest", "-c", str(config)], stdout=ingest_log,
                              stderr=subprocess.STDOUT, env=env, start_new_session=True)  # fmt: skip
    worker = WorkerProcess(config, tmp_path / "worker.log")
    api = f"http://127.0.0.1:{api_port}"
    try:
        worker.wait_for(lambda: httpx.get(f"{api}/readyz", timeout=5).status_code == 200, 90, "the API")
        url = f"http://127.0.0.1:{ingest_port}/v1/ingest/kserve"
        def log_call(i: int) -> None:  # as KServe's logger: a pool of senders, each call's two events in any order
            events = call_events(calls[i])
            for headers, body in events if i % 2 else events[::-1]:
                assert httpx.post(url, headers=headers, content=body, timeout=30).status_code == 200

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(log_call, range(len(calls))))
        verdict = worker.wait_for(lambda: (v := httpx.get(f"{api}/v1/verdicts/digits/digits-v2", timeout=5).json())
                                  ["samples"] >= len(calls) and v, 120, "every logged call scored")  # fmt: skip
        assert verdict["samples"] == len(calls) and verdict["unscorable"] == 0, verdict
        error_rate = next(m for m in verdict["metrics"] if m["name"] == "error_rate")
        assert error_rate["estimate"] == 0 and verdict["verdict"] != "rollback", verdict
    finally:
        worker.stop()
        ingest.send_signal(signal.SIGTERM)
        ingest.wait(30)
        ingest_log.close()


def test_operator_mistakes_are_one_line_and_exit_2(tmp_path):
    base = f"""
[kafka]
bootstrap = "127.0.0.1:1"
[[candidates]]
name = "c"
model = "digits"
path = "{Path(__file__).resolve()}"
"""
    cases = {
        "": "[[ingest.kserve]] is empty",
        '[ingest]\nhost = "0.0.0.0"\n[[ingest.kserve]]\ninference_service = "s"\nmodel = "digits"\n':
            "reachable from other machines and [ingest] tokens is empty",
        '[ingest]\ntokens = ["short"]\n': "token 0 has 5 characters; use at least 16",
    }  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHADOWLENS_")}
    for i, (section, message) in enumerate(cases.items()):
        config = tmp_path / f"c{i}.toml"
        config.write_text(section + base)
        done = subprocess.run([sys.executable, "-m", "streams.cli", "ingest", "-c", str(config)], capture_output=True,
                              text=True, timeout=60, env=env)  # fmt: skip
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
