"""Cluster keys of diff rows: input_hash (what was asked) and sample_hash (who asked: the record's
explicit sample_key, never the Kafka key), from which the judge forms its clusters. Replay core driven
in-process, no Kafka."""

from __future__ import annotations

import json
import struct
from types import SimpleNamespace
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from schemas import MirroredRequest, Tensor
from streams.demo import demo_settings
from streams.models import build_digits_models
from streams.records import LEGACY_LAYOUT, MAGIC, NUMERIC, DiffBatch
from streams.replay.evidence_keys import evidence_keys, input_hashes, sample_hash
from streams.replay.core import Inbound, ReplayCore

CANDIDATES = ("digits-v2", "digits-v2-degraded", "digits-v1-replay")
START = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def core(tmp_path_factory) -> ReplayCore:
    models = build_digits_models(tmp_path_factory.mktemp("models"))
    return ReplayCore(demo_settings(tmp_path_factory.mktemp("data"), models))


def pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 16, size=(1, 64)).astype(np.float32)


def request(request_id: str, inputs: dict[str, np.ndarray], i: int = 0, output: str = "probabilities") -> bytes:
    probs = np.full((1, 10), 0.1, dtype=np.float32)
    return MirroredRequest(
        request_id=request_id, model="digits", baseline_version="v1", sent_at=START + timedelta(seconds=i),
        inputs={name: Tensor.from_array(a) for name, a in inputs.items()},
        baseline_output={output: Tensor.from_array(probs)}, baseline_latency_ms=1.0,
    ).model_dump_json().encode()  # fmt: skip


def replay(core: ReplayCore, messages: list[tuple[bytes, bytes | None]]) -> dict[str, dict[str, tuple[int, int]]]:
    """candidate -> request_id -> (input_hash, sample_hash), every row of one micro-batch."""
    out = core.replay([Inbound(value, 0, i, "mirror", key) for i, (value, key) in enumerate(messages)])
    rows: dict[str, dict[str, tuple[int, int]]] = {}
    for batch in out.batches:
        ih, sh = batch.columns["input_hash"], batch.columns["sample_hash"]
        assert ih.dtype == np.uint64 and sh.dtype == np.uint64
        rows[batch.candidate] = {r: (int(ih[i]), int(sh[i])) for i, r in enumerate(batch.request_id)}
    return rows


def test_same_input_same_hash_across_request_ids_candidates_and_batches(core):
    a, b = pixels(1), pixels(2)
    rows = replay(core, [(request("r1", {"pixels": a}), None), (request("r2", {"pixels": a}, 1), None),
                         (request("r3", {"pixels": b}, 2), None)])  # fmt: skip
    assert set(rows) == set(CANDIDATES)
    hashes = {rows[c]["r1"][0] for c in CANDIDATES} | {rows[c]["r2"][0] for c in CANDIDATES}
    assert len(hashes) == 1 and 0 not in hashes  # adapters (rename, cast, scale) do not change it
    (h1,) = hashes
    assert {rows[c]["r3"][0] for c in CANDIDATES} == {rows["digits-v2"]["r3"][0]} != {h1}
    # Another micro-batch, another request id, alone: the same fingerprint.
    again = replay(core, [(request("other-id", {"pixels": a.copy()}, 7), None)])
    assert again["digits-v1-replay"]["other-id"][0] == h1
    # One bit of difference is another input.
    c = a.copy()
    c.view(np.uint32)[0, 5] ^= 1
    assert replay(core, [(request("r4", {"pixels": c}), None)])["digits-v2"]["r4"][0] != h1


