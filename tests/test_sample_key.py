"""The record's explicit ``sample_key`` (issue #21 item 2): the SDK writes it, both decoders accept and
refuse the same values, backfill takes it from a column, and the replay stage's cluster key is made
of it, never of the Kafka message key."""

from __future__ import annotations

import asyncio
import json
import warnings
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer
from pydantic import ValidationError
from typer.testing import CliRunner

from mirror import MirrorClient, MirrorConfig, MirrorError, MirrorMiddleware
from mirror.backfill import validate
from mirror.cli import app as mirror_cli
from mirror.core import MirrorCore
from mirror.encoding import encode_message
from schemas import MirroredRequest, Tensor
from schemas.decode import decode_for_replay
from schemas.events import MAX_REQUEST_ID_CHARS
from schemas.fast_path import PlainRequest, parse_plain
from schemas.wire import SCHEMA_PATH
from scorers.clusters import request_keys
from streams.demo import demo_settings
from streams.replay.evidence_keys import sample_hash
from streams.models import build_digits_models
from streams.replay.core import Inbound, ReplayCore

with warnings.catch_warnings():  # starlette 1.x nudges towards httpx2; the TestClient works the same
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

UNREACHABLE = "127.0.0.1:1"
PROBS = np.full((1, 10), 0.1, np.float32)
START = datetime(2026, 1, 1, tzinfo=UTC)


def pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 16, size=(1, 64)).astype(np.float32)


def core(**settings) -> MirrorCore:
    return MirrorCore(MirrorConfig(bootstrap_servers=UNREACHABLE, **settings))


def published(c: MirrorCore, request_id: str, x: np.ndarray, i: int = 0, **kw) -> tuple[bytes, bytes]:
    """(Kafka key, value) of one request as the SDK sends it."""
    assert c.publish(request_id, "digits", "v1", {"pixels": x}, {"probabilities": PROBS}, 1.0,
                     sent_at=START + timedelta(seconds=i), **kw)
    key, value, _ = encode_message(c.buffer.pop())
    return key, value


# ------------------------------------------------------------------ the SDK --

def test_published_record_carries_the_sample_key():
    c = core()
    key, value = published(c, "r-1", pixels(1), sample_key="user-7")
    assert key == b"user-7" and json.loads(value)["sample_key"] == "user-7"
    assert MirroredRequest.model_validate_json(value).sample_key == "user-7"
    assert parse_plain(value).sample_key == "user-7"  # the SDK's form takes the fast path

    key, value = published(c, "r-2", pixels(1), sample_key=1234)  # an int user id: its text
    assert MirroredRequest.model_validate_json(value).sample_key == "1234" and key == b"1234"

    for none in (None, ""):  # no sample key: the request id samples and keys; the field is left out
        key, value = published(c, "r-3", pixels(1), sample_key=none)
        assert key == b"r-3" and "sample_key" not in json.loads(value)
        assert MirroredRequest.model_validate_json(value).sample_key is None
        assert "sample_key" not in parse_plain(value).model_fields_set


def test_a_sample_key_the_worker_would_refuse_is_a_bad_call():
    strict = core(strict=True)
    for bad in ("u" * (MAX_REQUEST_ID_CHARS + 1), True):
        with pytest.raises(MirrorError, match="sample_key"):
            strict.publish("r-1", "digits", "v1", pixels(1), PROBS, 1.0, sample_key=bad)
    lenient = core()
    assert not lenient.publish("r-1", "digits", "v1", pixels(1), PROBS, 1.0, sample_key="u" * 300)
    assert lenient.stats().failed_by_reason["invalid"] == 1 and not lenient.buffer
    # the longest the schema takes is published
    _, value = published(lenient, "r-2", pixels(1), sample_key="é" * MAX_REQUEST_ID_CHARS)
    assert MirroredRequest.model_validate_json(value).sample_key == "é" * MAX_REQUEST_ID_CHARS


