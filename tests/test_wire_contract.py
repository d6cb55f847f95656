"""The published wire contract (schemas/mirrored_request.v1.schema.json) is the model, and events written
by hand as another language would (no shadowlens code) are accepted by both the schema and the worker."""

from __future__ import annotations

import base64
import json
import struct

import jsonschema
import pytest

from schemas import MirroredRequest, decode_request
from schemas.wire import SCHEMA_PATH, schema_text


def test_checked_in_schema_is_the_models():
    assert SCHEMA_PATH.read_text() == schema_text(), "regenerate: python -m schemas.wire > " + str(SCHEMA_PATH)


def foreign_event(**change) -> dict:
    pixels = struct.pack("<64f", *[float(i % 16) for i in range(64)])  # what Go's binary.LittleEndian writes
    probs = struct.pack("<10f", *([0.1] * 10))
    event = {
        "schema_version": 1, "request_id": "go-7f3a", "model": "digits", "baseline_version": "v1",
        "sent_at": "2026-11-26T12:00:00Z",
        "inputs": {"pixels": {"dtype": "float32", "shape": [1, 64], "data": base64.b64encode(pixels).decode()}},
        "baseline_output": {"probabilities": {"dtype": "float32", "shape": [1, 10],
                                              "data": base64.b64encode(probs).decode()}},
        "baseline_latency_ms": 1.7, "attributes": {"country": "de"}, "label": 3,
    }  # fmt: skip
    event.update(change)
    return event


def test_a_hand_written_event_is_valid_for_the_schema_and_the_worker():
    schema = json.loads(SCHEMA_PATH.read_text())
    event = foreign_event()
    jsonschema.validate(event, schema)
    decoded = decode_request(json.dumps(event).encode())
    assert isinstance(decoded, MirroredRequest)
    assert decoded.inputs["pixels"].to_array()[0, 5] == 5.0


@pytest.mark.parametrize("change", [{"request_id": ""}, {"baseline_latency_ms": -1}, {"extra": 1},
                                    {"inputs": {"pixels": {"dtype": "float128", "shape": [1], "data": ""}}}])
def test_what_the_schema_rejects_the_worker_dead_letters(change):
    event = foreign_event(**change)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(event, json.loads(SCHEMA_PATH.read_text()))
    assert not isinstance(decode_request(json.dumps(event).encode()), MirroredRequest)
