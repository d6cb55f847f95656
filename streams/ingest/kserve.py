"""KServe's payload logger, read: its CloudEvents in, mirrored requests out.

What KServe sends (``pkg/logger`` of kserve/kserve: ``handler.go``, ``worker.go``): for each call of
an InferenceService with ``spec.predictor.logger`` set, an HTTP POST of a CloudEvent 1.0 in binary
mode for the request (``Ce-Type: org.kubeflow.serving.inference.request``), before the model runs,
and one for the response (``...inference.response``), only when the model answered 200. Both carry
the same ``Ce-Id`` (the caller's ``Ce-Id`` header, else a new UUID), ``Ce-Time`` (when the logger
sent it), the extensions ``Ce-Inferenceservicename``, ``Ce-Namespace``, ``Ce-Component``,
``Ce-Endpoint`` and ``Ce-Metadata`` (JSON: the request headers named in ``metadataHeaders``), and the
body as the client sent it and as the model answered. The logger sends each event once, from a pool
of workers (so the two may arrive in either order), and does not retry.

Bodies: the V1 protocol (``{"instances": [...]}`` -> ``{"predictions": [...]}``) or the Open
Inference Protocol, V2 (``{"inputs": [{"name", "shape", "datatype", "data"}]}`` -> ``{"outputs":
[...]}``). A call of N instances is N mirrored requests (a request is one row), ids ``<Ce-Id>`` for
one and ``<Ce-Id>#<i>`` for several; each carries the call's latency.

Latency: ``Ce-Time`` of the response minus that of the request. It includes the logger's queueing,
so it is an upper bound of the production latency, which the judge only reports unless a
replayed baseline measures latency on the same hardware (``latency_gates_without_reference``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from pydantic import ValidationError

from schemas import MirroredRequest, Tensor, describe_validation_error

REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
# The Open Inference Protocol's datatypes, as numpy names (BYTES has no tensor here: a dead letter).
OIP_DTYPES = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
              "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "FP16": "float16",
              "FP32": "float32", "FP64": "float64"}  # fmt: skip


class NotUsable(ValueError):
    """A logged call that cannot become mirrored requests; the message is the dead letter's reason."""


@dataclass(frozen=True)
class Half:
    """One of KServe's two events of a call, as the ingest endpoint stores it (JSON on the halves topic)."""

    id: str
    kind: str  # "request" or "response"
    service: str  # Ce-Inferenceservicename
    time_ms: int  # Ce-Time, epoch milliseconds
    metadata: dict[str, list[str]]  # Ce-Metadata
    body: str  # the payload as sent (UTF-8 text)

    def encode(self) -> bytes:
        return json.dumps(self.__dict__, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Half:
        return cls(**json.loads(raw))


def half_from_http(headers: dict[str, str], body: bytes) -> Half:
    """The CloudEvent of one POST from KServe's logger, binary mode (``Ce-*`` headers, the payload as
    the body) or structured (``Content-Type: application/cloudevents+json``). ``headers``: lower-case
    names. Raises NotUsable with the reason."""
    if headers.get("content-type", "").split(";")[0].strip() == "application/cloudevents+json":
        try:
            event = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise NotUsable(f"structured CloudEvent: not JSON ({exc})") from None
        if not isinstance(event, dict):
            raise NotUsable("structured CloudEvent: not a JSON object")
        attrs = {k: str(v) for k, v in event.items() if k not in ("data", "data_base64") and v is not None}
        data = event.get("data")
        payload = json.dumps(data) if not isinstance(data, str) else data
    else:
        attrs = {k[3:]: v for k, v in headers.items() if k.startswith("ce-")}
        try:
            payload = body.decode("utf-8")
        except UnicodeDecodeError:
            raise NotUsable("the event's body is not UTF-8 text (only JSON payloads are read)") from None
    kind = {REQUEST_TYPE: "request", RESPONSE_TYPE: "response"}.get(attrs.get("type", ""))
    if kind is None:
        raise NotUsable(f"CloudEvent type {attrs.get('type', '')[:100]!r} is not KServe's inference request or "
                        f"response ({REQUEST_TYPE} / {RESPONSE_TYPE})")  # fmt: skip
    if not attrs.get("id"):
        raise NotUsable("the CloudEvent has no id (Ce-Id): its request and response cannot be paired")
    try:
        metadata = json.loads(attrs.get("metadata") or "{}")
        metadata = {str(k): [str(x) for x in v] if isinstance(v, list) else [str(v)] for k, v in metadata.items()}
    except (ValueError, AttributeError):
        raise NotUsable("Ce-Metadata is not a JSON object of header lists") from None
    return Half(id=attrs["id"][:200], kind=kind, service=attrs.get("inferenceservicename", ""),
                time_ms=_time_ms(attrs.get("time")), metadata=metadata, body=payload)  # fmt: skip


def _time_ms(text: str | None) -> int:
    """RFC 3339 (Go writes nanoseconds; Python reads up to microseconds); now when absent."""
    if not text:
        return int(datetime.now(UTC).timestamp() * 1000)
    head, _, frac = text.replace("Z", "+00:00").partition(".")
    if frac:  # keep 6 digits of the fraction, then the offset
        digits = "".join(c for c in frac if c.isdigit())
        text = f"{head}.{digits[:6]}{frac[len(digits):]}"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise NotUsable(f"Ce-Time {text[:60]!r} is not an RFC 3339 time") from None
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp() * 1000)