def test_middleware_derives_the_sample_key_from_the_request():
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/predict")
    async def predict(body: dict) -> dict:
        return {"probs": [0.5, 0.5]}

    client = MirrorClient(bootstrap_servers=UNREACHABLE, close_timeout_s=0.2)
    try:
        wrapped = MirrorMiddleware(app, client, model="digits", version="v1",
                                   inputs=lambda ex: {"x": json.loads(ex.request_body)["x"]},
                                   outputs=lambda ex: {"probs": json.loads(ex.response_body)["probs"]},
                                   request_id=lambda ex: ex.headers["x-request-id"],
                                   sample_key=lambda ex: ex.headers.get("x-user-id"))  # fmt: skip
        with TestClient(wrapped) as http:
            http.post("/predict", json={"x": [1.0]}, headers={"x-request-id": "a", "x-user-id": "u1"})
            http.post("/predict", json={"x": [2.0]}, headers={"x-request-id": "b"})  # no user: no key
        first, second = client._core.buffer
        assert (first.sample_key, first.key) == ("u1", "u1") and (second.sample_key, second.key) == (None, "b")
        assert MirroredRequest.model_validate_json(encode_message(first)[1]).sample_key == "u1"
    finally:
        client.close()


# ------------------------------------------------------- both decoders agree --

def _doc(**change) -> dict:
    doc = {"request_id": "r-1", "model": "digits", "baseline_version": "v1", "sent_at": "2026-01-01T00:00:00Z",
           "inputs": {"pixels": Tensor.from_array(pixels(1)).model_dump()},
           "baseline_output": {"probabilities": Tensor.from_array(PROBS).model_dump()}, "baseline_latency_ms": 1.0}
    doc.update(change)
    return doc


@pytest.mark.parametrize("value", ["user-1", "x", "é" * MAX_REQUEST_ID_CHARS, None])
def test_valid_sample_keys_read_alike(value):
    raw = json.dumps(_doc(sample_key=value)).encode()
    fast, full = parse_plain(raw), MirroredRequest.model_validate_json(raw)
    assert fast is not None and fast == full and fast.sample_key == value
    assert fast.model_fields_set == full.model_fields_set and "sample_key" in full.model_fields_set
    plain = decode_for_replay(raw)
    assert isinstance(plain, PlainRequest) and plain.sample_key == value


@pytest.mark.parametrize("value", ["", "x" * (MAX_REQUEST_ID_CHARS + 1), 5, 1.5, True, ["u"], {"id": "u"}])
def test_invalid_sample_keys_are_refused_by_both(value):
    raw = json.dumps(_doc(sample_key=value)).encode()
    assert parse_plain(raw) is None
    with pytest.raises(ValidationError, match="sample_key"):
        MirroredRequest.model_validate_json(raw)
    rejection = decode_for_replay(raw)
    assert not isinstance(rejection, (PlainRequest, MirroredRequest)) and "sample_key" in rejection.reason


def test_the_json_schema_documents_the_sample_key():
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    field = schema["properties"]["sample_key"]
    assert "never the Kafka key" in field["description"] and "sample_key" not in schema["required"]
    jsonschema.validate(_doc(sample_key="user-1"), schema)
    for bad in ("", "x" * (MAX_REQUEST_ID_CHARS + 1), 5):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(_doc(sample_key=bad), schema)


# ------------------------------------------------------------------- backfill --

def _row(request_id: str, **change) -> dict:
    return {**_doc(request_id=request_id, inputs={"pixels": {"dtype": "float32", "shape": [1, 2], "data": [[1, 2]]}}),
            **change}


