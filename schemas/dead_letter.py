"""The dead letter: what the worker publishes for a message it could not use, bounded.

Every reason a message becomes a dead letter is one ``DeadLetterErrorType``; the README's "Blame"
says which are the producer's and which the candidate's (streams/replay/blame.py).
"""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime
from typing import Literal, get_args

import numpy as np
from pydantic import BaseModel, Field, field_validator

from schemas.events import MAX_NAME_CHARS
from schemas.tensors import clip


# Dead letters are bounded so a poison message cannot make a poison dead letter (over the
# broker's message size, or megabytes per failure in the DLQ).
MAX_REASON_CHARS = 2000
DEFAULT_DEAD_LETTER_PAYLOAD_BYTES = 64 * 1024
MAX_DEAD_LETTER_KEY_BYTES = 1024

DeadLetterErrorType = Literal[
    "tombstone",  # null message value (a Kafka tombstone): nothing to score
    "oversized",  # over schemas.decode.MAX_MESSAGE_BYTES, refused unread
    "invalid_json",  # not UTF-8, or not JSON
    "too_deep",  # JSON nested deeper than schemas.decode.MAX_JSON_DEPTH
    "invalid_schema",  # JSON, but not a MirroredRequest
    "invalid_tensor",  # a tensor in inputs/baseline_output is malformed or empty
    "non_finite_input",  # NaN or infinity in an input tensor: the producer's data is bad
    "unknown_model",  # valid, but no candidate is configured for its model
    "adapter",  # the candidate's input adapter (or input check) refused the request
    "input_dtype",  # an input's dtype the model does not take and the candidate's cast policy does not cast
    "baseline_mismatch",  # baseline_output lacks the configured output, or its shape differs from the candidate's
    "baseline_invalid",  # the configured baseline output is no probability vector (NaN/inf, negative, sum != 1)
    "replay_failed",  # the candidate failed on this request alone (``candidate`` names it)
    "unpaired",  # zero-code ingest: a call's request event without its response (or the reverse) in time
    "other",  # anything unexpected; the reason names the exception
]
DEAD_LETTER_ERROR_TYPES: tuple[str, ...] = get_args(DeadLetterErrorType)
Encoding = Literal["utf-8", "base64"]


class DeadLetter(BaseModel):
    """What the worker publishes to the dead-letter topic for a message it could not use.

    Build it with ``DeadLetter.for_payload`` so it stays bounded: the payload is kept whole up
    to ``max_payload_bytes`` of JSON text, else as a prefix with ``payload_truncated``, the
    ``original_size`` and the ``payload_sha256`` of the full bytes (to find the message again);
    ``reason`` is cut to ``MAX_REASON_CHARS`` however the letter is built. Serialise with
    ``model_dump_json`` (non-ASCII kept as UTF-8; ``json.dumps`` would \\u-escape it, up to 6x).
    """

    reason: str
    error_type: DeadLetterErrorType
    topic: str
    partition: int
    offset: int
    payload: str = Field(description="the original message value (utf-8, or base64 when not text)")
    payload_encoding: Encoding = "utf-8"
    failed_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    payload_truncated: bool = Field(default=False, description="payload holds only a prefix of the value")
    original_size: int | None = Field(default=None, description="bytes in the original value (0: tombstone)")
    payload_sha256: str | None = Field(default=None, description="hex sha256 of the whole value; None: tombstone")
    key: str | None = Field(default=None, description="the Kafka message key, if any")
    key_encoding: Encoding = "utf-8"
    key_truncated: bool = False
    candidate: str | None = Field(default=None, description="the candidate that failed on it, if one did")

    @field_validator("reason")
    @classmethod
    def _cap_reason(cls, value: str) -> str:
        if len(value) <= MAX_REASON_CHARS:
            return value
        suffix = f"... [{len(value)} characters, truncated]"
        return value[: MAX_REASON_CHARS - len(suffix)] + suffix

    @classmethod
    def for_payload(
        cls,
        raw: bytes | None,
        error_type: str,
        reason: str,
        topic: str = "",
        partition: int = -1,
        offset: int = -1,
        max_payload_bytes: int = DEFAULT_DEAD_LETTER_PAYLOAD_BYTES,
        key: bytes | str | None = None,
        candidate: str | None = None,
        failed_at: datetime | None = None,
    ) -> DeadLetter:
        """A bounded dead letter for the message value ``raw`` (``None``: a tombstone).

        The payload field's JSON text (escapes included) is at most ``max_payload_bytes``; the
        key's at most ``MAX_DEAD_LETTER_KEY_BYTES``; the candidate name is cut to ``MAX_NAME_CHARS``.
        """
        if raw is None:
            payload, encoding, truncated, size, digest = "", "utf-8", False, 0, None
        else:
            raw = bytes(raw)
            payload, encoding, truncated = _bounded_text(raw, max_payload_bytes)
            size, digest = len(raw), hashlib.sha256(raw).hexdigest()
        key_text, key_encoding, key_truncated = None, "utf-8", False
        if key is not None:
            key_bytes = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else bytes(key)
            key_text, key_encoding, key_truncated = _bounded_text(key_bytes, MAX_DEAD_LETTER_KEY_BYTES)
        return cls(
            reason=reason, error_type=error_type, topic=topic, partition=partition, offset=offset,
            payload=payload, payload_encoding=encoding, payload_truncated=truncated, original_size=size,
            payload_sha256=digest, key=key_text, key_encoding=key_encoding, key_truncated=key_truncated,
            candidate=None if candidate is None else clip(str(candidate), MAX_NAME_CHARS),
            failed_at=failed_at or datetime.now(UTC),
        )  # fmt: skip


def _bounded_text(raw: bytes, limit: int) -> tuple[str, Encoding, bool]:
    """``raw`` as UTF-8 text (base64 when not UTF-8) whose JSON string body is <= ``limit`` bytes.

    Returns (text, encoding, truncated). Text is cut at a character boundary.
    """
    limit = max(int(limit), 0)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        keep = min(len(raw), limit // 4 * 3)  # base64: 4 characters per 3 bytes, none escaped
        return base64.b64encode(raw[:keep]).decode("ascii"), "base64", keep < len(raw)
    keep = _json_prefix_length(raw, limit)
    return raw[:keep].decode("utf-8"), "utf-8", keep < len(raw)


def _json_prefix_length(raw: bytes, limit: int) -> int:
    """Longest prefix of valid UTF-8 ``raw`` whose JSON-escaped form fits ``limit`` bytes.

    JSON (pydantic's serialiser, like ``json.dumps(ensure_ascii=False)``) writes UTF-8 as is,
    escapes quote, backslash and \\b \\t \\n \\f \\r in 2 bytes, other control bytes in 6 (\\u00XX).
    """
    if len(raw) * 6 <= limit:  # fits whatever it holds
        return len(raw)
    head = np.frombuffer(raw, dtype=np.uint8, count=min(len(raw), limit))  # each byte costs >= 1
    cost = np.ones(len(head), dtype=np.int64)
    cost[head < 0x20] = 6
    cost[np.isin(head, _TWO_BYTE_ESCAPES)] = 2
    keep = int(np.searchsorted(np.cumsum(cost), limit, side="right"))
    while 0 < keep < len(raw) and raw[keep] & 0xC0 == 0x80:  # back off a split multi-byte character
        keep -= 1
    return keep


_TWO_BYTE_ESCAPES = np.frombuffer(b'"\\' + bytes([0x08, 0x09, 0x0A, 0x0C, 0x0D]), dtype=np.uint8)  # " \ \b \t \n \f \r