def test_mixed_input_schemas_in_one_batch_hash_as_alone(core):
    a = pixels(3)
    variants = {
        "plain": {"pixels": a},
        "flat": {"pixels": a.reshape(64)},  # (64,) and (1, 64) are the same input to the replay stage
        "extra": {"pixels": a, "debug": np.array([[1, 2, 3]], dtype=np.int64)},
        "extra-other": {"pixels": a, "debug": np.array([[1, 2, 4]], dtype=np.int64)},
        "renamed-extra": {"pixels": a, "debug2": np.array([[1, 2, 3]], dtype=np.int64)},
        "other": {"pixels": pixels(4)},
    }
    mixed = replay(core, [(request(name, inputs, i), None) for i, (name, inputs) in enumerate(variants.items())])
    for c in CANDIDATES:
        assert set(mixed[c]) == set(variants)
    alone = {name: replay(core, [(request(f"alone-{name}", inputs), None)])["digits-v2"][f"alone-{name}"][0]
             for name, inputs in variants.items()}  # fmt: skip
    for name in variants:
        assert {mixed[c][name][0] for c in CANDIDATES} == {alone[name]}
    assert alone["plain"] == alone["flat"]
    assert len({alone[n] for n in ("plain", "extra", "extra-other", "renamed-extra", "other")}) == 5


def test_input_hashes_cover_names_dtypes_shapes_and_bytes():
    x = np.arange(12, dtype=np.int32).reshape(2, 6)
    base = input_hashes({"x": x}, 2)
    assert base.dtype == np.uint64 and (base != 0).all() and base[0] != base[1]
    assert (input_hashes({"x": x.copy()}, 2) == base).all()
    assert (input_hashes({"x": x[1:]}, 1) == base[1:]).all()  # a row's hash does not depend on its batch
    assert (input_hashes({"y": x}, 2) != base).all()  # name
    assert (input_hashes({"x": x.view(np.float32)}, 2) != base).all()  # dtype, same bytes
    assert (input_hashes({"x": x.reshape(2, 2, 3)}, 2) != base).all()  # shape, same bytes
    assert (input_hashes({"x": x.astype(">i4")}, 2) == base).all()  # byte order is canonicalised
    assert (input_hashes({"x": np.asfortranarray(x)}, 2) == base).all()  # memory layout too
    # Several tensors: order of the mapping does not matter, the split between them does.
    a, b = np.ones((2, 2), np.uint8), np.zeros((2, 2), np.uint8)
    assert (input_hashes({"a": a, "b": b}, 2) == input_hashes({"b": b, "a": a}, 2)).all()
    assert (input_hashes({"a": np.ones((2, 3), np.uint8), "b": np.zeros((2, 1), np.uint8)}, 2)
            != input_hashes({"a": a, "b": b}, 2)).all()  # fmt: skip
    # Deterministic across processes and runs (no salted hash()): pinned values.
    assert int(input_hashes({"x": np.arange(4, dtype=np.float32)[None]}, 1)[0]) == PINNED_INPUT
    assert sample_hash(b"user-42") == sample_hash("user-42") == PINNED_SAMPLE


PINNED_INPUT = 0x81C1E3AF5B8A8290  # blake2b-64, person b"shadowlens-in-v1"
PINNED_SAMPLE = 0x3E69420B5907BDBF  # blake2b-64, person b"shadowlens-sk-v1"


def test_sample_hash_from_the_records_sample_key():
    assert sample_hash(None) == sample_hash("") == sample_hash(b"") == 0
    assert sample_hash(b"user-1") == sample_hash("user-1") != 0
    assert sample_hash("user-1") != sample_hash("user-2")
    # evidence_keys reads the decoded record's sample_key field (the SDK sets it; the JSON Schema
    # documents it), whatever form the record was decoded to.
    stacked = {"x": np.arange(8, dtype=np.float32).reshape(4, 2)}
    group = [(SimpleNamespace(request_id=f"r{i}", sample_key=k), SimpleNamespace(key=b"digits"))
             for i, k in enumerate(["user-1", None, "user-1", "user-2"])]
    keys = evidence_keys(group, stacked)
    assert keys[:, 1].tolist() == [sample_hash("user-1"), 0, sample_hash("user-1"), sample_hash("user-2")]
    assert (keys[:, 0] == input_hashes(stacked, 4)).all()