def mirrored(request: Half, response: Half, route: Any) -> list[MirroredRequest]:
    """The mirrored requests of one logged call. ``route``: the ``[[ingest.kserve]]`` entry of the
    service (``streams.ingest.config.KServeRoute``). Raises NotUsable with the reason."""
    inputs = _tensors(request.body, "request", ("instances", "inputs"), route.input, route.input_dtype)
    outputs = _tensors(response.body, "response", ("predictions", "outputs"), route.output, route.output_dtype)
    rows = {t.shape[0] for t in (*inputs.values(), *outputs.values())}
    if len(rows) != 1:
        raise NotUsable(f"the request's and the response's tensors have different numbers of rows {sorted(rows)}: "
                        "each instance needs its prediction")  # fmt: skip
    (n,) = rows
    version = route.baseline_version or _model_version(response.body) or request.service
    sent_at = datetime.fromtimestamp(response.time_ms / 1000, UTC)
    latency = max(0.0, float(response.time_ms - request.time_ms))
    attributes = {key: values[0] for header, key in route.attributes.items()
                  if (values := _header(request.metadata, header))}  # fmt: skip
    sample_key = (_header(request.metadata, route.sample_key_header) or [None])[0] if route.sample_key_header else None
    out = []
    for i in range(n):
        try:
            out.append(MirroredRequest(
                request_id=request.id if n == 1 else f"{request.id}#{i}", model=route.model, baseline_version=version,
                sent_at=sent_at, inputs={k: Tensor.from_array(v[i : i + 1]) for k, v in inputs.items()},
                baseline_output={k: Tensor.from_array(v[i : i + 1]) for k, v in outputs.items()},
                baseline_latency_ms=latency, attributes=attributes, sample_key=sample_key,
            ))  # fmt: skip
        except ValidationError as exc:
            raise NotUsable(f"instance {i}: {describe_validation_error(exc)}") from None
    return out


def _tensors(body: str, what: str, keys: tuple[str, str], v1_name: str, v1_dtype: str) -> dict[str, np.ndarray]:
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise NotUsable(f"the {what} body is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise NotUsable(f"the {what} body is not a JSON object")
    v1_key, v2_key = keys
    try:
        if isinstance(doc.get(v1_key), list):  # V1: rows of one tensor
            array = np.asarray(doc[v1_key], dtype=v1_dtype)
            return {v1_name: array if array.ndim > 1 else array.reshape(-1, 1)}
        if isinstance(doc.get(v2_key), list) and doc[v2_key]:  # Open Inference Protocol
            return {str(t["name"]): _oip_array(t) for t in doc[v2_key]}
    except (TypeError, ValueError, KeyError) as exc:
        raise NotUsable(f"the {what}'s tensors cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None
    raise NotUsable(f"the {what} body has neither {v1_key!r} (V1 protocol) nor {v2_key!r} (Open Inference Protocol)")


def _oip_array(t: dict) -> np.ndarray:
    dtype = OIP_DTYPES.get(str(t.get("datatype")))
    if dtype is None:
        raise ValueError(f"tensor {str(t.get('name'))[:64]!r}: datatype {str(t.get('datatype'))[:20]!r} is not numeric")
    shape = [int(d) for d in t["shape"]]
    array = np.asarray(t["data"], dtype=dtype).reshape(shape)
    return array if array.ndim > 1 else array.reshape(-1, 1)


def _model_version(body: str) -> str | None:
    try:
        version = json.loads(body).get("model_version")
    except (ValueError, AttributeError):
        return None
    return str(version)[:128] if version else None


def _header(metadata: dict[str, list[str]], name: str) -> list[str]:
    """A header's values from Ce-Metadata, whatever its capitalisation there (Go canonicalises it)."""
    wanted = name.lower()
    return next((v for k, v in metadata.items() if k.lower() == wanted), [])
