"""The two cluster keys of every diff row: ``input_hash`` (what was asked) and ``sample_hash``
(who asked), from which the judge forms clusters: a session of one sample key, else the repeats of
one input, within the cluster gap (scorers/clusters.py).

Both are 64-bit blake2b fingerprints that depend on nothing but the request: not on the candidate,
the process or the Python run, so every replay process of a group computes the same keys.

``sample_hash`` comes from the record's explicit ``sample_key`` field only, never from the Kafka
message key: a producer may key its messages by anything (the model's name, a tenant, a constant)
for partitioning, and a key shared by most traffic would otherwise make one cluster of it. Without a
``sample_key`` it is 0 and the judge falls back to the input fingerprint (or to the attribute the
policy names, ``cluster_key_attribute``).
"""

from __future__ import annotations

import hashlib
import json
import struct
from operator import attrgetter, itemgetter

import numpy as np

# blake2b personalisations: the two keys are hashes of different functions (domain separation).
_INPUT_PERSON = b"shadowlens-in-v1"
_SAMPLE_PERSON = b"shadowlens-sk-v1"
_EVENT, _SAMPLE_KEY = itemgetter(0), attrgetter("sample_key")


def evidence_keys(group, stacked: dict[str, np.ndarray]) -> np.ndarray:
    """(n, 2) uint64: each request's ``input_hash`` and ``sample_hash`` (see streams/records.py)."""
    keys = np.empty((len(group), 2), dtype=np.uint64)
    keys[:, 0] = input_hashes(stacked, len(group))
    try:
        sample_keys = list(map(_SAMPLE_KEY, map(_EVENT, group)))  # in C: no Python per request
    except AttributeError:  # a request type without the field: no sample key
        sample_keys = [getattr(ev, "sample_key", None) for ev, _ in group]
    if any(sample_keys):
        keys[:, 1] = np.frombuffer(b"".join(map(_sample_digest, sample_keys)), dtype="<u8")
    else:  # the usual traffic: no request carries a sample key
        keys[:, 1] = 0
    return keys


def input_hashes(stacked: dict[str, np.ndarray], n: int) -> np.ndarray:
    """A 64-bit fingerprint of each row of stacked inputs (one row per request), never 0.

    blake2b-64 of a canonical encoding: the signature (every tensor's name, dtype and per-row shape,
    by name; JSON, length-prefixed) followed by the row's bytes of every tensor in that order, little-
    endian, C order. It depends on nothing but the inputs: not on the request id, the candidate, the
    process or the Python run. Per-row shapes are the stacked ones: a (64,) and a (1, 64) request
    tensor are the same input, as the replay stage treats them alike. The signature is hashed once;
    each row costs one ``copy`` of that state, one ``update`` and one ``digest``."""
    names = sorted(stacked)
    sig, blocks = [], []
    for name in names:
        array = stacked[name]
        sig.append([name, array.dtype.name, list(array.shape[1:])])
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        blocks.append(little.reshape(n, -1).view(np.uint8) if little.size else np.zeros((n, 0), np.uint8))
    head = json.dumps(sig, separators=(",", ":")).encode()
    base = hashlib.blake2b(struct.pack("<I", len(head)) + head, digest_size=8, person=_INPUT_PERSON)
    rows = np.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0]
    raw, width, new = memoryview(rows.tobytes()), rows.shape[1], base.copy
    digests: list[bytes] = []
    append = digests.append
    for lo in range(0, n * width, width) if width else [0] * n:
        h = new()
        h.update(raw[lo : lo + width])  # a view: no copy of the row
        append(h.digest())
    out = np.frombuffer(b"".join(digests), dtype="<u8").astype(np.uint64)
    out[out == 0] = 1  # 0 is "unknown"
    return out


def sample_hash(sample_key: bytes | str | None) -> int:
    """64-bit hash of a record's ``sample_key``; 0 when it has none (or an empty one). Never 0
    otherwise: blake2b-64 (little-endian) of the key's UTF-8 bytes, 0 mapped to 1."""
    return int.from_bytes(_sample_digest(sample_key), "little")


_NO_SAMPLE = bytes(8)
_ONE = (1).to_bytes(8, "little")
_SAMPLE_BASE = hashlib.blake2b(digest_size=8, person=_SAMPLE_PERSON)


def _sample_digest(key: bytes | str | None) -> bytes:
    if not key:
        return _NO_SAMPLE
    raw = key.encode() if isinstance(key, str) else bytes(key)
    h = _SAMPLE_BASE.copy()
    h.update(raw)
    digest = h.digest()
    return _ONE if digest == _NO_SAMPLE else digest