def test_backfill_takes_an_optional_sample_key_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert validate(_row("a", sample_key="u1"), None)[0].sample_key == "u1"
    assert validate(_row("b", sample_key=42), None)[0].sample_key == "42"  # an integer user id column
    assert validate(_row("c", sample_key=""), None)[0].sample_key is None  # "" is none, as in publish
    assert validate(_row("d"), None)[0].sample_key is None
    bad, problems = validate(_row("e", sample_key="x" * (MAX_REQUEST_ID_CHARS + 1)), None)
    assert bad is None and problems[0].startswith("sample_key: String should have at most")

    rows = [_row(f"p{i}") for i in range(3)]
    table = pa.table({"request_id": [r["request_id"] for r in rows], "model": ["digits"] * 3,
                      "baseline_version": ["v1"] * 3, "sent_at": [r["sent_at"] for r in rows],
                      "inputs": [json.dumps(r["inputs"]) for r in rows],
                      "baseline_output": [json.dumps(r["baseline_output"]) for r in rows],
                      "baseline_latency_ms": [1.0] * 3, "sample_key": pa.array([7, None, 9], pa.int64())})
    pq.write_table(table, tmp_path / "rows.parquet")
    result = CliRunner().invoke(mirror_cli, ["backfill", str(tmp_path / "rows.parquet"), "--dry-run", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "would send 3, skipped 0, failed 0" in result.output


async def _consume(bootstrap: str, topic: str, expect: int) -> list:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    out: list = []
    try:
        for _ in range(120):
            if len(out) >= expect:
                break
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                out.extend(messages)
    finally:
        await consumer.stop()
    return out


@pytest.mark.kafka
def test_backfill_writes_the_sample_key_into_the_record(kafka_bootstrap, new_topic, tmp_path):
    topic = new_topic("sample-key-backfill", config={"retention.ms": "-1"})
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(json.dumps(_row(f"bf-{i}", **({"sample_key": f"u{i % 2}"} if i < 4 else {})))
                             for i in range(6)) + "\n")
    result = CliRunner().invoke(mirror_cli, ["backfill", str(src), "--bootstrap", kafka_bootstrap, "--topic", topic,
                                             "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    messages = asyncio.run(_consume(kafka_bootstrap, topic, 6))
    by_id = {MirroredRequest.model_validate_json(m.value).request_id: m for m in messages}
    assert len(messages) == 6 and set(by_id) == {f"bf-{i}" for i in range(6)}
    for i in range(6):
        record = MirroredRequest.model_validate_json(by_id[f"bf-{i}"].value)
        want = f"u{i % 2}" if i < 4 else None
        assert record.sample_key == want
        assert by_id[f"bf-{i}"].key == (want or f"bf-{i}").encode()  # keyed as the SDK keys
        assert ("sample_key" in json.loads(by_id[f"bf-{i}"].value)) == (want is not None)


# ------------------------------------------------- the replay stage's cluster key --

@pytest.fixture(scope="module")
def replay_core(tmp_path_factory) -> ReplayCore:
    models = build_digits_models(tmp_path_factory.mktemp("models"))
    return ReplayCore(demo_settings(tmp_path_factory.mktemp("data"), models))


def _replay(rc: ReplayCore, messages: list[tuple[bytes, bytes | None]]) -> dict[str, dict[str, tuple[int, int]]]:
    """candidate -> request_id -> (input_hash, sample_hash)."""
    out = rc.replay([Inbound(value, 0, i, "mirror", key) for i, (key, value) in enumerate(messages)])
    rows: dict[str, dict[str, tuple[int, int]]] = {}
    for batch in out.batches:
        ih, sh = batch.columns["input_hash"], batch.columns["sample_hash"]
        rows[batch.candidate] = {r: (int(ih[i]), int(sh[i])) for i, r in enumerate(batch.request_id)}
    return rows


def test_requests_sharing_a_sample_key_share_the_cluster_key(replay_core):
    """Published by the SDK (fast path) and hand-written with list tensors (pydantic path): different
    inputs, one user -> one sample hash and one cluster key; no sample key -> sample hash 0."""
    c = core()
    sdk = [published(c, f"s{i}", pixels(20 + i), i, sample_key=user) for i, user in enumerate(["u1", "u1", "u2"])]
    slow = _doc(request_id="p0", sample_key="u1", sent_at="2026-01-01T00:00:03Z",
                inputs={"pixels": {"dtype": "float32", "shape": [1, 64], "data": pixels(30).tolist()}})
    assert parse_plain(json.dumps(slow).encode()) is None  # nested lists: the pydantic path
    rows = _replay(replay_core, [*sdk, (b"digits", json.dumps(slow).encode())])
    assert rows
    for r in rows.values():
        assert r["s0"][0] != r["s1"][0] != r["p0"][0]  # different inputs
        assert r["s0"][1] == r["s1"][1] == r["p0"][1] == sample_hash("u1") != 0
        assert r["s2"][1] == sample_hash("u2") != r["s0"][1]
        ids = ["s0", "s1", "s2", "p0"]
        keys = request_keys([r[i][0] for i in ids], [r[i][1] for i in ids])
        assert keys[0] == keys[1] == keys[3] != keys[2]


def test_a_constant_kafka_key_without_sample_key_is_no_sample(replay_core):
    """Every record keyed b"digits" on Kafka (a producer that keys by model), none with a sample key:
    sample hash 0 for all, and the cluster keys are the inputs' (repeats of one input together)."""
    c = core()
    inputs = [pixels(40), pixels(41), pixels(40)]
    messages = [(b"digits", published(c, f"k{i}", x, i)[1]) for i, x in enumerate(inputs)]
    rows = _replay(replay_core, messages)
    assert rows
    for r in rows.values():
        assert [r[f"k{i}"][1] for i in range(3)] == [0, 0, 0]
        keys = request_keys([r[f"k{i}"][0] for i in range(3)], [0, 0, 0])
        assert keys[0] == keys[2] != keys[1]
