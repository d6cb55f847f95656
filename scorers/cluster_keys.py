"""Cluster keys: what makes requests one cluster (scorers.clusters explains clusters).

A request's key is the configured attribute's value when set and present, else the record's
explicit ``sample_key`` (its hash), else its input fingerprint; combined with its attribute
signature, so a cluster lies in one slice of every attribute. Never the Kafka key. 0: no key
(the request is a cluster of its own).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np

_SIG_PERSON = b"shadowlens-sig1"
_MIX = np.uint64(0x9E3779B97F4A7C15)


def signature_hash(attributes: dict[str, str] | None) -> int:
    """Stable 64-bit hash of a request's attributes (0 without any)."""
    if not attributes:
        return 0
    raw = json.dumps(sorted(attributes.items()), separators=(",", ":")).encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8, person=_SIG_PERSON).digest(), "little") or 1


def cluster_keys(base: np.ndarray, signatures: np.ndarray | None = None) -> np.ndarray:
    """Combine each request's base key (sample key, else input fingerprint; 0: none) with its attribute
    signature hash. 0 stays 0: such a request is a cluster of its own."""
    base = np.asarray(base, dtype=np.uint64).reshape(-1)
    if signatures is None:
        return base.copy()
    sig = np.asarray(signatures, dtype=np.uint64).reshape(-1)
    with np.errstate(over="ignore"):
        mixed = base ^ (sig * _MIX)
        mixed ^= mixed >> np.uint64(31)
    mixed[mixed == 0] = 1
    return np.where(base == 0, np.uint64(0), mixed)


_ATTR_PERSON = b"shadowlens-ck1"


def attribute_key(value: str | None) -> int:
    """Stable 64-bit key of a configured attribute's value (0 when absent or empty)."""
    if not value:
        return 0
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8, person=_ATTR_PERSON).digest(), "little") or 1


def request_keys(input_hash, sample_hash=None, attributes: Sequence[dict[str, str]] | None = None,
                 key_attribute: str | None = None) -> np.ndarray:
    """Each request's cluster key: the configured attribute's value when set and present, else the
    record's explicit ``sample_key`` (its hash; 0 = none), else the input fingerprint; combined with
    the request's attribute signature (one slice per cluster). Never taken from the Kafka key."""
    base = np.asarray(input_hash, dtype=np.uint64).reshape(-1).copy()
    if sample_hash is not None:
        smp = np.asarray(sample_hash, dtype=np.uint64).reshape(-1)
        base = np.where(smp != 0, smp ^ np.uint64(0x5A5A5A5A5A5A5A5A), base)  # user and input keys apart
    if key_attribute and attributes is not None:
        attr = np.array([attribute_key((a or {}).get(key_attribute)) for a in attributes], dtype=np.uint64)
        base = np.where(attr != 0, attr, base)
    sigs = None
    if attributes is not None:
        sigs = np.array([signature_hash(a) for a in attributes], dtype=np.uint64)
    return cluster_keys(base, sigs)

