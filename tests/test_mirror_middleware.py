"""MirrorMiddleware on a real FastAPI app (no broker needed: records are read from the client's
buffer; the Kafka end-to-end leg is in test_mirror_kafka.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

with warnings.catch_warnings():  # starlette 1.x nudges towards httpx2; the TestClient works the same
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from mirror import MirrorClient, MirrorMiddleware

UNREACHABLE = "127.0.0.1:1"


class Boom(RuntimeError):
    pass


def model_app() -> FastAPI:
    app = FastAPI()

    @app.post("/predict")
    async def predict(body: dict) -> dict:
        x = np.asarray(body["features"], dtype=np.float32)
        return {"probs": (x / x.sum()).tolist(), "label": int(x.argmax())}

    @app.post("/fail")
    async def fail(body: dict) -> dict:
        raise Boom("model crashed")

    @app.post("/stream")
    async def stream(body: dict):
        async def chunks():
            yield b'{"probs": [0.25, '
            yield b"0.75]}"
        return StreamingResponse(chunks(), media_type="application/json")

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True}

    return app


@pytest.fixture
def client():
    c = MirrorClient(bootstrap_servers=UNREACHABLE, close_timeout_s=0.2)
    yield c
    c.close()


def mirrored(client: MirrorClient, inputs=None, **options):
    app = model_app()
    app.add_middleware(
        MirrorMiddleware, client=client, model="digits", version="v3",
        inputs=inputs or (lambda ex: {"features": np.asarray(ex.request_json()["features"], np.float32)}),
        outputs=lambda ex: {"probs": np.asarray(ex.response_json()["probs"], np.float32)},
        attributes=lambda ex: {"country": ex.headers.get("x-country", "unknown")},
        **options,
    )
    return app


def test_mirrors_inputs_outputs_id_attributes_and_latency(client):
    with TestClient(mirrored(client)) as http:
        response = http.post("/predict", json={"features": [1, 3]}, headers={"x-request-id": "req-42", "x-country": "de"})
    assert response.status_code == 200 and response.json() == {"probs": [0.25, 0.75], "label": 1}
    (record,) = client._core.buffer
    assert (record.request_id, record.model, record.version, record.key) == ("req-42", "digits", "v3", "req-42")
    np.testing.assert_array_equal(record.inputs["features"], np.array([1, 3], np.float32))
    np.testing.assert_array_equal(record.outputs["probs"], np.array([0.25, 0.75], np.float32))
    assert record.attributes == {"country": "de"}
    assert 0 < record.latency_ms < 5_000


def test_responses_are_byte_identical_with_and_without_the_middleware(client):
    with TestClient(model_app()) as plain, TestClient(mirrored(client)) as wrapped:
        for path in ("/predict", "/stream"):
            a, b = plain.post(path, json={"features": [2, 2]}), wrapped.post(path, json={"features": [2, 2]})
            assert (a.status_code, a.content, a.headers.get("content-type")) == (b.status_code, b.content, b.headers.get("content-type"))


def test_app_exceptions_pass_through_unchanged_and_are_not_mirrored(client):
    with TestClient(mirrored(client)) as http, pytest.raises(Boom, match="model crashed"):
        http.post("/fail", json={"features": [1]})
    with TestClient(mirrored(client), raise_server_exceptions=False) as http:
        assert http.post("/fail", json={"features": [1]}).status_code == 500
    assert not client._core.buffer and client.stats().failed == 0


def test_extract_errors_never_reach_the_caller(client):
    def broken(_exchange):
        raise KeyError("features")

    with TestClient(mirrored(client, inputs=broken)) as http:
        response = http.post("/predict", json={"features": [1, 1]})
    assert response.status_code == 200 and response.json()["probs"] == [0.5, 0.5]
    assert client.stats().failed_by_reason["invalid"] == 1 and not client._core.buffer


def test_strict_client_bad_extraction_is_counted_not_raised():
    strict = MirrorClient(bootstrap_servers=UNREACHABLE, close_timeout_s=0.2, strict=True)
    try:
        app = mirrored(strict, inputs=lambda ex: {"features": np.array(["not", "numbers"], dtype=object)})
        with TestClient(app) as http:
            assert http.post("/predict", json={"features": [1, 1]}).status_code == 200
        assert strict.stats().failed_by_reason["invalid"] == 1
    finally:
        strict.close()


def test_only_wanted_requests_are_mirrored(client):
    with TestClient(mirrored(client, paths=["/predict"])) as http:
        http.get("/health")
        http.post("/stream", json={"features": [1]})  # path not listed
        assert http.post("/predict", json=[1]).status_code == 422  # not a model output: not mirrored
        http.post("/predict", json={"features": [1, 1]})
    assert len(client._core.buffer) == 1


def test_streamed_responses_are_captured_whole(client):
    with TestClient(mirrored(client)) as http:
        assert http.post("/stream", json={"features": [1, 3]}).json() == {"probs": [0.25, 0.75]}
    (record,) = client._core.buffer
    assert record.outputs["probs"].tolist() == [0.25, 0.75]


def test_sampling_by_user_key_happens_before_extraction(client):
    calls = []

    def inputs(exchange):
        calls.append(1)
        return {"features": [1.0]}

    client.set_sample_rate("digits", 0.0)
    with TestClient(mirrored(client, inputs=inputs, sample_key=lambda ex: ex.headers.get("x-user", ""))) as http:
        for _ in range(5):
            http.post("/predict", json={"features": [1, 1]}, headers={"x-user": "u1"})
    assert calls == [] and client.stats().sampled_out == 5