def test_the_kafka_key_is_never_the_sample_key(core):
    """A producer may key its messages by anything: none, the request id (the SDK's default), a user,
    or one constant for all (its model's name). The rows' keys are the same in every case: a constant
    Kafka key changes nothing (it once made one "user" of all traffic and silenced the judge)."""
    a, b = pixels(5), pixels(6)
    inputs = [a, a, b, a]
    for kafka_key in (None, "request id", b"user-1", b"digits"):
        rows = replay(core, [(request(f"r{i}", {"pixels": x}, i),
                              f"r{i}".encode() if kafka_key == "request id" else kafka_key)
                             for i, x in enumerate(inputs)])  # fmt: skip
        for c in CANDIDATES:
            r = rows[c]
            assert [r[f"r{i}"][1] for i in range(4)] == [0, 0, 0, 0]
            assert r["r0"][0] == r["r1"][0] == r["r3"][0] != r["r2"][0]


def test_rows_keep_their_keys_when_others_leave_the_group(core):
    a, b = pixels(7), pixels(8)
    rows = replay(core, [
        (request("ok-1", {"pixels": a}, 0), b"u1"),
        (request("no-baseline", {"pixels": pixels(9)}, 1, output="logits"), b"u9"),  # baseline_mismatch letter
        (request("ok-2", {"pixels": b}, 2), b"u2"),
    ])  # fmt: skip
    alone = replay(core, [(request("x", {"pixels": a}), b"u1"), (request("y", {"pixels": b}), b"u2")])
    for c in CANDIDATES:
        assert set(rows[c]) == {"ok-1", "ok-2"}
        assert rows[c]["ok-1"] == alone[c]["x"] and rows[c]["ok-2"] == alone[c]["y"]


def test_failed_candidate_rows_carry_keys(core, monkeypatch):
    cand = next(c for c in core.candidates["digits"] if c.config.name == "digits-v2")

    def boom(*args, **kwargs):
        raise RuntimeError("candidate crashed")

    monkeypatch.setattr(cand.runner, "run_stacked", boom)
    a, b = pixels(10), pixels(11)
    messages = [(request("f1", {"pixels": a}, 0), b"k1"), (request("f2", {"pixels": b}, 1), None)]
    rows = replay(core, messages)
    failed = next(x for x in core.replay([Inbound(v, 0, i, "mirror", k) for i, (v, k) in enumerate(messages)]).batches
                  if x.candidate == "digits-v2")  # fmt: skip
    assert all("candidate crashed" in e for e in failed.error) and len(failed) == 2  # rows with the error
    ok = rows["digits-v1-replay"]
    assert rows["digits-v2"] == ok and ok["f1"][0] != 0 and ok["f1"][1] == 0 and ok["f2"][1] == 0  # no Kafka key


def _batch(n: int = 3) -> DiffBatch:
    rng = np.random.default_rng(0)
    cols = {name: rng.integers(0, 100, n).astype(np.dtype(dt).newbyteorder("=")) for name, dt in NUMERIC.items()}
    cols["input_hash"] = np.array([1, 2**64 - 1, 2**63 + 12345][:n], dtype=np.uint64)
    cols["sample_hash"] = np.array([0, 2**63, 77][:n], dtype=np.uint64)
    return DiffBatch("digits", "v2", 123, cols, [f"r{i}" for i in range(n)], ["v1"] * n, [""] * n,
                     [{"country": "de"}] * n, routed=n, covers={0: n - 1})  # fmt: skip



