"""The wire contract for producers in any language: one JSON Schema, one Kafka convention.

A producer that is not the Python mirror SDK (Go, Java, Node services) publishes, per request, one
Kafka record to the mirror topic (default ``shadowlens.mirror``):

* **key**: anything (UTF-8); the request's ``request_id``, or its ``sample_key`` to keep a user's
  records in order on one partition, or the model's name. The Kafka key only orders and partitions:
  the worker never reads it as a sample key, so a key shared by most traffic changes nothing.
* **value**: UTF-8 JSON matching ``mirrored_request.v1.schema.json`` (generated from
  ``schemas.events.MirroredRequest``; a test keeps the checked-in file equal to the model).
  Tensors are ``{"dtype", "shape", "data"}`` with ``data`` the base64 of the little-endian bytes
  in C order (nested JSON lists of numbers are accepted too, for hand-written events).
* **sample_key** (optional field of the value, 1..``MAX_REQUEST_ID_CHARS`` characters): what makes
  requests dependent (a user, a session, a device). The judge treats requests sharing a sample key
  within the policy's ``cluster_gap_s`` as one cluster, one piece of independent evidence (unless
  the policy names a ``cluster_key_attribute``, which comes first); without one, the repeats of one
  input within the gap are a cluster. Leave it out (or null) when there is none: "" is refused (a
  dead letter), and one constant for all traffic only makes clusters of ``cluster_cap`` requests.
* **headers**: none needed. Compression: any the broker accepts (lz4 / zstd recommended).

Anything that fails validation is not lost: it becomes a dead letter naming the field and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from schemas.events import MirroredRequest
from schemas.tensors import SUPPORTED_DTYPES

SCHEMA_PATH = Path(__file__).with_name("mirrored_request.v1.schema.json")
SCHEMA_ID = "https://shadowlens.dev/schemas/mirrored_request.v1.schema.json"


def mirrored_request_schema() -> dict[str, Any]:
    schema = MirroredRequest.model_json_schema()
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **schema}
    tensor = schema["$defs"]["Tensor"]["properties"]
    tensor["dtype"]["enum"] = list(SUPPORTED_DTYPES)
    # Accepted on input besides base64: nested lists of numbers (packed to bytes on validation).
    tensor["data"] = {"description": tensor["data"]["description"] + "; or a (nested) list of numbers",
                      "anyOf": [{"type": "string", "contentEncoding": "base64"}, {"type": "array"}]}
    return schema


def schema_text() -> str:
    return json.dumps(mirrored_request_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":  # python -m schemas.wire > schemas/mirrored_request.v1.schema.json
    print(schema_text(), end="")
