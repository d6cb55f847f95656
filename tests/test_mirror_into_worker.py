"""The mirror SDK into the streams worker, all real parts:

    httpx -> FastAPI app (baseline ONNX model) wrapped in MirrorMiddleware -> MirrorClient
      -> real Kafka -> ``shadowlens worker`` process (replays against digits-v2) -> chDB + API

Asserts the worker's window totals equal the requests served, a verdict is answered for the
pair, and ClickHouse holds exactly one diff row per served request, under the request ids the
middleware mirrored, with the attributes the app extracted.
"""

from __future__ import annotations

import uuid

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from fastapi import FastAPI
from test_mirror_kafka import Server  # uvicorn in a thread on a free port (tests/ is on sys.path)

from mirror import MirrorClient, MirrorMiddleware
from harness import WorkerProcess, free_port, window_totals, write_worker_config
from streams.models import build_digits_models, load_digits_split
from streams.sink import ClickHouseSink

pytestmark = pytest.mark.kafka

REQUESTS = 600
COUNTRIES = ("de", "fr", "us")


def baseline_app(model_path, mirror: MirrorClient) -> FastAPI:
    """A model server as a user would write it: the v1 digits model behind POST /predict."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    app = FastAPI()

    @app.post("/predict")
    def predict(body: dict) -> dict:
        pixels = np.asarray([body["pixels"]], np.float32)  # (1, 64) raw 0..16
        (probs,) = session.run(["probabilities"], {"pixels": pixels})
        return {"probabilities": probs[0].tolist()}

    app.add_middleware(
        MirrorMiddleware, client=mirror, model="digits", version="v1",
        inputs=lambda ex: {"pixels": np.asarray([ex.request_json()["pixels"]], np.float32)},
        outputs=lambda ex: {"probabilities": np.asarray([ex.response_json()["probabilities"]], np.float32)},
        attributes=lambda ex: {"country": ex.headers.get("x-country", "unknown")},
    )  # request_id: the middleware's default, the x-request-id header
    return app


def start_worker(tmp_path, config) -> WorkerProcess:
    return WorkerProcess(config, tmp_path / "worker.log")


def test_middleware_on_a_fastapi_app_mirrors_end_to_end_into_the_worker(kafka_bootstrap, tmp_path):
    models = build_digits_models(tmp_path / "models")
    topic = f"mirror-mw-{uuid.uuid4().hex[:8]}"
    api_port = free_port()
    api = f"http://127.0.0.1:{api_port}"
    config = write_worker_config(tmp_path, kafka_bootstrap, {"digits-v2": models["good"]}, topic, api_port)

    worker = start_worker(tmp_path, config)
    mirror = None
    try:
        # The worker creates its topics first; its API comes up after that.
        worker.wait_for(lambda: httpx.get(f"{api}/healthz", timeout=2).status_code == 200, 60, "the worker API")

        mirror = MirrorClient(bootstrap_servers=kafka_bootstrap, topic=topic, close_timeout_s=15)
        holdout = load_digits_split().holdout_x
        served: dict[str, tuple[str, int]] = {}  # request id -> (country, baseline label the app answered)
        with Server(baseline_app(models["baseline"], mirror)) as url, httpx.Client(base_url=url) as http:
            for i in range(REQUESTS):
                request_id, country = f"mw-{uuid.uuid4().hex}", COUNTRIES[i % len(COUNTRIES)]
                response = http.post("/predict", json={"pixels": holdout[i % len(holdout)].tolist()},
                                     headers={"x-request-id": request_id, "x-country": country})
                assert response.status_code == 200, response.text
                served[request_id] = (country, int(np.argmax(response.json()["probabilities"])))
        stats = mirror.close()
        assert (stats.published, stats.dropped, stats.failed) == (REQUESTS, 0, 0), stats

        def all_counted():
            totals = window_totals(api, "digits", ["digits-v2"])
            return totals if totals["digits-v2"] >= REQUESTS else None

        totals = worker.wait_for(all_counted, 60, "the worker's windows to count every mirrored request")
        assert totals == {"digits-v2": REQUESTS}

        verdict = httpx.get(f"{api}/v1/verdicts/digits/digits-v2", timeout=5)
        assert verdict.status_code == 200, verdict.text
        body = verdict.json()
        assert body["verdict"] in ("promote", "hold", "rollback"), body
        assert (body["model"], body["candidate"]) == ("digits", "digits-v2")
        assert body["samples"] == REQUESTS, body
    finally:
        if mirror is not None:
            mirror.close()
        worker.stop()

    # chDB allows one process per data path: read the rows after the worker has stopped.
    sink = ClickHouseSink(f"chdb:///{tmp_path / 'chdb'}")
    try:
        assert sink.diff_counts() == {("digits", "digits-v2"): REQUESTS}
        rows = sink.query(
            "SELECT request_id, attributes['country'], baseline_label, baseline_version, error, baseline_latency_ms "
            "FROM shadowlens.request_diffs FINAL WHERE model = 'digits' AND candidate = 'digits-v2'"
        )
    finally:
        sink.close()
    assert len(rows) == REQUESTS
    assert {r[0] for r in rows} == set(served)  # the ids the middleware took from x-request-id
    for request_id, country, baseline_label, version, error, latency in rows:
        assert (country, baseline_label) == served[request_id], request_id  # attributes and outputs arrived
        assert version == "v1" and error == "" and latency > 0