def test_diff_batches_sharing_request_lists_encode_to_the_same_bytes():
    """The replay stage encodes a micro-batch's batches with one ``shared`` cache: the candidates'
    batches share their request lists, written once; the bytes are those of a plain encode."""
    first = _batch()
    second = DiffBatch("digits", "v3", 124, dict(first.columns), first.request_id, first.baseline_version,
                       ["boom", "", ""], first.attributes, routed=3, covers={0: 2})  # fmt: skip
    other = _batch()  # equal lists, other objects
    other.request_id[0] = "changed"
    shared: dict = {}
    raws = [b.encode(shared) for b in (first, second, other)]
    assert raws == [first.encode(), second.encode(), other.encode()]
    assert len(shared) == 6  # first's three lists (second reuses them), other's three
    assert DiffBatch.decode(raws[2]).request_id == ["changed", "r1", "r2"]

def test_diff_batch_round_trips_the_keys():
    batch = _batch()
    back = DiffBatch.decode(batch.encode())
    for name in NUMERIC:
        assert back.columns[name].dtype == np.dtype(NUMERIC[name]).newbyteorder("=")
        np.testing.assert_array_equal(back.columns[name], batch.columns[name])
    assert NUMERIC["input_hash"] == NUMERIC["sample_hash"] == "<u8"
    picked = back.take([2, 0])
    assert picked.columns["input_hash"].tolist() == [2**63 + 12345, 1]
    assert picked.columns["sample_hash"].tolist() == [77, 0]
    empty = DiffBatch.decode(batch.take([]).encode())
    assert len(empty) == 0 and empty.columns["input_hash"].dtype == np.uint64


def _old_encode(batch: DiffBatch) -> bytes:
    """How a diff batch was written before the evidence keys (no "columns" in the header)."""
    header = {
        "model": batch.model, "candidate": batch.candidate, "scored_ms": batch.scored_ms, "n": len(batch),
        "top_k": batch.top_k, "request_id": batch.request_id, "baseline_version": batch.baseline_version,
        "error": batch.error, "attributes": batch.attributes, "routed": batch.routed,
        "covers": {str(p): o for p, o in batch.covers.items()}, "unscorable": batch.unscorable,
        "unscorable_ms": batch.unscorable_ms,
    }  # fmt: skip
    head = json.dumps(header, separators=(",", ":")).encode()
    buffers = [np.ascontiguousarray(batch.columns[name], dtype=dt).tobytes() for name, dt in LEGACY_LAYOUT]
    return b"".join([MAGIC, struct.pack("<I", len(head)), head, *buffers])


def test_old_batches_decode_with_zero_keys():
    batch = _batch()
    assert "input_hash" not in dict(LEGACY_LAYOUT) and "sample_hash" not in dict(LEGACY_LAYOUT)
    old = DiffBatch.decode(_old_encode(batch))
    assert old.columns["input_hash"].tolist() == [0, 0, 0] and old.columns["sample_hash"].tolist() == [0, 0, 0]
    assert old.columns["input_hash"].dtype == np.uint64
    for name, _ in LEGACY_LAYOUT:
        np.testing.assert_array_equal(old.columns[name], batch.columns[name])
    assert old.request_id == batch.request_id and old.covers == batch.covers
    with pytest.raises(ValueError, match="expected"):
        DiffBatch.decode(_old_encode(batch) + b"\0" * 8)


def test_unknown_columns_of_a_newer_writer_are_skipped():
    batch = _batch()
    raw = batch.encode()
    (head_len,) = struct.unpack_from("<I", raw, 4)
    header = json.loads(raw[8 : 8 + head_len])
    header["columns"].insert(1, ["future", "<f4"])
    head = json.dumps(header).encode()
    body = raw[8 + head_len :]
    first = np.dtype(NUMERIC["sent_ms"]).itemsize * len(batch)
    newer = b"".join([MAGIC, struct.pack("<I", len(head)), head, body[:first], b"\1" * 4 * len(batch), body[first:]])
    back = DiffBatch.decode(newer)
    assert "future" not in back.columns
    for name in NUMERIC:
        np.testing.assert_array_equal(back.columns[name], batch.columns[name])
